"""Export: take an adapter (or a mixture SPEC) out of lorastack, in the formats other tools load.

- `peft`:   the PEFT adapter directory (a mixture becomes one exact `cat` adapter: the
            factors stacked, each parent's B scaled by its weight).
- `merged`: a Hugging Face model directory (config, tokenizer, safetensors) with the update
            added into the base's dequantized weights, for plain `transformers` and vLLM.
- `gguf`:   a llama.cpp LoRA adapter GGUF, written the way llama.cpp's own
            `convert_lora_to_gguf.py` writes one (same metadata keys, tensor names, Q/K
            row order), with the `gguf` package's writer.

Every export is built in a temporary sibling of DIR and renamed into place, so an
interrupted export leaves nothing under DIR.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .adapter import CARD_FILE, CONFIG_FILE, EXAMPLES_FILE, PLOT_FILE, WEIGHTS_FILE, LoraPairs, write_peft_dir
from .atomic import publish_dir, staging_dir, sweep_tmp
from .errors import IncompatibleError, LorastackError
from .route import AutoSpec, Route, StackRef, parse_spec

if TYPE_CHECKING:
    from .base import Base
    from .library import Library

MODES = ("peft", "merged", "gguf")
EXPORT_PREFIX = ".tmp-export-"
EXPORT_INFO = "lorastack_export.json"
GGUF_FILE = "adapter.gguf"


@dataclass
class ExportResult:
    spec: str
    mode: str
    path: Path
    files: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec, "mode": self.mode, "path": str(self.path), "files": self.files}


def export_route(spec: str, library: "Library") -> Route:
    """The fixed route a SPEC names; `auto` and stacks have no single set of weights to export."""
    parsed = parse_spec(spec)
    if isinstance(parsed, AutoSpec):
        raise LorastackError(f"{spec!r} is routed per input; export an adapter name or a mixture such as a:0.7+b:0.3")
    if isinstance(parsed, StackRef):
        raise LorastackError(f"{spec!r} is a stack of several routes; export its stages' adapters one by one")
    if parsed.is_base:
        raise LorastackError("'base' has no adapter to export; name an adapter or a mixture")
    for name in parsed.names:
        library.get(name)  # unknown names fail here, with close names suggested
    return parsed


def mixture_pairs(library: "Library", route: Route) -> LoraPairs:
    """One adapter's factors whose update is exactly `sum_i w_i * delta_i` (the engine's
    mixture): per module, the A factors stacked and each B scaled by its weight."""
    modules: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for name, weight in route.entries:
        for module, (a, b) in library.pairs(name).modules.items():
            As, Bs = modules.setdefault(module, ([], []))
            As.append(a)
            Bs.append(b * weight)
    return LoraPairs(str(route), {m: (torch.cat(As, 0), torch.cat(Bs, 1)) for m, (As, Bs) in modules.items()})


def check_base(library: "Library", route: Route, base: "Base") -> None:
    """Every adapter of the route must have been made for `base` (shapes and fingerprint)."""
    for name in route.names:
        adapter = library.get(name)
        fp = adapter.card.base_fingerprint
        if fp and fp != base.fingerprint:
            raise IncompatibleError(f"adapter {name!r} was trained for base {fp}, but the loaded base is {base.fingerprint} "
                                    f"({base.name}); pass the matching --base")
        adapter.check_compatible(base)


def check_request(library: "Library", spec: str, dest: str | Path, mode: str, force: bool) -> tuple[Route, Path]:
    """Everything about an export that can be refused before the base is loaded (seconds
    saved on a typo): the mode, the SPEC and its adapters, and the destination."""
    if mode not in MODES:
        raise LorastackError(f"unknown export mode {mode!r}; choose one of {', '.join(MODES)}")
    route = export_route(spec, library)
    dest = Path(dest).expanduser()
    # An export replaces its destination (--force): never one that holds or lies inside the
    # library (that would delete every adapter, or swap one adapter's files under its card),
    # nor the directory the user stands in or one above it.
    target, root, cwd = dest.resolve(), library.root.resolve(), Path.cwd().resolve()
    if target == root or root in target.parents or target in root.parents:
        raise LorastackError(f"{dest} overlaps the library at {library.root}; export to a directory outside it")
    if target == cwd or target in cwd.parents:
        raise LorastackError(f"{dest or '.'} is the current directory or holds it; export to a new directory")
    if dest.exists() and not dest.is_dir():
        raise LorastackError(f"{dest} exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise LorastackError(f"{dest} already exists and is not empty; use --force to replace it")
    return route, dest


def export(library: "Library", spec: str, dest: str | Path, *, mode: str = "peft", base: "Base | None" = None,
           force: bool = False, dtype: str = "float32") -> ExportResult:
    """Write `spec` (an adapter name or a mixture) to the directory `dest` in `mode`.

    `dest` must be missing or empty unless `force` (then it is replaced, atomically).
    `merged` and `gguf` need the `base` the adapters were trained on.
    """
    route, dest = check_request(library, spec, dest, mode, force)
    if mode != "peft":
        if base is None:
            raise LorastackError(f"a {mode} export needs the base model")
        check_base(library, route, base)
    dest.parent.mkdir(parents=True, exist_ok=True)
    sweep_tmp(dest.parent, prefix=EXPORT_PREFIX)  # leftovers of exports killed mid-way
    with staging_dir(dest.parent, prefix=EXPORT_PREFIX) as tmp:
        if mode == "peft":
            _write_peft(library, route, tmp)
        elif mode == "merged":
            _write_merged(library, route, base, tmp, dtype)
        else:
            _write_gguf(library, route, base, tmp, dtype)
        info = {"spec": str(route), "mode": mode, "route": route.to_json(),
                **({"base_fingerprint": base.fingerprint, "base_name": base.name} if base is not None else {})}
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2), encoding="utf-8")
        files = sorted(p.name for p in tmp.iterdir())
        # mkdtemp makes the staging directory private (0700), and some writers make files
        # 0600; an export is meant for other programs and users (a vLLM service account).
        os.chmod(tmp, 0o755)
        for f in files:
            os.chmod(tmp / f, 0o644)
        if dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()
        publish_dir(tmp, dest, replace=force)
    return ExportResult(str(route), mode, dest, files)


# ---------------------------------------------------------------- peft
def _write_peft(library: "Library", route: Route, out: Path) -> None:
    first = library.get(route.names[0])
    if len(route.entries) == 1 and route.entries[0][1] == 1.0:
        for f in (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, EXAMPLES_FILE, PLOT_FILE):
            if (first.path / f).exists():
                shutil.copy2(first.path / f, out / f)
        config = json.loads((out / CONFIG_FILE).read_text(encoding="utf-8"))
        (out / CONFIG_FILE).write_text(json.dumps(portable_config(config, first.card.base_name), indent=2), encoding="utf-8")
        return
    write_peft_dir(out, mixture_pairs(library, route), template=portable_config(first.config(), first.card.base_name),
                   card={"name": str(route), "description": f"mixture {route} exported from lorastack",
                         "composition": {"method": "cat", "parents": route.to_json()}})


def portable_config(config: dict[str, Any], base_name: str) -> dict[str, Any]:
    """`config` with a `base_model_name_or_path` another machine can use. Adapters on the
    embedded base were trained on its dequantized cache under LORASTACK_HOME, which PEFT wrote as
    the base path; the export names the Hugging Face model that GGUF was quantized from instead
    (PEFT's AutoPeftModel loads it from there). Other bases keep the path they were loaded from."""
    from .base import EMBEDDED_HUB_ID, EMBEDDED_NAME

    if base_name == EMBEDDED_NAME:
        config = {**config, "base_model_name_or_path": EMBEDDED_HUB_ID}
    return config


# ---------------------------------------------------------------- merged
# Why the exported chat template differs from the base's: lorastack renders every prompt
# with an explicit empty system turn (lorastack.base.DEFAULT_SYSTEM), and its adapters were
# trained on exactly that. Templates such as SmolLM2's insert a default system prompt when
# none is given, so a plain `apply_chat_template([user])` would show the merged model a
# prompt it never saw. The prefix makes the template's default the one lorastack used.
SYSTEM_PREFIX = ("{%- if messages and messages[0]['role'] != 'system' -%}"
                 "{%- set messages = [{'role': 'system', 'content': ''}] + messages -%}{%- endif -%}")


def merged_state(base: "Base", pairs: LoraPairs) -> torch.nn.Module:
    """A float32 copy of the base with `B @ A` added into every targeted Linear."""
    import copy

    model = copy.deepcopy(base.model).float()
    linears = dict(model.named_modules())
    with torch.no_grad():
        for module, (a, b) in pairs.modules.items():
            layer = linears.get(module)
            if layer is None or not isinstance(layer, torch.nn.Linear):
                raise LorastackError(f"the base has no Linear layer {module!r} for the adapter's update")
            layer.weight += b.float() @ a.float()
    return model


def _write_merged(library: "Library", route: Route, base: "Base", out: Path, dtype: str) -> None:
    from .base import DEFAULT_SYSTEM, resolve_dtype

    torch_dtype = resolve_dtype(dtype)
    model = merged_state(base, mixture_pairs(library, route)).to(torch_dtype)
    if hasattr(model.config, "quantization_config"):  # a GGUF-loaded base is dequantized by now
        del model.config.quantization_config
    model.config.dtype = torch_dtype
    model.config._name_or_path = ""
    # transformers' generate stops at the generation config's eos; lorastack stops at the
    # tokenizer's end-of-turn, so the export says the same.
    gen = model.generation_config
    gen.eos_token_id = base.eos_token_id
    gen.pad_token_id = base.tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer = base.tokenizer
    template = getattr(tokenizer, "chat_template", None)
    if template and DEFAULT_SYSTEM == "" and SYSTEM_PREFIX not in template:
        tokenizer = copy_tokenizer(tokenizer)
        tokenizer.chat_template = SYSTEM_PREFIX + template
    tokenizer.save_pretrained(out)


def copy_tokenizer(tokenizer: Any) -> Any:
    """A copy to change the template on, leaving the shared Base's tokenizer as it is."""
    import copy

    return copy.deepcopy(tokenizer)


# ---------------------------------------------------------------- gguf
def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's Q/K row order: within each head, rotary pairs interleaved instead of halves
    (the inverse of what transformers undoes when it reads a llama GGUF). Written from the
    layout, not copied: [heads, 2, half, ...] -> [heads, half, 2, ...]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(base: "Base", pairs: LoraPairs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`{gguf base tensor name: (lora_a [r, in], lora_b [out, r])}` in llama.cpp's layout,
    every module padded to one rank so that one `adapter.lora.alpha` (= rank) gives scale 1."""
    import gguf

    cfg = base.model.config
    if getattr(cfg, "model_type", None) not in ("llama",):
        raise LorastackError(f"GGUF export supports llama-architecture bases; this base is {getattr(cfg, 'model_type', '?')!r}")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    n_head, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    rank = pairs.rank
    out = {}
    for module, (a, b) in sorted(pairs.modules.items()):
        target = names.get_name(module)
        if target is None:
            raise LorastackError(f"no llama.cpp tensor name for module {module!r}")
        if module.endswith("q_proj"):
            b = permute_rows(b, n_head)
        elif module.endswith("k_proj"):
            b = permute_rows(b, n_kv)
        r = a.shape[0]
        if r < rank:  # zero rank rows add nothing
            a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])], 0)
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], 1)
        out[f"{target}.weight"] = (a.float().contiguous(), b.float().contiguous())
    return out


def _write_gguf(library: "Library", route: Route, base: "Base", out: Path, dtype: str = "float32") -> None:
    """`dtype` "float16" writes F16 factors (what llama.cpp's converter writes by default, half
    the bytes llama.cpp reads per token); anything else F32."""
    import gguf
    import numpy as np

    pairs = mixture_pairs(library, route)
    tensors = gguf_tensors(base, pairs)
    writer = gguf.GGUFWriter(out / GGUF_FILE, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    # Scaling is folded into B (LoraPairs), so alpha = rank makes llama.cpp's alpha / rank 1.
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(pairs.rank))
    writer.add_name(str(route))
    f16 = dtype == "float16"
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, (a, b) in tensors.items():
        writer.add_tensor(f"{name}.lora_a", a.numpy().astype(np.float16) if f16 else a.numpy())
        writer.add_tensor(f"{name}.lora_b", b.numpy().astype(np.float16) if f16 else b.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
