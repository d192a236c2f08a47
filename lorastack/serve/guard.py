"""ASGI guard in front of the app: request-size cap and per-endpoint request counting.

It is plain ASGI rather than FastAPI middleware because it must see the raw body before
FastAPI parses it (FastAPI would turn a failure inside its body read into a vague 400)
and must not buffer or wrap streamed responses.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DISCONNECTED = 499  # the status counted for a request whose client went away
DISCONNECTED_KEY = "lorastack_disconnected"

# Endpoint labels for metrics: a fixed set, so a client cannot blow up label cardinality.
_ENDPOINTS = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/v1/adapters", "/v1/load_lora_adapter",
              "/v1/unload_lora_adapter", "/health", "/metrics",
              "/tokenize", "/detokenize", "/tokenizer_info"}


def endpoint_label(path: str) -> str:
    if path in _ENDPOINTS:
        return path
    if path.startswith("/v1/adapters/"):
        return "/v1/adapters/{name}"
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    return "other"


class Guard:
    def __init__(self, app: Callable, max_body_bytes: int, on_response: Callable[[str, int], None]) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.on_response = on_response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        label = endpoint_label(scope.get("path", ""))
        status = {"code": 500}

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        try:
            too_big = declared is not None and int(declared) > self.max_body_bytes
        except ValueError:
            too_big = False
        if too_big:
            await self._reject(counting_send, declared.decode())
            self.on_response(label, 413)
            return
        # Read the whole body (bounded) up front, then replay it; later receive() calls go
        # to the client so disconnects are still seen.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body_bytes:
                await self._reject(counting_send, f"more than {self.max_body_bytes}")
                self.on_response(label, 413)
                return
            chunks.append(body)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        state = scope.setdefault("state", {})  # Starlette's request.state lives here
        try:
            await self.app(scope, replay, counting_send)
        finally:
            # A stream whose client left mid-way started as a 200; count it apart (nginx's
            # 499) so requests_total tells completed streams from abandoned ones.
            self.on_response(label, DISCONNECTED if state.get(DISCONNECTED_KEY) else status["code"])

    async def _reject(self, send: Send, size: str) -> None:
        body = json.dumps({"error": {"message": f"request body is too large ({size} bytes; the limit is {self.max_body_bytes})",
                                     "type": "invalid_request_error", "param": None, "code": "request_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
