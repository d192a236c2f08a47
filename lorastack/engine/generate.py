"""Reference generation through PEFT + HF `generate`, one Route per call.

The engine (`engine.py`) is the serving path; this one stays as the fallback for model
architectures the engine's own forward does not cover, and as the PEFT reference that
tests and benchmarks compare the engine against.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..base import Base
from ..errors import LorastackError
from ..route import Route
from .sampling import Generation, Messages, Sampling

@dataclass
class Generator:
    """Generates for lists of conversations under a Route; adapters come from a resolver.

    `resolve(name)` returns the adapter directory; it is a callable rather than a Library
    so the engine does not depend on how adapters are stored.
    """

    base: Base
    resolve: Callable[[str], str] | None = None
    max_resident: int = 16
    _peft: object | None = field(default=None, init=False, repr=False)
    _resident: OrderedDict[str, None] = field(default_factory=OrderedDict, init=False, repr=False)
    adapter_load_seconds: list[float] = field(default_factory=list, init=False, repr=False)

    # ------------------------------------------------------------ adapters
    def _ensure_loaded(self, name: str) -> None:
        if name in self._resident:
            self._resident.move_to_end(name)
            return
        if self.resolve is None:
            raise LorastackError(f"adapter {name!r} requested but no library is attached")
        path = self.resolve(name)
        t0 = time.perf_counter()
        if self._peft is None:
            from peft import PeftModel

            self._peft = PeftModel.from_pretrained(self.base.model, path, adapter_name=name, is_trainable=False)
        else:
            self._peft.load_adapter(path, adapter_name=name, is_trainable=False)
        self._peft.eval()
        self.adapter_load_seconds.append(time.perf_counter() - t0)
        self._resident[name] = None
        self._evict()

    def _evict(self) -> None:
        while len(self._resident) > self.max_resident:
            old, _ = self._resident.popitem(last=False)
            self._peft.delete_adapter(old)

    def _mixture(self, route: Route) -> str:
        """A weighted sum of LoRA deltas as one PEFT adapter (`cat` keeps it exact)."""
        key = "mix__" + str(route).replace(":", "_").replace("+", "__").replace(".", "p")
        if key in self._resident:
            self._resident.move_to_end(key)
            return key
        for n in route.names:
            self._ensure_loaded(n)
        self._peft.add_weighted_adapter(
            list(route.names), [w for _, w in route.entries], adapter_name=key, combination_type="cat"
        )
        self._resident[key] = None
        self._evict()
        return key

    @contextlib.contextmanager
    def _activated(self, route: Route) -> Iterator[torch.nn.Module]:
        if route.is_base:
            if self._peft is None:
                yield self.base.model
            else:
                with self._peft.disable_adapter():
                    yield self._peft
            return
        if len(route.entries) == 1 and route.entries[0][1] == 1.0:
            name = route.entries[0][0]
            self._ensure_loaded(name)
        else:
            name = self._mixture(route)
        self._peft.set_adapter(name)
        yield self._peft

    # ------------------------------------------------------------ decoding
    @torch.inference_mode()
    def generate(
        self,
        conversations: list[Messages],
        route: Route,
        sampling: Sampling = Sampling(),
        batch_size: int = 32,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[Generation]:
        """Generate one reply per conversation; prompts are length-sorted to cut padding."""
        if sampling.constraint is not None:
            raise LorastackError("structured output (JSON / JSON schema) needs the engine, which supports Llama-family bases")
        tok = self.base.tokenizer
        encoded = [self.base.chat_ids(c) for c in conversations]
        self.base.answer_room(max((len(e) for e in encoded), default=0))  # refuses a prompt that fills the context
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        results: list[Generation | None] = [None] * len(encoded)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        pad = tok.pad_token_id
        eos = self.base.eos_token_id
        with self._activated(route) as model:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                width = max(len(encoded[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):  # left padding keeps every row's last token aligned
                    seq = encoded[i]
                    ids[row, width - len(seq) :] = torch.tensor(seq)
                    mask[row, width - len(seq) :] = 1
                # Answers stop at the base's context (finish_reason "length"), as in the engine.
                kwargs: dict = dict(max_new_tokens=min(sampling.max_tokens, self.base.answer_room(width)), eos_token_id=eos, pad_token_id=pad)
                if sampling.temperature > 0:
                    kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None)
                else:
                    kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
                out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
                for row, i in enumerate(idx):
                    results[i] = self._finish(out[row, width:].tolist(), len(encoded[i]), sampling)
                if on_batch:
                    on_batch(len(idx))
        return [r for r in results if r is not None]

    def _finish(self, new_ids: list[int], prompt_len: int, sampling: Sampling) -> Generation:
        eos = self.base.eos_token_id
        reason = "length"
        if eos in new_ids:
            new_ids = new_ids[: new_ids.index(eos)]
            reason = "stop"
        text = self.base.tokenizer.decode(new_ids, skip_special_tokens=True)
        for s in sampling.stop:
            if s and s in text:
                text = text[: text.index(s)]
                reason = "stop"
        return Generation(text=text, prompt_tokens=prompt_len, completion_tokens=len(new_ids), finish_reason=reason)
