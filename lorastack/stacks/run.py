"""Running stacks through the engine: every stage is an ordinary engine request.

Many executions advance together in one event loop: whenever a stage's inputs are ready
its request is submitted, so stage 2 of one input decodes in the same batch as stage 1 of
another (and beside plain requests, when the server's engine loop is running). Independent
stages of one execution (the same wave of the DAG) are in flight at the same time, and a
map stage's items are all submitted at once. Every stage leaves a trace: rendered input,
route (with the router's scores for `auto`), raw and parsed output, tokens, time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..engine.engine import Engine
from ..engine.sampling import Sampling
from ..errors import LorastackError
from ..handle import Handle
from ..route import AutoSpec
from .spec import MAX_MAP_ITEMS, Stage, StackError, StackSpec, map_items

if TYPE_CHECKING:
    from ..runtime import Runtime


@dataclass
class StageTrace:
    stage: str
    kind: str
    input: str | list[str]
    route: str | list[str] | None = None
    scores: dict[str, float] | list[dict[str, float]] | None = None
    abstained: bool | None = None
    raw: str | list[str] | None = None
    output: str = ""
    ms: float = 0.0
    completion_tokens: int = 0
    prompt_tokens: int = 0

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class StackResult:
    stack: str
    input: str
    output: str
    trace: list[StageTrace]
    seconds: float
    error: str | None = None

    @property
    def completion_tokens(self) -> int:
        return sum(t.completion_tokens for t in self.trace)

    @property
    def prompt_tokens(self) -> int:
        return sum(t.prompt_tokens for t in self.trace)

    def to_json(self) -> dict[str, Any]:
        return {"stack": self.stack, "input": self.input, "output": self.output, "error": self.error,
                "seconds": round(self.seconds, 4), "completion_tokens": self.completion_tokens,
                "prompt_tokens": self.prompt_tokens, "trace": [t.to_json() for t in self.trace]}


@dataclass
class _Execution:
    input: str
    outputs: dict[str, str] = field(default_factory=dict)
    started: set[str] = field(default_factory=set)
    traces: dict[str, StageTrace] = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)
    stage_t0: dict[str, float] = field(default_factory=dict)
    inflight: dict[str, list[Handle]] = field(default_factory=dict)
    error: str | None = None
    finished: float | None = None
    reported: bool = False

    def cancel_inflight(self) -> None:
        """Cancel the engine rows of every running stage (the execution failed or was cancelled)."""
        for reqs in self.inflight.values():
            for r in reqs:
                r.cancel()


class StackRunner:
    """Executes stack specs on a Runtime's engine."""

    def __init__(self, runtime: "Runtime") -> None:
        if not isinstance(runtime.generator, Engine):
            raise LorastackError("stacks run on the engine, which supports Llama-family bases")
        self.runtime = runtime
        self.engine: Engine = runtime.generator

    def check(self, spec: StackSpec) -> None:
        """Every stage's model SPEC must parse and name served adapters (one-line error)."""
        for s in spec.stages:
            if s.model is not None:
                try:
                    self.runtime.route(s.model)
                except LorastackError as e:
                    raise StackError(f"stack {spec.name!r}, stage {s.name!r}: {e}") from None

    def run(self, spec: StackSpec, text: str, on_output: Callable[[str | None], None] | None = None) -> StackResult:
        """One execution. `on_output` receives the answer's text pieces as the output stage
        decodes (model stages without parse steps stream token by token), then None."""
        return self.run_many(spec, [text], on_output=on_output)[0]

    def run_many(self, spec: StackSpec, texts: list[str], on_output: Callable[[str | None], None] | None = None,
                 on_done: Callable[[int], None] | None = None) -> list[StackResult]:
        """Many executions at once (their stages share the engine's batches); blocks until all end.
        `on_output` streams the answer of a single execution; `on_done(k)` counts finished ones."""
        from .handle import driver

        self.check(spec)
        handles = [driver(self.runtime).start(spec, t, on_output if len(texts) == 1 else None) for t in texts]
        for h in handles:
            h.wait()
            if on_done:
                on_done(1)
        if on_output is not None and len(texts) != 1:
            on_output(handles[0].text if handles else "")
            on_output(None)
        return [h.stack_result for h in handles]  # type: ignore[misc]

    # ------------------------------------------------------------ one execution
    def _advance(self, spec: StackSpec, ex: _Execution, on_output: Callable[[str | None], None] | None) -> bool:
        """Collect finished stages and start the ones whose inputs are ready; True if anything moved."""
        moved = False
        for name, reqs in list(ex.inflight.items()):
            if all(r.done for r in reqs):
                del ex.inflight[name]
                self._collect(spec.stage(name), ex, reqs)
                moved = True
        if ex.error is None:
            for wave in spec.order:
                for name in wave:
                    stage = spec.stage(name)
                    if name in ex.started or not all(r in ex.outputs for r in stage.refs):
                        continue
                    ex.started.add(name)
                    ex.stage_t0[name] = time.perf_counter()
                    moved = True
                    try:
                        self._start(stage, ex, on_output if name == spec.output else None)
                    except LorastackError as e:
                        ex.error = f"stage {name!r}: {e}"
        if ex.error is not None and not ex.inflight:
            ex.finished = time.perf_counter()
        elif spec.output in ex.outputs and not ex.inflight:
            ex.finished = time.perf_counter()
        elif ex.error is not None:
            ex.cancel_inflight()
        return moved

    def _start(self, stage: Stage, ex: _Execution, on_output: Callable[[str | None], None] | None) -> None:
        if stage.kind == "transform":
            rendered = _capped(stage.prompt.render(ex.input, ex.outputs), "input")
            ex.outputs[stage.name] = _capped(stage.finish(rendered), "output")
            ex.traces[stage.name] = StageTrace(stage.name, "transform", rendered, raw=rendered, output=ex.outputs[stage.name],
                                               ms=_ms(ex.stage_t0[stage.name]))
            return
        if stage.kind == "model":
            prompts = [stage.prompt.render(ex.input, ex.outputs)]
        else:
            items = map_items(stage.over.render(ex.input, ex.outputs), stage.split)  # type: ignore[union-attr]
            if len(items) > MAX_MAP_ITEMS:
                raise StackError(f"map over {len(items)} items; at most {MAX_MAP_ITEMS}")
            prompts = [stage.prompt.render(ex.input, ex.outputs, item=it) for it in items]
        sampling = Sampling(max_tokens=stage.max_tokens, temperature=stage.temperature, stop=stage.stop)
        # The same prompt-length limit as a plain request: a stage must not be a way around it.
        ids = [self.runtime.base.chat_ids([{"role": "user", "content": _capped(p, "prompt")}]) for p in prompts]
        longest = max((len(i) for i in ids), default=0)
        if longest > MAX_STAGE_PROMPT_TOKENS:
            raise StackError(f"prompt is {longest} tokens; a stage takes at most {MAX_STAGE_PROMPT_TOKENS} (the server's prompt cap)")
        try:
            self.runtime.base.check_answer_fits(longest, stage.max_tokens)
        except LorastackError as e:
            raise StackError(str(e)) from None
        decisions = self.runtime.decide(stage.model, prompts) if prompts else []  # type: ignore[arg-type]
        stream = on_output if (stage.kind == "model" and not stage.parse) else None
        reqs = [self.runtime.start(d.route, i, sampling, decision=d, on_event=stream) for i, d in zip(ids, decisions)]
        routed = isinstance(_parsed(self.runtime, stage.model), AutoSpec)
        trace = StageTrace(stage.name, stage.kind, prompts[0] if stage.kind == "model" else prompts,
                           route=str(decisions[0].route) if stage.kind == "model" else [str(d.route) for d in decisions])
        if routed:
            trace.scores = decisions[0].scores if stage.kind == "model" else [d.scores for d in decisions]
            trace.abstained = decisions[0].abstained if stage.kind == "model" else None
        ex.traces[stage.name] = trace
        if not reqs:  # a map over an empty list
            ex.outputs[stage.name] = stage.finish("")
            trace.raw, trace.output = [], ex.outputs[stage.name]
            return
        ex.inflight[stage.name] = reqs

    def _collect(self, stage: Stage, ex: _Execution, reqs: list[Handle]) -> None:
        trace = ex.traces[stage.name]
        failed = next((r.error for r in reqs if r.error is not None), None)
        trace.completion_tokens = sum(r.completion_tokens for r in reqs)
        trace.prompt_tokens = sum(r.prompt_tokens for r in reqs)
        trace.ms = _ms(ex.stage_t0[stage.name])
        if failed is not None:
            ex.error = ex.error or f"stage {stage.name!r}: {failed}"
            return
        texts = [r.text for r in reqs]
        if stage.kind == "model":
            trace.raw = texts[0]
            ex.outputs[stage.name] = stage.finish(texts[0])
        else:
            trace.raw = texts
            ex.outputs[stage.name] = stage.join.join(stage.finish(t) for t in texts)
        trace.output = ex.outputs[stage.name]


def _parsed(runtime: "Runtime", spec: str | None):
    from ..route import parse_spec

    return parse_spec(spec) if spec else None


MAX_STAGE_PROMPT_TOKENS = 4096  # as the server's default prompt cap
MAX_STAGE_TEXT = 64 << 10  # characters: a transform repeating its input must not grow without bound


def _capped(text: str, what: str) -> str:
    if len(text) > MAX_STAGE_TEXT:
        raise StackError(f"{what} is {len(text)} characters; a stage's is at most {MAX_STAGE_TEXT}")
    return text


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)
