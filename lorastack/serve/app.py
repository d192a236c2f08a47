"""The OpenAI-compatible app: chat/completions, models, adapter hot-load, health, metrics.

One process: the engine decodes in its own thread; request handlers route (in the thread
pool), submit, and receive text pieces through an asyncio queue that the engine thread
feeds (`Request.on_event`), so no thread blocks per request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from .. import __version__
from ..engine.engine import Engine, Request as EngineRequest
from ..engine.sampling import Sampling
from ..errors import LorastackError, NotFoundError
from ..names import validate_name
from ..routing import ROUTERS
from ..runtime import Runtime
from . import errors as api_errors
from .errors import ApiError, from_lorastack
from .guard import Guard
from .metrics import Metrics
from .schemas import (
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionRequest, Completion, CompletionChoice,
    CompletionRequest, ErrorBody, ImportAdapter, LoadLoraAdapter, ModelCard, ModelList, RouteInfo,
    UnloadLoraAdapter, Usage,
)
from .settings import ServeSettings

log = logging.getLogger("lorastack.serve")
_ERRORS = {s: {"model": ErrorBody} for s in (400, 401, 404, 409, 413, 422, 429)}


class Server:
    """State shared by the handlers: the runtime, its engine, limits and metrics."""

    def __init__(self, runtime: Runtime, settings: ServeSettings) -> None:
        if not isinstance(runtime.generator, Engine):
            raise LorastackError("serving needs the engine, which supports Llama-family bases")
        self.runtime = runtime
        self.engine: Engine = runtime.generator
        self.settings = settings
        self.started = int(time.time())
        self.metrics = Metrics(lambda: self.engine.queue_depth, lambda: len(self.engine.running),
                               lambda: len(self.engine.bank.slots))
        self._admin = asyncio.Lock()  # library changes one at a time

    # ------------------------------------------------------------ auth
    def check_key(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not given or not hmac.compare_digest(given.encode(), key.encode()):
            raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                           type="authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    # ------------------------------------------------------------ generation
    def context(self) -> int:
        return int(getattr(self.runtime.base.model.config, "max_position_embeddings", 0) or 0) or 1 << 30

    def sampling(self, body: ChatCompletionRequest | CompletionRequest, prompt_tokens: int = 0) -> Sampling:
        """Validated sampling; an unset max_tokens is the default, shrunk to fit the context."""
        if body.n != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:
            max_tokens = max(1, min(self.settings.default_max_tokens, self.context() - prompt_tokens))
        if max_tokens > self.settings.max_tokens_cap:
            raise ApiError(400, f"max_tokens {max_tokens} exceeds this server's limit of {self.settings.max_tokens_cap}",
                           param="max_tokens")
        try:
            return Sampling(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                            seed=body.seed, stop=body.stops(), ignore_eos=body.ignore_eos)
        except LorastackError as e:
            raise ApiError(400, str(e)) from e

    def check_prompt(self, ids: list[int], sampling: Sampling, param: str) -> None:
        limit = min(self.settings.max_prompt_tokens, self.context() - sampling.max_tokens)
        if len(ids) > limit:
            raise ApiError(400, f"prompt is {len(ids)} tokens; at most {max(limit, 0)} fit with max_tokens={sampling.max_tokens}",
                           param=param, code="context_length_exceeded")

    async def decide(self, model: str, text: str, false_route: float | None = None) -> Any:
        t0 = time.perf_counter()
        try:
            decision = (await run_in_threadpool(self.runtime.decide, model, [text], false_route))[0]
        except NotFoundError as e:
            raise ApiError(404, str(e), param="model", code="model_not_found") from e
        except LorastackError as e:
            raise from_lorastack(e, "model") from e
        self.metrics.routing.observe(time.perf_counter() - t0)
        return decision

    def route_info(self, model: str, decision: Any) -> RouteInfo:
        return RouteInfo(spec=str(decision.route), route=decision.route.to_json(), router=self.runtime.router_name(model),
                         abstained=decision.abstained, scores=decision.scores, routing_ms=round(decision.seconds * 1000, 3),
                         candidate=decision.candidate, confidence=decision.confidence, threshold=decision.threshold,
                         signal=decision.signal)

    def submit(self, ids: list[int], decision: Any, sampling: Sampling, stream: bool) -> tuple[EngineRequest, asyncio.Queue]:
        """Queue a generation. A streaming caller gets every text piece through the returned
        queue; a non-streaming one only the final None (one event-loop wake-up per request,
        not per token)."""
        if self.engine.queue_depth >= self.settings.max_queue:
            self.metrics.rejected.labels("queue_full").inc()
            raise ApiError(429, f"server busy: {self.engine.queue_depth} requests are waiting; retry shortly",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": str(self.settings.retry_after_s)})
        self.engine.start()  # idempotent; also covers apps driven without lifespan events
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()

        def on_event(piece: str | None) -> None:
            if stream or piece is None:
                loop.call_soon_threadsafe(pieces.put_nowait, piece)

        try:
            req = self.engine.submit_ids(ids, decision.route, sampling, on_event=on_event)
        except LorastackError as e:
            raise ApiError(400, str(e)) from e
        for name in decision.route.names or ["base"]:
            self.metrics.adapter_requests.labels(name).inc()
        self.metrics.tokens.labels("prompt").inc(len(ids))
        return req, pieces

    async def collect(self, request: Request, req: EngineRequest, pieces: asyncio.Queue, endpoint: str) -> None:
        """Wait for `req` (submitted with stream=False) to finish; a client that goes away
        cancels it and frees its batch row."""
        try:
            while True:
                try:
                    if await asyncio.wait_for(pieces.get(), timeout=0.2) is None:
                        break
                except TimeoutError:
                    if await request.is_disconnected():
                        self.cancel(req)
                        raise ApiError(499, "client disconnected") from None
        except asyncio.CancelledError:
            self.cancel(req)
            raise
        self.finished(req, endpoint)

    def cancel(self, req: EngineRequest) -> None:
        if not req.done:
            req.cancel()
            self.metrics.cancelled.inc()

    def finished(self, req: EngineRequest, endpoint: str) -> None:
        if req.error is not None:
            raise from_lorastack(req.error) if isinstance(req.error, LorastackError) else req.error
        self.metrics.tokens.labels("completion").inc(len(req.tokens))
        end = req.finished_at or time.perf_counter()
        self.metrics.latency.labels(endpoint).observe(end - req.submitted_at)
        if req.first_token_at is not None:
            self.metrics.ttft.observe(req.first_token_at - req.submitted_at)

    # ------------------------------------------------------------ models
    def models(self) -> ModelList:
        base = self.runtime.base
        cards = [ModelCard(id="base", created=self.started, root=base.name, description=f"the bare base ({base.fingerprint})")]
        cards.append(ModelCard(id="auto", created=self.started, parent="base", description="routed per request by the default router"))
        cards += [ModelCard(id=f"auto:{r}", created=self.started, parent="base", description=f"routed per request by the {r} router")
                  for r in sorted(ROUTERS)]
        for a in self.runtime.library.list():
            if a.name in self.runtime.hidden:
                continue
            cards.append(ModelCard(id=a.name, created=int(a.path.stat().st_mtime) if a.path.exists() else self.started,
                                   root=a.name, parent="base", description=a.card.description or None))
        return ModelList(data=cards)

    async def import_adapter(self, path: str, name: str | None, overwrite: bool) -> Any:
        try:
            src = self.settings.allowed_import(path)
        except PermissionError as e:
            raise ApiError(403, str(e), type="permission_error", param="path") from e
        if name is not None:
            try:
                validate_name(name)
            except LorastackError as e:
                raise ApiError(400, str(e), param="name") from e
        async with self._admin:
            if name is not None and name in self.runtime.library and not overwrite:
                raise ApiError(409, f"adapter {name!r} already exists; pass overwrite=true to replace it", param="name",
                               code="already_exists")
            try:
                adapter = await run_in_threadpool(self.runtime.library.import_dir, src, name,
                                                  base=self.runtime.base, overwrite=overwrite)
            except LorastackError as e:
                if "already exists" in str(e):
                    raise ApiError(409, str(e), param="name", code="already_exists") from e
                raise from_lorastack(e, "path") from e
            self.runtime.hidden.discard(adapter.name)
            self.runtime.refresh(adapter.name)
        return adapter


def create_app(runtime: Runtime, settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    srv = Server(runtime, settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        srv.engine.start()
        try:
            yield
        finally:
            srv.engine.stop()

    app = FastAPI(title="lorastack", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API over a base model and a library of LoRA experts.")
    app.state.server = srv
    api_errors.install(app)
    auth = [Depends(srv.check_key)]

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")
        return JSONResponse(api_errors.body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)

    # ------------------------------------------------------------ generation
    @app.post("/v1/chat/completions", dependencies=auth, response_model=ChatCompletion, responses=_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        srv.sampling(body)  # field errors first
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        users = [m["content"] for m in messages if m["role"] == "user"]
        try:
            ids = runtime.base.chat_ids(messages)
        except Exception as e:  # noqa: BLE001 - a template that rejects the conversation is the client's error
            raise ApiError(400, f"messages: the chat template rejected this conversation ({e})", param="messages") from e
        decision = await srv.decide(body.model, users[-1] if users else messages[-1]["content"], body.false_route)
        sampling = srv.sampling(body, len(ids))
        srv.check_prompt(ids, sampling, "messages")
        info = srv.route_info(body.model, decision)
        req, pieces = srv.submit(ids, decision, sampling, body.stream)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(srv, request, req, pieces, lambda piece, finish, first: {
                "id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                "choices": [{"index": 0, "delta": ({"role": "assistant"} if first else {}) | ({"content": piece} if piece else {}),
                             "finish_reason": finish}],
                **({"lorastack": info.model_dump()} if first else {}),
            }, include_usage, "chat")
        await srv.collect(request, req, pieces, "chat")
        return ChatCompletion(id=rid, created=created, model=body.model,
                              choices=[ChatChoice(index=0, message=AssistantMessage(content=req.text), finish_reason=_finish(req))],
                              usage=_usage(req), lorastack=info)

    @app.post("/v1/completions", dependencies=auth, response_model=Completion, responses=_ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        srv.sampling(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or len(prompts) > 16:
            raise ApiError(400, "prompt: give a string or a list of 1 to 16 strings", param="prompt")
        if body.stream and len(prompts) > 1:
            raise ApiError(400, "streaming takes a single prompt", param="prompt")
        tok = runtime.base.tokenizer
        all_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        decisions = [await srv.decide(body.model, p, body.false_route) for p in prompts]
        sampling = srv.sampling(body, max(len(ids) for ids in all_ids))
        for ids in all_ids:
            if not ids:
                raise ApiError(400, "prompt is empty", param="prompt")
            srv.check_prompt(ids, sampling, "prompt")
        infos = [srv.route_info(body.model, d) for d in decisions]
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            req, pieces = srv.submit(all_ids[0], decisions[0], sampling, True)
            echo = prompts[0] if body.echo else ""
            return _sse(srv, request, req, pieces, lambda piece, finish, first: {
                "id": rid, "object": "text_completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "text": (echo if first else "") + (piece or ""), "finish_reason": finish, "logprobs": None}],
                **({"lorastack": [infos[0].model_dump()]} if first else {}),
            }, bool(body.stream_options and body.stream_options.include_usage), "completions")
        submitted = []
        try:
            for ids, d in zip(all_ids, decisions):
                submitted.append(srv.submit(ids, d, sampling, False))
            for req, pieces in submitted:
                await srv.collect(request, req, pieces, "completions")
        finally:
            for req, _ in submitted:
                srv.cancel(req)
        reqs = [r for r, _ in submitted]
        choices = [CompletionChoice(index=i, text=(p if body.echo else "") + r.text, finish_reason=_finish(r))
                   for i, (p, r) in enumerate(zip(prompts, reqs))]
        usage = Usage(prompt_tokens=sum(len(r.prompt_ids) for r in reqs), completion_tokens=sum(len(r.tokens) for r in reqs),
                      total_tokens=sum(len(r.prompt_ids) + len(r.tokens) for r in reqs))
        return Completion(id=rid, created=created, model=body.model, choices=choices, usage=usage, lorastack=infos)

    # ------------------------------------------------------------ models and adapters
    @app.get("/v1/models", dependencies=auth, response_model=ModelList)
    async def list_models() -> ModelList:
        return srv.models()

    @app.get("/v1/models/{model_id:path}", dependencies=auth, response_model=ModelCard, responses=_ERRORS)
    async def get_model(model_id: str) -> ModelCard:
        for card in srv.models().data:
            if card.id == model_id:
                return card
        from ..errors import unknown_name_message

        raise ApiError(404, unknown_name_message("model", model_id, [c.id for c in srv.models().data]),
                       param="model", code="model_not_found")

    @app.post("/v1/adapters", dependencies=auth, status_code=201, responses=_ERRORS | {403: {"model": ErrorBody}})
    async def import_adapter(body: ImportAdapter) -> dict[str, Any]:
        adapter = await srv.import_adapter(body.path, body.name, body.overwrite)
        return {"id": adapter.name, "object": "adapter", "card": json.loads(adapter.card.model_dump_json())}

    @app.delete("/v1/adapters/{name}", dependencies=auth, responses=_ERRORS)
    async def delete_adapter(name: str) -> dict[str, Any]:
        try:
            validate_name(name)
        except LorastackError as e:
            raise ApiError(400, str(e), param="name") from e
        async with srv._admin:
            try:
                await run_in_threadpool(runtime.library.remove, name)
            except LorastackError as e:
                raise from_lorastack(e, "name") from e
            runtime.hidden.discard(name)
            runtime.refresh(name)
        return {"id": name, "object": "adapter", "deleted": True}

    @app.post("/v1/load_lora_adapter", dependencies=auth, response_class=PlainTextResponse,
              responses=_ERRORS | {403: {"model": ErrorBody}})
    async def load_lora_adapter(body: LoadLoraAdapter) -> str:
        """vLLM-compatible: import `lora_path` as `lora_name`, or bring an unloaded library adapter back."""
        try:
            validate_name(body.lora_name)
        except LorastackError as e:
            raise ApiError(400, str(e), param="lora_name") from e
        name = body.lora_name
        if name in runtime.library and name not in runtime.hidden and body.lora_path:
            raise ApiError(400, f"the lora adapter {name!r} has already been loaded", param="lora_name")
        if body.lora_path:
            await srv.import_adapter(body.lora_path, name, overwrite=name in runtime.library)
        elif name in runtime.library:
            runtime.hidden.discard(name)
            runtime.refresh(name)
        else:
            raise ApiError(404, f"adapter {name!r} is not in the library; give lora_path to import it", param="lora_path")
        return f"Success: LoRA adapter '{name}' added successfully."

    @app.post("/v1/unload_lora_adapter", dependencies=auth, response_class=PlainTextResponse, responses=_ERRORS)
    async def unload_lora_adapter(body: UnloadLoraAdapter) -> str:
        """vLLM-compatible: stop serving an adapter (it stays in the library; load it to serve it again)."""
        name = body.lora_name
        if name not in runtime.served():
            from ..errors import unknown_name_message

            raise ApiError(404, unknown_name_message("adapter", name, runtime.served()), param="lora_name")
        runtime.hidden.add(name)
        runtime.refresh(name)
        return f"Success: LoRA adapter '{name}' removed successfully."

    # ------------------------------------------------------------ operations
    @app.get("/health")
    async def health() -> dict[str, Any]:
        alive = srv.engine._thread is not None and srv.engine._thread.is_alive()
        return {"status": "ok" if alive else "starting", "base": runtime.base.name, "fingerprint": runtime.base.fingerprint,
                "adapters": len(runtime.served()), "queue_depth": srv.engine.queue_depth, "running": len(srv.engine.running)}

    @app.get("/metrics", dependencies=auth, response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(srv.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def count(endpoint: str, status: int) -> None:
        srv.metrics.requests.labels(endpoint, str(status)).inc()

    app.add_middleware(Guard, max_body_bytes=settings.max_body_bytes, on_response=count)
    return app


def _finish(req: EngineRequest) -> str:
    return "length" if req.finish_reason == "length" else "stop"


def _usage(req: EngineRequest) -> Usage:
    return Usage(prompt_tokens=len(req.prompt_ids), completion_tokens=len(req.tokens),
                 total_tokens=len(req.prompt_ids) + len(req.tokens))


def _sse(srv: Server, request: Request, req: EngineRequest, pieces: asyncio.Queue, chunk, include_usage: bool,
         endpoint: str) -> StreamingResponse:
    """Server-sent events: one chunk per text piece, a final chunk with finish_reason, [DONE]."""

    async def events() -> AsyncIterator[str]:
        first = True
        try:
            while True:
                piece = await pieces.get()
                if piece is None:
                    break
                yield f"data: {json.dumps(chunk(piece, None, first))}\n\n"
                first = False
            if req.error is not None:
                msg = str(req.error) if isinstance(req.error, LorastackError) else f"internal error: {type(req.error).__name__}"
                yield f"data: {json.dumps(api_errors.body(msg, 'server_error'))}\n\n"
            else:
                srv.finished(req, endpoint)
                final = chunk(None, _finish(req), first)
                yield f"data: {json.dumps(final)}\n\n"
                if include_usage:
                    usage = {**final, "choices": [], "usage": _usage(req).model_dump()}
                    yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            # Reached on normal end and when the client disconnects (the task is cancelled).
            srv.cancel(req)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
