"""What `Runtime.start` returns: one generation in flight, whatever answers it.

A request may be answered by one engine row (a fixed route, or an `auto` decision), by a
stack of stages (many rows over time), or by the reference generator (bases the engine does
not serve). Callers — the server, the CLI, evaluation, the demo — see one shape: pieces of
the answer as they come (`stream`, or the `on_event` push given to `start`), the end
(`wait`/`result`), `cancel`, token counts and timings, and what decided the answer
(`decision` for routed requests, `trace` for stacks).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from .engine.engine import Request
from .engine.sampling import Generation


class Handle:
    """The common surface; subclasses fill in where the text comes from."""

    decision: Any = None  # routing.RouteDecision for `auto...`; the fixed route's decision otherwise
    trace: list | None = None  # stacks: every stage's input, route, output and timing
    model: str = ""  # what answered, for metrics: an adapter SPEC or stack/NAME

    # -- to be provided
    text: str
    finish_reason: str | None
    error: BaseException | None
    submitted_at: float
    first_token_at: float | None
    finished_at: float | None

    @property
    def done(self) -> bool:
        raise NotImplementedError

    @property
    def cancelled(self) -> bool:
        raise NotImplementedError

    @property
    def prompt_tokens(self) -> int:
        raise NotImplementedError

    @property
    def completion_tokens(self) -> int:
        raise NotImplementedError

    def wait(self, timeout: float | None = None) -> bool:
        raise NotImplementedError

    def cancel(self) -> None:
        raise NotImplementedError

    def stream(self, timeout: float | None = None) -> Iterator[str]:
        raise NotImplementedError

    # -- shared
    def result(self, timeout: float | None = None) -> Generation:
        if not self.wait(timeout):
            raise TimeoutError(f"not finished after {timeout}s")
        if self.error is not None:
            raise self.error
        return Generation(self.text, self.prompt_tokens, self.completion_tokens, self.finish_reason or "stop")


class EngineHandle(Handle):
    """One engine row. Attributes the handle does not define (`tokens`, `prompt_ids`, ...)
    are the engine request's, so code written against a request keeps working."""

    def __init__(self, request: Request, decision: Any = None, model: str = "") -> None:
        self.request = request
        self.decision = decision
        self.model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["request"], name)

    @property
    def done(self) -> bool:
        return self.request.done

    @property
    def cancelled(self) -> bool:
        return self.request.cancelled

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.request.tokens)

    def wait(self, timeout: float | None = None) -> bool:
        return self.request.wait(timeout)

    def cancel(self) -> None:
        self.request.cancel()

    def stream(self, timeout: float | None = None) -> Iterator[str]:
        return self.request.stream(timeout)

    def result(self, timeout: float | None = None) -> Generation:
        return self.request.result(timeout)


class DoneHandle(Handle):
    """An answer computed before `start` returned (the reference generator is synchronous)."""

    def __init__(self, generation: Generation, decision: Any = None, model: str = "") -> None:
        now = time.perf_counter()
        self.generation, self.decision, self.model = generation, decision, model
        self.text, self.finish_reason, self.error = generation.text, generation.finish_reason, None
        self.submitted_at = self.first_token_at = self.finished_at = now

    done = property(lambda self: True)
    cancelled = property(lambda self: False)
    prompt_tokens = property(lambda self: self.generation.prompt_tokens)
    completion_tokens = property(lambda self: self.generation.completion_tokens)

    def wait(self, timeout: float | None = None) -> bool:
        return True

    def cancel(self) -> None:
        pass

    def stream(self, timeout: float | None = None) -> Iterator[str]:
        yield self.text
