"""The OpenAI-compatible app: chat/completions, models, adapter hot-load, health, metrics.

One process: the engine decodes in its own thread; request handlers route (in the thread
pool), start through `Runtime.start`, and receive text pieces through an asyncio queue
that the engine thread feeds (`on_event`), so no thread blocks per request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
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
from ..data import check_text
from ..engine.constrain import Constraint
from ..engine.engine import Engine
from ..engine.sampling import Sampling
from ..errors import LorastackError, NotFoundError
from ..handle import Handle
from ..names import validate_name
from ..route import is_stack
from ..routing import ROUTERS
from ..runtime import Runtime
from . import errors as api_errors
from .accesslog import RequestTrail, note_route, note_tokens
from .docs import install_docs
from .embeddings import create_embeddings
from .errors import ApiError, from_lorastack, request_error
from .guard import DISCONNECTED_KEY, Guard
from .logprobs import chat_choice_logprobs, check_logprobs_route, completion_choices
from .metrics import Metrics
from .prompts import completion_prompts
from .schemas import (
    ChatChoice, ChatCompletion, ChatCompletionRequest, Completion,
    CompletionRequest, EmbeddingList, EmbeddingRequest, ErrorBody, ImportAdapter, LoadLoraAdapter, ModelCard, ModelList, RouteInfo,
    UnloadLoraAdapter, Usage, assistant_message, chat_messages, check_stack_sampling, structured_output,
)
from .settings import ServeSettings
from .tokenizer import install_tokenizer_routes

log = logging.getLogger("lorastack.serve")
MAX_N = 8  # samples per request (`n`): each is a row of the batch, the prompt's K/V shared via the prefix cache
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
        return self.runtime.context_length()

    def sampling(self, body: ChatCompletionRequest | CompletionRequest, prompt_tokens: int = 0,
                 constraint: Constraint | None = None) -> Sampling:
        """Validated sampling; an unset max_tokens is the default, shrunk to fit the context."""
        if body.n > MAX_N:
            raise ApiError(400, f"n is {body.n}; at most {MAX_N} samples per request", param="n")
        if body.n > 1 and body.stream:
            raise ApiError(400, "streaming takes n=1 (send n separate streams)", param="n")
        refused = body.unsupported()
        if refused:
            raise ApiError(400, f"{refused[1]}; remove '{refused[0]}' from the request", param=refused[0],
                           code="unsupported_parameter")
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens == 0:  # echo-only scoring (schemas allow it only there): nothing is generated
            max_tokens = 1
        if max_tokens is None:
            max_tokens = max(1, min(self.settings.default_max_tokens, self.context() - prompt_tokens))
        if max_tokens > self.settings.max_tokens_cap:
            raise ApiError(400, f"max_tokens {max_tokens} exceeds this server's limit of {self.settings.max_tokens_cap}",
                           param="max_tokens")
        try:
            return Sampling(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                            seed=body.seed, stop=body.stops(), ignore_eos=body.ignore_eos, constraint=constraint,
                            logprobs=body.logprob_count())
        except LorastackError as e:
            raise ApiError(400, str(e)) from e

    async def prepare(self, constraint: Constraint | None, param: str) -> None:
        """Compile a structured-output grammar off the event loop (the first one also builds the
        tokenizer's tables, ~1 s); a schema the compiler rejects is the client's 400."""
        if constraint is not None:
            try:
                await run_in_threadpool(lambda: self.engine.grammars().compiled(constraint))
            except LorastackError as e:
                raise ApiError(400, str(e), param=param) from e

    @staticmethod
    def samples(sampling: Sampling, n: int) -> list[Sampling]:
        """`n` independent samples: with a seed, sample i uses seed + i (reproducible, and
        the samples differ); greedy samples are identical, as OpenAI's are."""
        if n == 1 or sampling.seed is None:
            return [sampling] * n
        return [dataclasses.replace(sampling, seed=(sampling.seed + i) % 2**64) for i in range(n)]

    def check_prompt(self, ids: list[int], sampling: Sampling, param: str) -> None:
        cap = self.settings.max_prompt_tokens
        if len(ids) > cap:  # the server's request-size cap, below the context on purpose
            raise ApiError(400, f"prompt is {len(ids)} tokens; this server accepts at most {cap} prompt tokens "
                           f"(lorastack serve --max-prompt-tokens)", param=param, code="context_length_exceeded")
        try:
            self.runtime.base.check_answer_fits(len(ids), sampling.max_tokens)
        except LorastackError as e:
            raise ApiError(400, str(e), param=param, code="context_length_exceeded") from e

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

    def is_stack(self, model: str) -> bool:
        try:
            return is_stack(model)
        except LorastackError as e:
            raise from_lorastack(e, "model") from e

    def route_info(self, model: str, decision: Any) -> RouteInfo:
        note_route(model, str(decision.route))  # the x-lorastack-route header, the access log
        return RouteInfo(spec=str(decision.route), route=decision.route.to_json(), router=self.runtime.router_name(model),
                         abstained=decision.abstained, scores=decision.scores, routing_ms=round(decision.seconds * 1000, 3),
                         candidate=decision.candidate, confidence=decision.confidence, threshold=decision.threshold,
                         signal=decision.signal)

    @staticmethod
    def stack_info(handle: Handle) -> RouteInfo:
        return RouteInfo(spec=handle.model, route=[], trace=[t.to_json() for t in handle.trace or []])

    def start(self, model: str, prompt: Any, decision: Any, sampling: Sampling, stream: bool,
              false_route: float | None = None, text: str | None = None) -> tuple[Handle, asyncio.Queue]:
        """Start a generation through `Runtime.start`, the one execution path for routes,
        `auto` decisions and stacks alike. A streaming caller gets every text piece through
        the returned queue; a non-streaming one only the final None (one event-loop wake-up
        per request, not per token)."""
        if self.engine.queue_depth >= self.settings.max_queue:
            self.metrics.rejected.labels("queue_full").inc()
            raise ApiError(429, f"server busy: {self.engine.queue_depth} requests are waiting; retry shortly",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": str(self.settings.retry_after_s)})
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()

        def on_event(piece: str | None) -> None:
            if stream or piece is None:
                loop.call_soon_threadsafe(pieces.put_nowait, piece)

        try:
            handle = self.runtime.start(model, prompt, sampling, false_route=false_route, decision=decision, on_event=on_event,
                                        text=text)
        except NotFoundError as e:
            raise ApiError(404, str(e), param="model", code="model_not_found") from e
        except LorastackError as e:
            raise ApiError(400, str(e)) from e
        if decision is None:  # a stack: it answers as a whole (header, access log)
            note_route(model, handle.model, once=True)
        for name in (decision.route.names if decision is not None else [handle.model]) or ["base"]:
            self.metrics.adapter_requests.labels(name).inc()
        return handle, pieces

    async def next_event(self, request: Request, req: Handle, pieces: asyncio.Queue) -> str | None:
        """The next text piece of `req` (None at its end); a client that goes away while we
        wait cancels the request and frees its batch row."""
        try:
            while True:
                try:
                    return await asyncio.wait_for(pieces.get(), timeout=0.2)
                except TimeoutError:
                    if await request.is_disconnected():
                        self.cancel(req)
                        raise ApiError(499, "client disconnected") from None
        except asyncio.CancelledError:
            self.cancel(req)
            raise

    async def collect(self, request: Request, req: Handle, pieces: asyncio.Queue, endpoint: str) -> None:
        """Wait for `req` (submitted with stream=False, so only its final None arrives)."""
        while await self.next_event(request, req, pieces) is not None:
            pass
        self.finished(req, endpoint)

    async def collect_all(self, request: Request, submits: list, endpoint: str) -> list[Handle]:
        """Submit (each callable returns `submit`'s pair) and wait for every request; on any
        failure or disconnect, the ones already submitted are cancelled."""
        submitted: list[tuple[Handle, asyncio.Queue]] = []
        try:
            for submit in submits:
                submitted.append(submit())
            for req, pieces in submitted:
                await self.collect(request, req, pieces, endpoint)
        finally:
            for req, _ in submitted:
                self.cancel(req)
        return [req for req, _ in submitted]

    def cancel(self, req: Handle) -> None:
        if not req.done and not req.cancelled:  # counted once, however many paths notice the hang-up
            req.cancel()
            self.metrics.cancelled.inc()

    def finished(self, req: Handle, endpoint: str) -> None:
        if req.error is not None:
            raise request_error(req.error)
        self.metrics.tokens.labels("prompt").inc(req.prompt_tokens)
        self.metrics.tokens.labels("completion").inc(req.completion_tokens)
        note_tokens(req.prompt_tokens, req.completion_tokens)
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
        from ..stacks import StackStore

        store = StackStore(self.runtime.library.root)
        cards += [ModelCard(id=f"stack/{n}", created=self.started, parent="base", description="a stack of experts (YAML)")
                  for n in store.names()]
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
                adapter = await run_in_threadpool(self.runtime.library.import_dir, src, name, base=self.runtime.base,
                                                  overwrite=overwrite, roots=self.settings.import_roots)
            except PermissionError as e:
                raise ApiError(403, str(e), type="permission_error", param="path") from e
            except LorastackError as e:
                if "already exists" in str(e):
                    raise ApiError(409, str(e), param="name", code="already_exists") from e
                err = from_lorastack(e, "path")
                err.message = err.message.replace(str(src), path)  # the client's words, not the server's layout
                raise err from e
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

    # The interactive docs and the schema describe every endpoint, so with an API key they
    # sit behind it too; `docs=False` turns them off altogether. /docs renders offline (docs.py).
    app = FastAPI(title="lorastack", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  description="OpenAI-compatible API over a base model and a library of LoRA experts.")
    app.state.server = srv
    api_errors.install(app)
    auth = [Depends(srv.check_key)]
    if settings.docs:
        install_docs(app, auth if settings.api_key is not None else [])

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")
        return JSONResponse(api_errors.body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)

    # ------------------------------------------------------------ generation
    @app.post("/v1/chat/completions", dependencies=auth, response_model=ChatCompletion, responses=_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        srv.sampling(body)  # field errors first
        structured = structured_output(body, chat=True)
        for i, m in enumerate(body.messages):  # indices as the client sent them
            try:
                check_text(m.text(), f"messages[{i}].content")
            except LorastackError as e:
                raise from_lorastack(e, param=f"messages[{i}].content") from e
        messages = chat_messages(body.messages, structured.tool)
        users = [m["content"] for m in messages if m["role"] == "user"]
        text = users[-1] if users else messages[-1]["content"]
        try:
            ids = runtime.base.chat_ids(messages)
        except Exception as e:  # noqa: BLE001 - a template that rejects the conversation is the client's error
            raise ApiError(400, f"messages: the chat template rejected this conversation ({e})", param="messages") from e
        # A stack reads the last user message (its stages make their own prompts); anything
        # else is routed here, before the response starts, so a stream can say its route first.
        stack = srv.is_stack(body.model)
        check_logprobs_route(body, stack)
        check_stack_sampling(body, stack)
        if stack and structured.constraint is not None:
            raise ApiError(400, "structured output is not supported for stack/ models",
                           param="tools" if structured.tool else "response_format")
        decision = None if stack else await srv.decide(body.model, text, body.false_route)
        sampling = srv.sampling(body, len(ids), structured.constraint)
        await srv.prepare(structured.constraint, "tools" if structured.tool else "response_format")
        if not stack:
            srv.check_prompt(ids, sampling, "messages")
        prompt = messages if stack else ids
        info = None if stack else srv.route_info(body.model, decision)
        samples = srv.samples(sampling, body.n)
        req, pieces = srv.start(body.model, prompt, decision, samples[0], body.stream, body.false_route, text)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await _sse(srv, request, req, pieces, lambda piece, finish, first: {
                "id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                "choices": [{"index": 0, "delta": ({"role": "assistant"} if first else {}) | ({"content": piece} if piece else {}),
                             "finish_reason": finish}],
                **({"lorastack": info.model_dump()} if first and info is not None else {}),
                **({"lorastack": srv.stack_info(req).model_dump()} if finish and info is None else {}),
            }, include_usage, "chat")
        more = [functools.partial(srv.start, body.model, prompt, decision, extra, False, body.false_route, text)
                for extra in samples[1:]]
        reqs = await srv.collect_all(request, [lambda: (req, pieces), *more], "chat")
        prompt_tokens = reqs[0].prompt_tokens  # one prompt, however many samples (as for a route)
        completion = sum(r.completion_tokens for r in reqs)
        return ChatCompletion(id=rid, created=created, model=body.model,
                              choices=[ChatChoice(index=i, message=assistant_message(r.text, structured), finish_reason=_finish(r),
                                                  logprobs=chat_choice_logprobs(runtime.base, body, r))
                                       for i, r in enumerate(reqs)],
                              usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion),
                              lorastack=info or srv.stack_info(reqs[0]))

    @app.post("/v1/completions", dependencies=auth, response_model=Completion, responses=_ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        srv.sampling(body)
        constraint = structured_output(body, chat=False).constraint
        prompts, all_ids = completion_prompts(body, runtime.base.tokenizer)
        stack = srv.is_stack(body.model)
        check_logprobs_route(body, stack)
        check_stack_sampling(body, stack)
        if stack and constraint is not None:
            raise ApiError(400, "structured output is not supported for stack/ models", param="response_format")
        decisions = [None if stack else await srv.decide(body.model, p, body.false_route) for p in prompts]
        sampling = srv.sampling(body, max(len(ids) for ids in all_ids), constraint)
        await srv.prepare(constraint, "response_format")
        for ids in all_ids:
            if not stack:
                srv.check_prompt(ids, sampling, "prompt")
        inputs = prompts if stack else all_ids  # a stack reads the text; a route decodes from the tokens
        infos = [None if d is None else srv.route_info(body.model, d) for d in decisions]
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            req, pieces = srv.start(body.model, inputs[0], decisions[0], sampling, True, body.false_route, prompts[0])
            echo = prompts[0] if body.echo else ""
            return await _sse(srv, request, req, pieces, lambda piece, finish, first: {
                "id": rid, "object": "text_completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "text": (echo if first else "") + (piece or ""), "finish_reason": finish, "logprobs": None}],
                **({"lorastack": [infos[0].model_dump()]} if first and infos[0] is not None else {}),
                **({"lorastack": [srv.stack_info(req).model_dump()]} if finish and infos[0] is None else {}),
            }, bool(body.stream_options and body.stream_options.include_usage), "completions")
        # OpenAI's order: every sample of prompt 0, then of prompt 1, ...
        reqs = [] if body.scores_only else await srv.collect_all(request, [
            functools.partial(srv.start, body.model, x, d, one, False, body.false_route, p)
            for x, d, p in zip(inputs, decisions, prompts) for one in srv.samples(sampling, body.n)], "completions")
        choices = await completion_choices(srv.engine, runtime.base, body, prompts, all_ids,
                                           [d.route for d in decisions] if not stack else [], reqs)
        prompt_tokens = sum(len(ids) for ids in all_ids) if not stack else sum(r.prompt_tokens for r in reqs[::body.n])
        completion = sum(r.completion_tokens for r in reqs)
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)
        infos = [info or srv.stack_info(reqs[i * body.n]) for i, info in enumerate(infos)]
        return Completion(id=rid, created=created, model=body.model, choices=choices, usage=usage, lorastack=infos)

    @app.post("/v1/embeddings", dependencies=auth, response_model=EmbeddingList, responses=_ERRORS)
    async def embeddings(body: EmbeddingRequest) -> EmbeddingList:
        """The base's mean-pooled hidden states (what routing compares), unit length."""
        return await create_embeddings(runtime, settings.max_prompt_tokens, body)

    install_tokenizer_routes(app, runtime, auth)  # vLLM's /tokenize, /detokenize, /tokenizer_info

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
    async def health() -> JSONResponse:
        """200 while the engine loop runs; 503 once it has died (the next generation request
        restarts it, and the body says what stopped it), so a supervisor never sees a hang as healthy."""
        engine = srv.engine
        failure = engine.failure
        status = "ok" if engine.alive else ("engine stopped" if failure is not None else "starting")
        body = {"status": status, "base": runtime.base.name, "fingerprint": runtime.base.fingerprint,
                "adapters": len(runtime.served()), "queue_depth": engine.queue_depth, "running": len(engine.running),
                "restarts": engine.stats["restarts"]}
        if failure is not None and not engine.alive:
            body["error"] = f"{type(failure).__name__}: {failure}"
        return JSONResponse(body, status_code=200 if engine.alive else 503)

    @app.get("/metrics", dependencies=auth, response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(srv.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def count(endpoint: str, status: int) -> None:
        srv.metrics.requests.labels(endpoint, str(status)).inc()

    app.add_middleware(Guard, max_body_bytes=settings.max_body_bytes, on_response=count)
    app.add_middleware(RequestTrail, access_log=settings.access_log)
    return app


def _finish(req: Handle) -> str:
    return "length" if req.finish_reason == "length" else "stop"


def _usage(req: Handle) -> Usage:
    return Usage(prompt_tokens=req.prompt_tokens, completion_tokens=req.completion_tokens,
                 total_tokens=req.prompt_tokens + req.completion_tokens)


async def _sse(srv: Server, request: Request, req: Handle, pieces: asyncio.Queue, chunk, include_usage: bool,
               endpoint: str) -> StreamingResponse:
    """Server-sent events: one chunk per text piece, a final chunk with finish_reason, [DONE].

    The first piece is awaited before the 200 goes out, so a request that fails before
    producing anything (its adapter was deleted meanwhile, a fault in prefill) gets a real
    error status instead of a 200 stream holding an error event."""
    head = await srv.next_event(request, req, pieces)
    if head is None and req.error is not None:
        raise request_error(req.error)

    async def events() -> AsyncIterator[str]:
        first = True
        completed = False
        piece = head
        try:
            while piece is not None:
                yield f"data: {json.dumps(chunk(piece, None, first))}\n\n"
                first = False
                piece = await pieces.get()
            if req.error is not None:
                err = request_error(req.error)
                yield f"data: {json.dumps(api_errors.body(err.message, err.type, err.param, err.code))}\n\n"
            else:
                srv.finished(req, endpoint)
                final = chunk(None, _finish(req), first)
                yield f"data: {json.dumps(final)}\n\n"
                if include_usage:
                    usage = {**final, "choices": [], "usage": _usage(req).model_dump()}
                    yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"
            completed = True
        finally:
            # Reached on normal end and when the client disconnects (the task is cancelled).
            if not completed:
                setattr(request.state, DISCONNECTED_KEY, True)
            srv.cancel(req)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
