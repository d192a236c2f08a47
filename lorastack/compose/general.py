"""A general adapter for GenKnowSub, made offline by self-distillation.

GenKnowSub subtracts a "general knowledge" adapter from every task adapter before they are
composed. The paper trains it on general instruction data; offline, the only general
teacher here is the base itself, so the data are generic chat requests written in lorastack
(`tasks/generic.py`, the ones routing calibrates on) or the user's own prompts, each answered
greedily by the bare base. A LoRA trained on those answers holds what fine-tuning on
chat-formatted data does to the base whatever the task (sharpening toward its own replies,
the chat format), which is the shared component subtraction is meant to remove.

The adapter is marked `routable: false` on its card: it is a tool for `--subtract`, and
`auto` must never answer a request with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..engine.sampling import Sampling
from ..errors import LorastackError
from ..tasks.generic import calibration_prompts

if TYPE_CHECKING:
    from ..adapter import Adapter
    from ..base import Base
    from ..data import Record
    from ..runtime import Runtime
    from ..train import TrainConfig

DEFAULT_PROMPTS = 256
DEFAULT_MAX_TOKENS = 128
# Answers still running at max_tokens are dropped: trained with the EOS that closes every
# record, a cut answer would teach the adapter to stop mid-sentence.
MIN_KEPT_SHARE = 0.25


def self_distilled_records(runtime: "Runtime", prompts: list[str] | None = None, n: int = DEFAULT_PROMPTS,
                           max_tokens: int = DEFAULT_MAX_TOKENS) -> tuple[list["Record"], int]:
    """(records {prompt, completion}, answers dropped for running past max_tokens): `prompts`
    (default: `n` built-in generic requests) answered greedily by the bare base, all at once
    so the engine batches them."""
    prompts = list(prompts) if prompts is not None else calibration_prompts(n)
    if not prompts:
        raise LorastackError("no prompts to distil a general adapter from")
    sampling = Sampling(max_tokens=max_tokens, temperature=0.0)
    handles = [runtime.start("base", p, sampling) for p in prompts]
    records: list[Record] = []
    dropped = 0
    for prompt, handle in zip(prompts, handles):
        g = handle.result()
        if g.finish_reason == "length" or not g.text.strip():
            dropped += 1
        else:
            records.append({"prompt": prompt, "completion": g.text})
    if len(records) < max(1, MIN_KEPT_SHARE * len(prompts)):
        raise LorastackError(f"only {len(records)} of {len(prompts)} answers ended within {max_tokens} tokens; "
                             f"raise --max-tokens")
    return records, dropped


def train_general(base: "Base", runtime: "Runtime", name: str, config: "TrainConfig", *, prompts: list[str] | None = None,
                  n: int = DEFAULT_PROMPTS, max_tokens: int = DEFAULT_MAX_TOKENS, source: str = "built-in generic prompts",
                  overwrite: bool = False, progress: bool = True,
                  log: Callable[[str], None] | None = None) -> "Adapter":
    """Distil the base's answers and train `name` on them into the library, marked unroutable.

    `base` is the float32 copy training needs; `runtime` (same base, any dtype) answers the prompts.
    """
    from ..train import train_to_library

    runtime.library.check_new(name, overwrite)  # before minutes of generation
    records, dropped = self_distilled_records(runtime, prompts, n, max_tokens)
    if log is not None:
        log(f"distilled {len(records)} answers of the base ({dropped} dropped: still running at {max_tokens} tokens)")
    adapter = train_to_library(
        base, runtime.library, records, name, config, overwrite=overwrite, progress=progress, log=log,
        description=f"General adapter (GenKnowSub): the base's own answers to {len(records)} {source}; "
                    f"use it with --subtract {name}",
        data_info={"source": f"self-distillation on {source}", "records": len(records), "dropped_unfinished": dropped,
                   "max_tokens": max_tokens},
        n_examples=0, card={"routable": False},
    )
    runtime.refresh(name)
    return adapter
