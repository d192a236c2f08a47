"""The Router protocol and its registry.

A router sees only the input text and the library (plus the base, for embeddings) and
answers with a Route and the per-adapter scores behind it, so a user can see why.
Abstention (no confident match) answers with the bare base.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import LorastackError, NotFoundError, unknown_name_message
from ..route import BASE_ROUTE, Route

if TYPE_CHECKING:
    from ..runtime import Runtime


@dataclass
class RouteDecision:
    """A route plus what it was decided on.

    `scores` say which adapter each signal favoured (vote shares, probabilities); whether
    to route at all is a separate test: `confidence` (the router's margin or probability
    for `candidate`) against the `threshold` it had to reach, from signal `signal`
    (`examples`, `description`, `gate`, `arrow`). A high vote share next to "abstained"
    means the input was most like that adapter, but not like it enough.
    """

    route: Route
    scores: dict[str, float] = field(default_factory=dict)
    abstained: bool = False
    seconds: float = 0.0
    signal: str | None = None
    candidate: str | None = None
    confidence: float | None = None
    threshold: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"route": self.route.to_json(), "spec": str(self.route), "scores": self.scores,
                "abstained": self.abstained, "ms": round(self.seconds * 1000, 2), "signal": self.signal,
                "candidate": self.candidate, "confidence": self.confidence, "threshold": self.threshold}

    def explain(self) -> str:
        """One line: why this route (or why the bare base)."""
        if self.confidence is None or self.threshold is None:
            return "abstained" if self.abstained else "routed"
        verb = "abstained" if self.abstained else "routed"
        cmp = "<" if self.abstained else ">="
        return f"{verb}: best candidate {self.candidate} by {self.signal}, confidence {self.confidence:.3f} {cmp} threshold {self.threshold:.3f}"


class Router(Protocol):
    name: str

    def route(self, texts: list[str], false_route: float | None = None) -> list[RouteDecision]:
        """One decision per text; `false_route` overrides the operating point for this call."""
        ...


ROUTERS: dict[str, Callable[["Runtime"], Router]] = {}


def register(name: str) -> Callable:
    def deco(factory: Callable[["Runtime"], Router]) -> Callable[["Runtime"], Router]:
        ROUTERS[name] = factory
        return factory

    return deco


def get_router(name: str, runtime: "Runtime", options: dict[str, Any] | None = None) -> Router:
    """Router `name` over `runtime`; `options` are its keyword settings (from the config file)."""
    if name not in ROUTERS:
        raise NotFoundError(unknown_name_message("router", name, ROUTERS))
    try:
        return ROUTERS[name](runtime, **(options or {}))
    except TypeError as e:
        raise LorastackError(f"router {name!r}: bad option ({e})") from None


__all__ = ["BASE_ROUTE", "ROUTERS", "RouteDecision", "Router", "get_router", "register"]
