"""An answer's text pieces in flight: a queue for `stream()`, an optional push listener, an end.

Engine requests and stack executions (lorastack/stacks/handle.py) hand their answers out the
same way: pieces go to a queue that `stream()` drains and to a listener the server uses to
feed its event loop without a polling thread; a final None ends both. One class keeps the
two from drifting (a listener that raises is dropped, never allowed to stall the producer).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator


class Pieces:
    def __init__(self, listener: Callable[[str | None], None] | None = None) -> None:
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._done = threading.Event()
        self._listener = listener

    def push(self, piece: str | None) -> None:
        """One text piece (None: the end) to the stream and the listener."""
        self._queue.put(piece)
        if self._listener is not None:
            try:
                self._listener(piece)
            except Exception:  # noqa: BLE001 - a broken listener must not stall the producer
                self._listener = None

    def close(self) -> None:
        """The answer is complete: waiters wake, then streams and the listener get the end."""
        self._done.set()
        self.push(None)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def stream(self, error: Callable[[], BaseException | None], timeout: float | None = None) -> Iterator[str]:
        """Pieces until the end; then `error()`, if it returns one, is raised."""
        while True:
            piece = self._queue.get(timeout=timeout)
            if piece is None:
                failure = error()
                if failure is not None:
                    raise failure
                return
            yield piece
