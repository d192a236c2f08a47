"""Per-request trail: which route answered (sent to every client as the `x-lorastack-route`
header) and, when enabled, one access-log line per request.

Clients such as LangChain drop unknown body fields, so the route that answered also goes in
a header. Handlers note the route as soon as it is decided (`note_route`), which for a
stream is before its first byte, so the header is always there. The trail lives in a
context variable set by this middleware: the handler, its thread-pool calls and a stream's
body all see the same record without it being passed through every call.
"""

from __future__ import annotations

import logging
import sys
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from .guard import Receive, Scope, Send

ROUTE_HEADER = "x-lorastack-route"
log = logging.getLogger("lorastack.access")


@dataclass
class Trail:
    model: str | None = None
    routes: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0


_TRAIL: ContextVar[Trail | None] = ContextVar("lorastack_trail", default=None)


def note_route(model: str, spec: str, once: bool = False) -> None:
    """Record a route that answers this request (one per prompt of a completions request;
    `once`: not again if already there, for a stack started once per sample)."""
    trail = _TRAIL.get()
    if trail is not None and not (once and spec in trail.routes):
        trail.model = model
        trail.routes.append(spec)


def note_model(model: str) -> None:
    """Record the requested model where no route answers (embeddings)."""
    trail = _TRAIL.get()
    if trail is not None:
        trail.model = model


def note_tokens(prompt: int, completion: int) -> None:
    trail = _TRAIL.get()
    if trail is not None:
        trail.prompt_tokens += prompt
        trail.completion_tokens += completion


def line(scope: Scope, status: int, trail: Trail, seconds: float) -> str:
    """`client "METHOD PATH" STATUS model=… route=… tokens=PROMPT+COMPLETION latency_ms=…`"""
    client = scope.get("client") or ("-", 0)
    route = ",".join(trail.routes) or "-"
    return (f'{client[0]} "{scope.get("method", "-")} {scope.get("path", "-")}" {status} model={trail.model or "-"} '
            f"route={route} tokens={trail.prompt_tokens}+{trail.completion_tokens} latency_ms={seconds * 1000:.1f}")


class RequestTrail:
    """ASGI middleware: adds the route header; with `access_log`, logs each request to
    the `lorastack.access` logger (to stderr unless the application configured it)."""

    def __init__(self, app: Any, access_log: bool = False) -> None:
        self.app = app
        self.access_log = access_log
        if access_log and not log.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
            log.propagate = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        trail = Trail()
        token = _TRAIL.set(trail)
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_with_route(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                if trail.routes:
                    headers = list(message.get("headers") or [])
                    headers.append((ROUTE_HEADER.encode(), ",".join(trail.routes).encode()))
                    message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_route)
        finally:
            _TRAIL.reset(token)
            if self.access_log:
                log.info(line(scope, status["code"], trail, time.perf_counter() - t0))
