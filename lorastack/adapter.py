"""An Adapter: one LoRA expert in PEFT's on-disk format plus lorastack's `card.json`.

The PEFT files (`adapter_config.json`, `adapter_model.safetensors`) stay exactly as PEFT
writes them, so adapters go in and out of lorastack without conversion. Weights are read
from safetensors only: a pickle (`.bin`) can run code on load, so it is refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import IncompatibleError, LorastackError

if TYPE_CHECKING:
    import torch

    from .base import Base

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CARD_FILE = "card.json"
EXAMPLES_FILE = "examples.jsonl"
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
    card_version: int = CARD_VERSION


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{path.parent}: missing {path.name} ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    return obj


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
        raw.setdefault("rank", int(config.get("r", 0)))
        raw.setdefault("alpha", float(config.get("lora_alpha", 0)))
        targets = config.get("target_modules") or []
        raw.setdefault("target_modules", sorted(targets) if isinstance(targets, list) else [targets])
        try:
            card = AdapterCard.model_validate(raw)
        except ValidationError as e:
            raise AdapterError(f"{card_path}: invalid card: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}") from None
        return cls(path=path, card=card)

    def config(self) -> dict[str, Any]:
        return read_adapter_config(self.path)

    def weights(self) -> dict[str, "torch.Tensor"]:
        """The LoRA tensors, from safetensors only."""
        from safetensors.torch import load_file

        try:
            return load_file(str(weights_path(self.path)))
        except Exception as e:  # a truncated or foreign file: say which
            raise AdapterError(f"{weights_path(self.path)}: cannot read safetensors ({e})") from None

    def examples(self) -> list[str]:
        """Sample inputs stored with the adapter (for routing signatures)."""
        p = self.path / EXAMPLES_FILE
        if not p.exists():
            return []
        return [json.loads(line)["text"] for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]

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
        raise AdapterError(f"{path}: peft_type is {config.get('peft_type')!r}; lorastack handles LoRA adapters only")
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        raise AdapterError(f"{path / CONFIG_FILE}: 'r' must be a positive integer, got {config.get('r')!r}")
    return config


def weights_path(path: Path) -> Path:
    p = path / WEIGHTS_FILE
    if p.is_file():
        return p
    pickles = [f for f in PICKLE_FILES if (path / f).exists()]
    if pickles:
        raise AdapterError(
            f"{path}: has {pickles[0]} (pickle) but no {WEIGHTS_FILE}; lorastack never loads pickle weights "
            "because they can run code. Re-save with safetensors (PEFT's save_pretrained does by default)."
        )
    raise AdapterError(f"{path}: missing {WEIGHTS_FILE}")


def lora_modules(tensors: dict[str, "torch.Tensor"]) -> dict[str, dict[str, tuple[int, ...]]]:
    """Group LoRA tensors by the base module they modify: `{module: {"A": shape, "B": shape}}`."""
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, t in tensors.items():
        m = _KEY_RE.match(key)
        if not m:
            raise IncompatibleError(f"tensor {key!r} is not a LoRA A/B weight of a Linear layer; only Linear LoRA is supported")
        out.setdefault(m["module"], {})[m["part"]] = tuple(t.shape)
    return out


def check_compatible(path: Path, base: "Base", fingerprint: str | None) -> None:
    """Every LoRA pair must sit on a Linear of `base` with matching in/out features."""
    if fingerprint and fingerprint != base.fingerprint:
        raise IncompatibleError(
            f"{path.name}: adapter was trained for base {fingerprint}, but the base is {base.fingerprint} ({base.name})"
        )
    from safetensors import safe_open

    shapes = base.linear_shapes()
    try:
        with safe_open(str(weights_path(path)), framework="pt") as f:
            tensors = {k: f.get_slice(k) for k in f.keys()}
            modules = lora_modules({k: _Shape(s.get_shape()) for k, s in tensors.items()})
    except LorastackError:
        raise
    except Exception as e:
        raise AdapterError(f"{weights_path(path)}: cannot read safetensors ({e})") from None
    if not modules:
        raise IncompatibleError(f"{path.name}: no LoRA weights found in {WEIGHTS_FILE}")
    for module, parts in sorted(modules.items()):
        if module not in shapes:
            near = [s for s in shapes if s.rsplit(".", 1)[-1] == module.rsplit(".", 1)[-1]][:2]
            raise IncompatibleError(
                f"{path.name}: LoRA targets module {module!r}, which this base ({base.fingerprint}) does not have"
                + (f" (it has e.g. {', '.join(near)})" if near else "")
            )
        if set(parts) != {"A", "B"}:
            raise IncompatibleError(f"{path.name}: module {module!r} has lora_{'A' if 'A' in parts else 'B'} but not its pair")
        in_f, out_f = shapes[module]
        a, b = parts["A"], parts["B"]
        if len(a) != 2 or len(b) != 2 or a[1] != in_f or b[0] != out_f or a[0] != b[1]:
            raise IncompatibleError(
                f"{path.name}: shape mismatch at {module}: adapter has A {list(a)}, B {list(b)}, but the base "
                f"({base.fingerprint}) layer maps {in_f} -> {out_f} features (needs A [r, {in_f}], B [{out_f}, r])"
            )


class _Shape:
    """Just enough of a tensor (its shape) to group keys without reading the data."""

    def __init__(self, shape: list[int]) -> None:
        self.shape = tuple(shape)
