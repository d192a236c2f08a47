"""An Adapter: one LoRA expert in PEFT's on-disk format plus lorastack's `card.json`.

The PEFT files (`adapter_config.json`, `adapter_model.safetensors`) stay exactly as PEFT
writes them, so adapters go in and out of lorastack without conversion. Weights are read
from safetensors only: a pickle (`.bin`) can run code on load, so it is refused.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .atomic import READ_ATTEMPTS, dir_identity
from .errors import IncompatibleError, LorastackError

if TYPE_CHECKING:
    import torch

    from .base import Base

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CARD_FILE = "card.json"
EXAMPLES_FILE = "examples.jsonl"
PLOT_FILE = "loss.png"  # the training loss curve, next to the card
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
CARD_VERSION = 1

_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>A|B)(?:\.[^.]+)?\.weight$")


class AdapterError(LorastackError):
    """A directory is not a usable LoRA adapter (missing files, pickle weights, bad config)."""


class AdapterCard(BaseModel):
    """What lorastack knows about an adapter beyond its weights; unknown keys are kept."""

    model_config = ConfigDict(extra="allow")

    name: str
    description: str = ""
    base_fingerprint: str | None = None
    base_name: str = ""
    rank: int = 0
    alpha: float = 0.0
    target_modules: list[str] = Field(default_factory=list)
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    data: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    signatures: dict[str, Any] = Field(default_factory=dict)
    # False keeps `auto` from ever choosing the adapter (a general adapter made for
    # `--subtract`); it is still served by name.
    routable: bool = True
    card_version: int = CARD_VERSION


MAX_JSON_BYTES = 1 << 20  # configs and cards are a few KB; a bigger one is not an adapter's
MAX_EXAMPLES_BYTES = 16 << 20
MAX_DESCRIPTION = 4096
# A trained LoRA factor's entries stay far below 1 (init ~1/sqrt(d), steps of lr ~1e-3);
# beyond this the adapter is corrupt or hostile and would only produce garbage or NaN.
MAX_ABS_WEIGHT = 1e4
MAX_REGEX = 256
MAX_RANK = 1024
MAX_ALPHA = 65536.0


def regular_file(path: Path, max_bytes: int | None = None) -> Path:
    """`path` if it is a regular file (after symlinks) of at most `max_bytes`: a FIFO or a
    device would block or never end when read."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise AdapterError(f"missing {path.name}") from None
    except OSError as e:
        raise AdapterError(f"{path.name}: cannot read ({e.strerror})") from None
    import stat

    if not stat.S_ISREG(st.st_mode):
        raise AdapterError(f"{path.name} is not a regular file")
    if max_bytes is not None and st.st_size > max_bytes:
        raise AdapterError(f"{path.name} is {st.st_size} bytes; at most {max_bytes} are accepted")
    return path


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.exists():
        raise AdapterError(f"{path.parent.name}: missing {path.name} ({what})")
    try:
        obj = json.loads(regular_file(path, MAX_JSON_BYTES).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{path.parent.name}: missing {path.name} ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise AdapterError(f"{path.name}: not valid JSON ({e})") from None
    except RecursionError:
        raise AdapterError(f"{path.name}: not valid JSON (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    return obj


def check_card_values(obj: Any, where: str = CARD_FILE, depth: int = 0) -> None:
    """A card is shown by `adapters list` and `/v1/models`: no NaN/Infinity, no control
    characters in short fields, a description of at most MAX_DESCRIPTION characters."""
    if depth > 20:
        raise AdapterError(f"{where}: nested too deeply")
    if isinstance(obj, float) and not math.isfinite(obj):
        raise AdapterError(f"{where}: holds {obj} (cards take finite numbers only)")
    if isinstance(obj, str) and "\x00" in obj:
        raise AdapterError(f"{where}: holds a NUL character")
    if isinstance(obj, dict):
        if isinstance(obj.get("description"), str) and len(obj["description"]) > MAX_DESCRIPTION:
            raise AdapterError(f"{where}: description is {len(obj['description'])} characters; at most {MAX_DESCRIPTION}")
        for k, v in obj.items():
            check_card_values(v, f"{where}: {k}" if depth == 0 else f"{where}.{k}", depth + 1)
    elif isinstance(obj, list):
        for v in obj:
            check_card_values(v, where, depth + 1)


@dataclass
class Adapter:
    path: Path
    card: AdapterCard

    @property
    def name(self) -> str:
        return self.card.name

    # ------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | Path, name: str | None = None) -> "Adapter":
        """Open a PEFT LoRA directory; a missing card is synthesised from the PEFT config."""
        path = Path(path)
        if not path.is_dir():
            raise AdapterError(f"{path}: not a directory (expected a PEFT LoRA directory)")
        config = read_adapter_config(path)
        weights_path(path)  # fail early on a missing or pickle-only weights file
        card_path = path / CARD_FILE
        raw = read_json(card_path, "adapter card") if card_path.exists() else {}
        raw.setdefault("name", name or path.name)
        if name:
            raw["name"] = name
        # What the weights are is the config's to say, never a card's (a card may be stale or hostile).
        raw["rank"] = int(config.get("r", 0))
        raw["alpha"] = float(config.get("lora_alpha", config.get("r", 0)))
        targets = config.get("target_modules") or []
        raw["target_modules"] = sorted(targets) if isinstance(targets, list) else [targets]
        check_card_values(raw)
        try:
            card = AdapterCard.model_validate(raw)
        except ValidationError as e:
            raise AdapterError(f"{CARD_FILE}: invalid card: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}") from None
        return cls(path=path, card=card)

    def config(self) -> dict[str, Any]:
        return read_adapter_config(self.path)

    def weights(self) -> dict[str, "torch.Tensor"]:
        """The LoRA tensors, from safetensors only."""
        from safetensors.torch import load_file

        try:
            return load_file(str(weights_path(self.path)))
        except Exception as e:  # a truncated or foreign file: say which
            raise AdapterError(f"{WEIGHTS_FILE}: cannot read safetensors ({e})") from None

    def examples(self) -> list[str]:
        """Sample inputs stored with the adapter (for routing signatures; `examples_jsonl` writes them)."""
        from .data import DataError, parse_json_line

        p = self.path / EXAMPLES_FILE
        if not p.exists():
            return []
        texts = []
        with open(regular_file(p, MAX_EXAMPLES_BYTES), "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                where = f"{EXAMPLES_FILE}:{lineno}"
                try:
                    obj = parse_json_line(raw, where)
                except DataError as e:
                    raise AdapterError(str(e)) from None
                if obj is None:
                    continue
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise AdapterError(f"{where}: expected an object with a string 'text'")
                texts.append(obj["text"])
        return texts

    def write_card(self) -> None:
        from .atomic import write_text_atomic

        write_text_atomic(self.path / CARD_FILE, self.card.model_dump_json(indent=2))

    # ------------------------------------------------------------ compatibility
    def check_compatible(self, base: "Base") -> None:
        """Raise IncompatibleError naming the first mismatch between these weights and `base`."""
        check_compatible(self.path, base, self.card.base_fingerprint)


def read_adapter_config(path: Path) -> dict[str, Any]:
    config = read_json(path / CONFIG_FILE, "PEFT adapter config")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{CONFIG_FILE}: peft_type is {config.get('peft_type')!r}; lorastack handles LoRA adapters only")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= MAX_RANK:
        raise AdapterError(f"{CONFIG_FILE}: 'r' must be an integer from 1 to {MAX_RANK}, got {r!r}")
    alpha = config.get("lora_alpha", r)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or not 0 < alpha <= MAX_ALPHA:
        raise AdapterError(f"{CONFIG_FILE}: 'lora_alpha' must be a number in (0, {MAX_ALPHA:g}], got {alpha!r}")
    if config.get("use_dora"):
        raise AdapterError(f"{CONFIG_FILE}: DoRA adapters (use_dora) are not supported; only plain LoRA")
    if config.get("fan_in_fan_out"):
        raise AdapterError(f"{CONFIG_FILE}: fan_in_fan_out (Conv1D-style transposed weights) is not supported")
    for key, low, high, what in (("rank_pattern", 1, MAX_RANK, "an integer rank"), ("alpha_pattern", 0, MAX_ALPHA, "an alpha")):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise AdapterError(f"{CONFIG_FILE}: '{key}' must be a mapping of module patterns to values")
        for mod, value in pattern.items():
            if len(mod) > MAX_REGEX or NESTED_QUANTIFIER.search(mod):
                raise AdapterError(f"{CONFIG_FILE}: '{key}' key {mod[:40]!r} is too long or could backtrack forever")
            try:
                re.compile(mod)  # PEFT matches these keys as regexes against module names
            except re.error as e:
                raise AdapterError(f"{CONFIG_FILE}: '{key}' key {mod!r} is not a valid pattern ({e})") from None
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and (low <= value <= high if key == "rank_pattern" else 0 < value <= high)
            if not ok or (key == "rank_pattern" and not isinstance(value, int)):
                raise AdapterError(f"{CONFIG_FILE}: '{key}' gives {mod!r} {value!r}; each must be {what} in "
                                   f"{'[1' if key == 'rank_pattern' else '(0'}, {high:g}]")
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise AdapterError(f"{CONFIG_FILE}: target_modules must be a list of module names or a regex string")
    return config


def weights_path(path: Path) -> Path:
    p = path / WEIGHTS_FILE
    if p.exists():
        return regular_file(p)
    pickles = [f for f in PICKLE_FILES if (path / f).exists()]
    if pickles:
        raise AdapterError(
            f"{path.name}: has {pickles[0]} (pickle) but no {WEIGHTS_FILE}; lorastack never loads pickle weights "
            "because they can run code. Re-save with safetensors (PEFT's save_pretrained does by default)."
        )
    raise AdapterError(f"{path.name}: missing {WEIGHTS_FILE}")


def lora_modules(tensors: dict[str, "torch.Tensor"]) -> dict[str, dict[str, tuple[int, ...]]]:
    """Group LoRA tensors by the base module they modify: `{module: {"A": shape, "B": shape}}`."""
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, t in tensors.items():
        m = _KEY_RE.match(key)
        if not m:
            raise IncompatibleError(f"tensor {key!r} is not a LoRA A/B weight of a Linear layer; only Linear LoRA is supported")
        out.setdefault(m["module"], {})[m["part"]] = tuple(t.shape)
    return out


def check_compatible(path: Path, base: "Base", fingerprint: str | None, label: str | None = None,
                     values: bool = False) -> None:
    """Every LoRA pair must sit on a Linear of `base` with matching in/out features, with the
    rank the config declares; every configured target must exist in `base`. With `values`,
    every tensor is also read and must be a finite float tensor (what import and training
    check before anything reaches the library). Errors name `label` (default: the folder)."""
    label = label or path.name
    if fingerprint and fingerprint != base.fingerprint:
        raise IncompatibleError(
            f"{label}: adapter was trained for base {fingerprint}, but the base is {base.fingerprint} ({base.name})"
        )
    from safetensors import safe_open

    config = read_adapter_config(path)
    shapes = base.linear_shapes()
    try:
        with safe_open(str(weights_path(path)), framework="pt") as f:
            tensors = {k: f.get_slice(k) for k in f.keys()}
            modules = lora_modules({k: _Shape(s.get_shape()) for k, s in tensors.items()})
            dtypes = {k: s.get_dtype() for k, s in tensors.items()}
    except LorastackError:
        raise
    except Exception as e:
        raise AdapterError(f"{label}: {WEIGHTS_FILE}: cannot read safetensors ({e})") from None
    if not modules:
        raise IncompatibleError(f"{label}: no LoRA weights found in {WEIGHTS_FILE}")
    bad_dtype = next((k for k, d in dtypes.items() if d not in _FLOAT_DTYPES), None)
    if bad_dtype:
        raise AdapterError(f"{label}: tensor {bad_dtype!r} has dtype {dtypes[bad_dtype]}; LoRA weights must be floating point")
    _check_targets(config, shapes, label, base)
    allowed_ranks = {config["r"], *(config.get("rank_pattern") or {}).values()}
    for module, parts in sorted(modules.items()):
        if module not in shapes:
            near = [s for s in shapes if s.rsplit(".", 1)[-1] == module.rsplit(".", 1)[-1]][:2]
            raise IncompatibleError(
                f"{label}: LoRA targets module {module!r}, which this base ({base.fingerprint}) does not have"
                + (f" (it has e.g. {', '.join(near)})" if near else "")
            )
        if set(parts) != {"A", "B"}:
            raise IncompatibleError(f"{label}: module {module!r} has lora_{'A' if 'A' in parts else 'B'} but not its pair")
        in_f, out_f = shapes[module]
        a, b = parts["A"], parts["B"]
        if len(a) != 2 or len(b) != 2 or a[1] != in_f or b[0] != out_f or a[0] != b[1]:
            raise IncompatibleError(
                f"{label}: shape mismatch at {module}: adapter has A {list(a)}, B {list(b)}, but the base "
                f"({base.fingerprint}) layer maps {in_f} -> {out_f} features (needs A [r, {in_f}], B [{out_f}, r])"
            )
        if a[0] not in allowed_ranks:
            raise IncompatibleError(f"{label}: {CONFIG_FILE} says r={config['r']}"
                                    + (f" (rank_pattern: {sorted(allowed_ranks - {config['r']})})" if len(allowed_ranks) > 1 else "")
                                    + f", but {module} has rank {a[0]}")
    if values:
        check_finite(path, label)


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
# The shapes of catastrophic backtracking (Python's `re` cannot be interrupted and holds the GIL).
NESTED_QUANTIFIER = re.compile(
    r"\((?:[^()\\]|\\.)*[*+}](?:[^()\\]|\\.)*\)\s*[*+{?]"  # a quantified group holding a quantifier: (a+)*
    r"|\((?:[^()\\]|\\.)*\|(?:[^()\\]|\\.)*\)\s*[*+{]"  # a quantified group of alternatives: (a|a)*
)


def _check_targets(config: dict[str, Any], shapes: dict[str, Any], label: str, base: "Base") -> None:
    """PEFT's `target_modules`: a list of module-name suffixes or one regex; each must hit a
    Linear of `base`, else the config describes a different model."""
    targets = config.get("target_modules")
    if not targets:
        return
    names = list(shapes)
    if targets == "all-linear":
        return
    if isinstance(targets, str):
        # Python's `re` cannot be interrupted and holds the GIL: a pattern with nested
        # quantifiers ((.*)*X) could stall the whole server for hours on a 40-character name.
        if len(targets) > MAX_REGEX or NESTED_QUANTIFIER.search(targets):
            raise AdapterError(f"{label}: {CONFIG_FILE}: target_modules regex is too long or nests quantifiers "
                               "(e.g. (a+)*); list the module names instead")
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise AdapterError(f"{label}: {CONFIG_FILE}: target_modules regex does not compile ({e})") from None
        if not any(pattern.fullmatch(n) for n in names):
            raise IncompatibleError(f"{label}: {CONFIG_FILE}: target_modules {targets!r} matches no layer of this base ({base.fingerprint})")
        return
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise AdapterError(f"{label}: {CONFIG_FILE}: target_modules must be a list of names or a regex string")
    missing = [t for t in targets if t != "all-linear" and not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        have = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise IncompatibleError(f"{label}: {CONFIG_FILE}: target_modules {missing} do not exist in this base "
                                f"({base.fingerprint}; its linear layers are {', '.join(have)})")


def check_finite(path: Path, label: str | None = None) -> None:
    """Every tensor finite and of sane magnitude: one NaN (or 1e38) in a LoRA factor turns
    every output of its route into NaN logits or garbage, seen only later as empty replies."""
    import torch
    from safetensors import safe_open

    label = label or path.name
    with safe_open(str(weights_path(path)), framework="pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if not bool(torch.isfinite(t).all()):
                raise AdapterError(f"{label}: tensor {key!r} holds NaN or infinite values")
            peak = float(t.abs().max()) if t.numel() else 0.0
            if peak > MAX_ABS_WEIGHT:
                raise AdapterError(f"{label}: tensor {key!r} has a value of magnitude {peak:.3g}; LoRA weights beyond "
                                   f"{MAX_ABS_WEIGHT:g} are corrupt (a trained adapter's stay far below 1)")


class _Shape:
    """Just enough of a tensor (its shape) to group keys without reading the data."""

    def __init__(self, shape: list[int]) -> None:
        self.shape = tuple(shape)


# ---------------------------------------------------------------- tensor I/O
# The one place that knows PEFT's LoRA key pattern and scaling rules. The engine (to load
# slots), routing (Arrow's prototypes) and composition (merge, few-shot, subtract) all read
# and write adapter tensors through these functions, so none of them imports another.

LORA_KEY = _KEY_RE  # `...<module>.lora_A|B[.<adapter>].weight`, with or without PEFT's prefix


def lora_scale(config: dict[str, Any], module: str, rank: int) -> float:
    """PEFT's scaling for `module`: `alpha / r`, or `alpha / sqrt(r)` with rslora.

    `alpha_pattern` overrides alpha per module (matched like PEFT: exact name, dotted suffix
    or regex); `rank` is the tensor's own rank, which already reflects any `rank_pattern`.
    """
    alpha = float(config.get("lora_alpha", config.get("r", rank)))
    for key, value in (config.get("alpha_pattern") or {}).items():
        if module == key or module.endswith("." + key) or re.search(key, module):
            alpha = float(value)
            break
    return alpha / (rank**0.5 if config.get("use_rslora") else rank)


@dataclass
class LoraPairs:
    """One adapter's LoRA factors in memory: `{module: (A [r, in], B_scaled [out, r])}`.

    PEFT's scaling is folded into B, so a module's weight update is exactly `B @ A` and
    adapters with different alpha/rank/rslora settings can be added without bookkeeping.
    """

    name: str
    modules: dict[str, tuple["torch.Tensor", "torch.Tensor"]]

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.modules.values())

    @property
    def targets(self) -> list[str]:
        """The short names of the targeted Linear layers (`q_proj`, ...), sorted."""
        return sorted({m.rsplit(".", 1)[-1] for m in self.modules})

    def delta(self, module: str) -> "torch.Tensor":
        """The dense weight update `[out, in]` of one module, in float32."""
        a, b = self.modules[module]
        return b.float() @ a.float()

    @classmethod
    def load(cls, adapter: Adapter, dtype: "torch.dtype | None" = None) -> "LoraPairs":
        """Read an adapter's A/B pairs with scaling folded into B (float32 unless `dtype`)."""
        return read_lora_pairs(adapter, dtype)


T = TypeVar("T")


def read_while_replaced(open_adapter: Callable[[], Adapter], read: Callable[[Adapter], T],
                        gone: Callable[[], Exception]) -> T:
    """`read(open_adapter())`, done again on the new copy when the adapter's directory was
    replaced while it was read, and `gone()` raised when it was removed meanwhile.

    A library overwrite renames a new directory in and a delete renames the old one aside,
    so a reader caught in between sees files vanish: that says nothing about the adapter,
    and a server must not fail the request with 'missing adapter_config.json'. A failure
    on a directory that did not change is a real defect and is raised as it is.
    """
    for attempt in range(READ_ATTEMPTS):
        adapter = open_adapter()
        before = dir_identity(adapter.path)
        try:
            return read(adapter)
        except AdapterError:
            after = dir_identity(adapter.path)
            if after is None:
                raise gone() from None
            if after != before and attempt + 1 < READ_ATTEMPTS:
                continue
            raise
    raise AssertionError("unreachable: the last attempt returns or raises")


def read_lora_pairs(adapter: Adapter, dtype: "torch.dtype | None" = None) -> LoraPairs:
    """Read every Linear LoRA pair of `adapter`; refuses DoRA and non-Linear tensors."""
    import torch

    cfg = adapter.config()
    if cfg.get("use_dora"):
        raise AdapterError(f"adapter {adapter.name!r} uses DoRA, which lorastack does not support")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in adapter.weights().items():
        m = LORA_KEY.match(key)
        if not m:
            raise AdapterError(f"adapter {adapter.name!r}: unsupported tensor {key!r} (only Linear LoRA)")
        parts.setdefault(m["module"], {})[m["part"]] = t
    modules = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"adapter {adapter.name!r}: module {module!r} lacks its lora_{'B' if 'A' in ab else 'A'} pair")
        a, b = ab["A"].to(torch.float32), ab["B"].to(torch.float32)
        scale = lora_scale(cfg, module, a.shape[0])
        out_dtype = dtype or torch.float32
        modules[module] = (a.to(out_dtype).contiguous(), (b * scale).to(out_dtype).contiguous())
    if not modules:
        raise AdapterError(f"adapter {adapter.name!r}: no LoRA weights in {WEIGHTS_FILE}")
    return LoraPairs(adapter.name, modules)


def write_peft_dir(out: Path, pairs: LoraPairs, template: dict[str, Any] | None = None,
                   card: dict[str, Any] | None = None) -> Path:
    """Write `pairs` as a PEFT LoRA directory that PEFT, the engine and the Library all load.

    Scaling is already folded into B, so the config says `lora_alpha = r` (scale 1). Modules
    whose rank is below the largest are zero-padded to it: exact (zero rank rows add
    nothing) and loadable by PEFT without a `rank_pattern`. `template` (a parent's
    adapter_config.json) supplies fields such as `base_model_name_or_path`.
    """
    import torch
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rank = pairs.rank
    tensors: dict[str, torch.Tensor] = {}
    for module, (a, b) in sorted(pairs.modules.items()):
        r = a.shape[0]
        if r < rank:
            a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])], 0)
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], 1)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.to(torch.float32).contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.to(torch.float32).contiguous()
    template = dict(template or {})
    config = {
        "peft_type": "LORA",
        "task_type": template.get("task_type", "CAUSAL_LM"),
        "base_model_name_or_path": template.get("base_model_name_or_path"),
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "use_dora": False,
        "target_modules": pairs.targets,
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    save_file(tensors, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
    if card is not None:
        (out / CARD_FILE).write_text(json.dumps(card, indent=2, default=str), encoding="utf-8")
    return out


def examples_jsonl(texts: list[str]) -> str:
    """The examples file's content for `texts` (what `Adapter.examples` reads back)."""
    return "".join(json.dumps({"text": t}) + "\n" for t in texts)
