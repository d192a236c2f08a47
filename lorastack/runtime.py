"""The Python API's front door: a Base, a Library and a Generator wired together.

The server, the CLI, evaluation, the demo and the benchmarks all go through `Runtime`, so a
SPEC means the same thing everywhere and adapters are checked against the base once.
`start` is the one execution path: a fixed route, an `auto` decision or a stack in, a
`Handle` out (handle.py). Runtime is the wiring layer: it reaches up to routing and stacks
lazily, they only ever see it through the calls below.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

from .base import EMBEDDED, Base
from .adapter import Adapter
from .engine.engine import Engine
from .engine.generate import Generator
from .engine.llama import supports
from .engine.sampling import Generation, Messages, Sampling
from .errors import IncompatibleError, LorastackError, NotFoundError, unknown_name_message
from .handle import DoneHandle, EngineHandle, Handle
from .library import Library
from .route import AutoSpec, Route, SpecError, StackRef, is_stack, parse_spec

Spec = Route | AutoSpec | StackRef  # or a lorastack.stacks.StackSpec (anything with `stages`)


@dataclass
class Runtime:
    base: Base
    library: Library
    max_batch: int = 32
    max_resident: int = 16
    int8_rows: int = 0  # see Engine: int8 weight-only decode for batches of at most this many rows
    int8_matmuls: bool = False  # see Engine: layers, LM head and LoRA deltas in int8 (compiled kernels)
    generator: Engine | Generator = field(init=False)
    _checked: set[str] = field(default_factory=set, init=False, repr=False)
    _routers: dict = field(default_factory=dict, init=False, repr=False)
    # Adapters taken out of service (the server's vLLM-style unload): still in the library,
    # but not served, listed or routed to until loaded again.
    hidden: set[str] = field(default_factory=set, init=False)
    _route_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        # The engine serves every Llama-family base; anything else takes the PEFT reference path.
        if supports(self.base.model):
            self.generator = Engine(self.base, resolve=self._adapter, max_batch=self.max_batch,
                                    max_resident=self.max_resident, int8_rows=self.int8_rows,
                                    int8_matmuls=self.int8_matmuls)
        else:
            self.generator = Generator(self.base, resolve=self._adapter_path, max_resident=self.max_resident)

    @property
    def engine(self) -> Engine | Generator:
        return self.generator

    @classmethod
    def open(cls, base: str = EMBEDDED, library: str | Path | None = None, dtype: str | None = None,
             int8_rows: int = 0, int8_matmuls: bool = False) -> "Runtime":
        return cls(Base.load(base, dtype=dtype), Library(Path(library) if library else None), int8_rows=int8_rows,
                   int8_matmuls=int8_matmuls)

    def _adapter_path(self, name: str) -> str:
        return str(self._adapter(name).path)

    def _adapter(self, name: str) -> Adapter:
        if name in self.hidden:
            raise NotFoundError(unknown_name_message("adapter", name, self.served()))
        adapter = self.library.get(name)
        if name not in self._checked:
            fp = adapter.card.base_fingerprint
            if fp and fp != self.base.fingerprint:
                raise IncompatibleError(
                    f"adapter {name!r} was trained for base {fp}, but the loaded base is {self.base.fingerprint} ({self.base.name})"
                )
            self._checked.add(name)
        return adapter

    def fits(self, name: str) -> bool:
        """Whether routers may choose adapter `name`: it exists, was made for this base and its
        card does not say `routable: false`."""
        try:
            return self._adapter(name).card.routable
        except LorastackError:
            return False

    def served(self) -> list[str]:
        """Library adapters this runtime serves (not hidden)."""
        return [n for n in self.library.names() if n not in self.hidden]

    def refresh(self, name: str) -> None:
        """Forget everything cached about adapter `name` (it was added, replaced or removed);
        rows already decoding keep the weights they started with."""
        self._checked.discard(name)
        forget = getattr(self.generator, "forget", None)
        if forget is not None:
            forget(name)

    def decide(self, spec: "str | Spec", texts: list[str], false_route: float | None = None) -> list:
        """A `RouteDecision` per text: fixed SPECs decide nothing, `auto...` asks its router
        (at operating point `false_route` when given, else the router's own).

        Routers are not re-entrant (they build indexes lazily), so calls are serialised; a
        route naming an adapter that is no longer served is trimmed to what is.
        """
        from .routing import RouteDecision

        parsed = self.route(spec)
        if not isinstance(parsed, AutoSpec):
            return [RouteDecision(parsed) for _ in texts]
        with self._route_lock:
            decisions = self._route_retrying(parsed.router, texts, false_route)
        for d in decisions:
            kept = tuple((n, w) for n, w in d.route.entries if self.fits(n))
            if len(kept) != len(d.route.entries):
                total = sum(w for _, w in kept)
                d.route = Route(tuple((n, w / total) for n, w in kept)) if kept and total > 0 else Route()
                d.abstained = d.abstained or not kept
        return decisions

    def _route_retrying(self, router: str | None, texts: list[str], false_route: float | None = None) -> list:
        """Route `texts`; an adapter removed while the router read the library makes it
        read again (optimistic: removals are rare and the next read no longer sees it)."""
        for _ in range(3):
            try:
                return self.router(router).route(texts, false_route=false_route)
            except NotFoundError:
                continue
        # The library kept changing under the router (adapters imported and removed faster than
        # it reads them): answer with the bare base, marked as an abstention, rather than fail.
        from .routing import RouteDecision

        return [RouteDecision(Route(), {}, True) for _ in texts]

    def context_length(self) -> int:
        """The base's context window in tokens (`Base.context_length`)."""
        return self.base.context_length()

    def router_name(self, spec: str) -> str | None:
        parsed = parse_spec(spec)
        if isinstance(parsed, AutoSpec):
            from .config import default_router

            return parsed.router or default_router()
        return None

    def router(self, name: str | None = None):
        """A router by name (default: config `[routing] default`, else kNN), kept for reuse."""
        from .config import default_router, load_config, router_options
        from .routing import get_router

        config = load_config()
        name = name or default_router(config)
        if name not in self._routers:
            self._routers[name] = get_router(name, self, router_options(name, config))
        return self._routers[name]

    def routes_for(self, spec: "str | Spec", prompts: list[str]) -> list[Route]:
        """One Route per prompt: fixed SPECs give the same route, `auto...` asks the router."""
        return [d.route for d in self.decide(spec, prompts)]

    def route(self, spec: "str | Spec") -> Route | AutoSpec:
        """Parse a SPEC and check that every adapter it names exists and fits the base."""
        parsed = parse_spec(spec) if isinstance(spec, str) else spec
        if isinstance(parsed, AutoSpec):
            self.router(parsed.router)  # unknown router names fail here, with close names
            return parsed
        if is_stack(parsed):
            raise SpecError(f"{spec!r} is a stack, not one route: here (a stack's stage, a mixture, an export) only "
                            "an adapter, a mixture, base or auto can run")
        known = set(self.served())
        for name in parsed.names:
            if name not in known:
                raise NotFoundError(unknown_name_message("adapter", name, known))
            self._adapter_path(name)
        return parsed

    def start(self, spec: "str | Spec", prompt: str | Messages | list[int], sampling: Sampling = Sampling(), *,
              false_route: float | None = None, decision: Any = None,  # a RouteDecision, or a checked Route
              on_event: Callable[[str | None], None] | None = None,
              abandon_when: Callable[[str], bool] | None = None, text: str | None = None) -> Handle:
        """Start answering `prompt` (a user message, a conversation, or token ids for a raw
        completion) with `spec`: a fixed route, `auto...` (decided here unless the caller
        already holds the `decision`), `stack/NAME` or a stack spec. Returns at once; the
        engine decodes in its background loop. `on_event` receives the answer's text pieces
        and a final None, on the engine's thread. `text` is what a router or a stack reads
        (default: the last user message, or the raw prompt's text)."""
        parsed = parse_spec(spec) if isinstance(spec, str) else spec
        if text is None:
            text = _routing_text(prompt, self.base) if isinstance(parsed, AutoSpec) or is_stack(parsed) \
                or decision is None else ""
        if is_stack(parsed):
            from .stacks.handle import start_stack

            return start_stack(self, parsed, text, on_event=on_event)
        if decision is None:
            decision = self.decide(parsed, [text], false_route)[0]
        elif isinstance(decision, Route):  # a route the caller already checked (evaluation, stack stages)
            from .routing import RouteDecision

            decision = RouteDecision(decision)
        label = str(spec) if isinstance(spec, str) else str(decision.route)
        if isinstance(self.generator, Engine):
            ids = prompt if _is_ids(prompt) else self.base.chat_ids(_messages(prompt))
            reroute = (lambda: self.decide(parsed, [text], false_route)[0].route) if isinstance(parsed, AutoSpec) else None
            self.generator.start()  # idempotent; restarts a loop that died
            req = self.generator.submit_ids(ids, decision.route, sampling, abandon_when=abandon_when, on_event=on_event,
                                            reroute=reroute)
            return EngineHandle(req, decision, label)
        if _is_ids(prompt):
            raise LorastackError("raw token prompts need the engine (a Llama-family base)")
        handle = DoneHandle(self.generator.generate([_messages(prompt)], decision.route, sampling)[0], decision, label)
        if on_event is not None:
            on_event(handle.text)
            on_event(None)
        return handle

    def generate(self, prompt: str | Messages, model: "str | Spec" = "base", sampling: Sampling = Sampling()) -> Generation:
        """One reply; `prompt` is a user message or a whole conversation."""
        return self.start(model, prompt, sampling).result()


def _is_ids(prompt: object) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], int)


def _messages(prompt: str | Messages) -> Messages:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _routing_text(prompt: str | Messages | list[int], base: Base) -> str:
    """What a router (or a stack's first stage) reads: the last user message, or a raw prompt's text."""
    if isinstance(prompt, str):
        return prompt
    if _is_ids(prompt):
        return base.tokenizer.decode(prompt)  # type: ignore[arg-type]
    messages = list(prompt)  # type: ignore[arg-type]
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return users[-1] if users else (messages[-1]["content"] if messages else "")
