"""Stack executions as handles (what `Runtime.start` returns for `stack/NAME`).

One driver thread per runtime advances every live execution: it starts the stages whose
inputs are ready, collects the ones the engine finished, and sleeps on the engine in
between. Executions therefore cost no thread each, and their stages share the engine's
batches with each other and with plain requests (stage 2 of one request decodes beside
stage 1 of another). Cancelling a handle (a client that went away) cancels the engine rows
of its running stages and starts no further stage.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..engine.pieces import Pieces
from ..errors import EngineError, LorastackError
from ..handle import Handle
from ..route import StackRef
from .run import StackResult, StackRunner, _Execution
from .spec import StackSpec
from .store import StackStore

if TYPE_CHECKING:
    from ..runtime import Runtime

IDLE_EXIT_S = 30.0  # the driver thread ends after this long with nothing to do (the next start makes a new one)


class StackHandle(Handle):
    def __init__(self, spec: StackSpec, text: str, on_event: Callable[[str | None], None] | None) -> None:
        self.spec, self.ex = spec, _Execution(text)
        self.model = f"stack/{spec.name}"
        self.text, self.finish_reason, self.error = "", None, None
        self.submitted_at, self.first_token_at, self.finished_at = time.perf_counter(), None, None
        self._pieces = Pieces(on_event)
        self._cancelled = False
        self._streamed = False
        self.stack_result: StackResult | None = None

    # -- pieces of the answer
    def _push(self, piece: str | None) -> None:
        if piece and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self._pieces.push(piece)

    def on_output(self, piece: str | None) -> None:
        """The output stage's streamed pieces (its final None is replaced by `_finish`'s)."""
        if piece is not None:
            self._streamed = True
            self._push(piece)

    def _finish(self, result: StackResult) -> None:
        self.stack_result = result
        self.trace = result.trace
        self.text = result.output
        if result.error is not None:
            # A stage that failed is the server's fault as far as the caller can tell (500).
            self.error = EngineError(f"stack/{self.spec.name} failed at {result.error}")
        elif not self._streamed and result.output:
            self._push(result.output)
        self.finish_reason = "stop"
        self.finished_at = time.perf_counter()
        self._pieces.close()

    # -- Handle
    @property
    def done(self) -> bool:
        return self._pieces.done

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def prompt_tokens(self) -> int:
        return sum(t.prompt_tokens for t in self.ex.traces.values())

    @property
    def completion_tokens(self) -> int:
        return sum(t.completion_tokens for t in self.ex.traces.values())

    def wait(self, timeout: float | None = None) -> bool:
        return self._pieces.wait(timeout)

    def cancel(self) -> None:
        self._cancelled = True

    def stream(self, timeout: float | None = None) -> Iterator[str]:
        return self._pieces.stream(lambda: self.error, timeout)


class StackDriver:
    """Advances every live stack execution of one runtime, on one thread."""

    def __init__(self, runner: StackRunner) -> None:
        self.runner = runner
        self._live: list[StackHandle] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None

    def start(self, spec: StackSpec, text: str, on_event: Callable[[str | None], None] | None = None) -> StackHandle:
        self.runner.check(spec)  # a stage naming a missing adapter fails now, with one line
        self.runner.engine.start()
        handle = StackHandle(spec, text, on_event)
        with self._cv:
            self._live.append(handle)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="lorastack-stacks", daemon=True)
                self._thread.start()
            self._cv.notify()
        return handle

    def _loop(self) -> None:
        while True:
            with self._cv:
                idle_since = time.monotonic()
                while not self._live:
                    if time.monotonic() - idle_since > IDLE_EXIT_S:
                        self._thread = None
                        return
                    self._cv.wait(1.0)
                live = list(self._live)
            progressed = False
            for h in live:
                progressed |= self._advance(h)
            waiting = [r for h in live if not h.done for reqs in h.ex.inflight.values() for r in reqs]
            if waiting and not progressed:
                waiting[0].wait(0.02)

    def _advance(self, h: StackHandle) -> bool:
        ex = h.ex
        try:
            if h.cancelled and ex.error is None:
                ex.error = "cancelled by the client"  # the runner then starts no stage and cancels the running ones
            moved = self.runner._advance(h.spec, ex, h.on_output)
        except Exception as e:  # noqa: BLE001 - one broken execution must not stop the others
            ex.error = ex.error or f"internal error: {type(e).__name__}: {e}"
            ex.cancel_inflight()
            ex.inflight.clear()
            ex.finished = time.perf_counter()
            moved = True
        if ex.finished is not None and not h.done:
            trace = [ex.traces[s.name] for s in h.spec.stages if s.name in ex.traces]
            h._finish(StackResult(h.spec.name, ex.input, ex.outputs.get(h.spec.output, ""), trace,
                                  ex.finished - ex.t0, ex.error))
            with self._cv:
                self._live.remove(h)
            return True
        return moved


def driver(runtime: "Runtime") -> StackDriver:
    """The runtime's stack driver, made on first use."""
    existing = getattr(runtime, "_stack_driver", None)
    if existing is None:
        existing = StackDriver(StackRunner(runtime))
        runtime._stack_driver = existing  # type: ignore[attr-defined]
    return existing


def resolve(runtime: "Runtime", spec: Any) -> StackSpec:
    """A StackSpec as given, or the stored spec of `stack/NAME`."""
    if isinstance(spec, StackRef):
        return StackStore(runtime.library.root).get(spec.name)
    if isinstance(spec, StackSpec):
        return spec
    raise LorastackError(f"not a stack: {spec!r}")


def start_stack(runtime: "Runtime", spec: Any, text: str,
                on_event: Callable[[str | None], None] | None = None) -> StackHandle:
    """`Runtime.start` for stacks."""
    return driver(runtime).start(resolve(runtime, spec), text, on_event)
