"""Training a stack from one file: one adapter per stage marked `train: true`.

Records carry the intermediate targets (`{"prompt", "stages": {"extract": ...}, "completion"}`).
Each trainable stage learns on the inputs it will see at run time — its prompt template
rendered over the record's input and the *reference* outputs of the stages it reads
(teacher forcing) — with that stage's reference output as the target (the final stage may
use `completion`). The stage's `model` names the adapter that training writes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..data import Record, prompt_text
from ..errors import DataError
from ..names import validate_name
from ..route import Route, parse_spec
from .spec import StackError, StackSpec, map_items

if TYPE_CHECKING:
    from ..adapter import Adapter
    from ..base import Base
    from ..library import Library
    from ..train import TrainConfig


def stage_records(spec: StackSpec, records: list[Record]) -> dict[str, list[Record]]:
    """Per trainable stage, the (rendered prompt, reference output) records it learns from.

    Stages read the *reference* outputs of the model stages before them (teacher forcing);
    transform stages are computed, since they are deterministic and the run computes them
    the same way. A trainable map stage learns per item: the items of its list paired with
    its reference output split on its `join` (records where the counts differ are skipped).
    """
    trainable = [s for s in spec.stages if s.train]
    if not trainable:
        raise StackError(f"stack {spec.name!r}: no stage is marked 'train: true'")
    for s in trainable:
        if s.kind == "transform":
            raise StackError(f"stack {spec.name!r}, stage {s.name!r}: only model and map stages can be trained (this is a transform stage)")
        route = parse_spec(s.model or "")
        if not isinstance(route, Route) or len(route.entries) != 1 or route.entries[0][1] != 1.0:
            raise StackError(f"stack {spec.name!r}, stage {s.name!r}: a trained stage's model must be one adapter name, not {s.model!r}")
        validate_name(route.names[0])
    order = [spec.stage(n) for wave in spec.order for n in wave]
    out: dict[str, list[Record]] = {s.name: [] for s in trainable}
    for i, r in enumerate(records, start=1):
        refs = r.get("stages")
        if not isinstance(refs, dict):
            raise DataError(f"record {i}: needs 'stages' with each stage's reference output (e.g. {{\"{trainable[0].name}\": \"...\"}})")
        outputs = {k: v for k, v in refs.items() if isinstance(v, str)}
        outputs.setdefault(spec.output, r["completion"])
        text = prompt_text(r)
        for s in order:
            if s.kind == "transform" and all(ref in outputs for ref in s.refs):
                outputs[s.name] = s.finish(s.prompt.render(text, outputs))
        for s in trainable:
            missing = [ref for ref in s.refs if ref not in outputs]
            if s.name not in outputs or missing:
                need = [s.name] if s.name not in outputs else missing
                raise DataError(f"record {i}: 'stages' has no reference output for stage {need[0]!r}")
            if s.kind == "map":
                items = map_items(s.over.render(text, outputs), s.split)  # type: ignore[union-attr]
                targets = [t.strip() for t in outputs[s.name].split(s.join) if t.strip()]
                if len(items) == len(targets):
                    out[s.name] += [{"prompt": s.prompt.render(text, outputs, item=it), "completion": t}
                                    for it, t in zip(items, targets)]
                continue
            out[s.name].append({"prompt": s.prompt.render(text, outputs), "completion": outputs[s.name]})
    for name, recs in out.items():
        if not recs:
            raise DataError(f"stage {name!r}: no record gives it a usable reference (a map stage's output must split into one answer per item)")
    return out


def train_stack(base: "Base", library: "Library", spec: StackSpec, records: list[Record], config: "TrainConfig",
                overwrite: bool = False, progress: bool = True) -> list["Adapter"]:
    """Train every `train: true` stage's adapter into the library; returns them in stage order.

    Stages that name the same adapter (one step repeated, e.g. the picks of a selection sort)
    train it once, on all their records together, for `config.steps` steps."""
    from ..train import train_to_library

    per_stage = stage_records(spec, records)
    per_adapter: dict[str, list[str]] = {}
    for s in spec.stages:
        if s.name in per_stage:
            per_adapter.setdefault(parse_spec(s.model or "").names[0], []).append(s.name)  # type: ignore[union-attr]
    adapters = []
    for name, stages in per_adapter.items():
        recs = [r for st in stages for r in per_stage[st]]
        adapters.append(train_to_library(
            base, library, recs, name, config, overwrite=overwrite, progress=progress,
            description=f"stage {stages[0]!r} of stack {spec.name!r}" if len(stages) == 1
            else f"stages {', '.join(stages)} of stack {spec.name!r}",
            data_info={"stack": spec.name, "stage": stages[0] if len(stages) == 1 else stages, "records": len(recs)},
        ))
    return adapters
