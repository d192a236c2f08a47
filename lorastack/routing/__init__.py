"""Routers: text -> Route. One protocol, strategies registered by name (`auto:<name>`)."""

from __future__ import annotations

from .router import RouteDecision, Router, get_router, register, ROUTERS  # noqa: F401
from . import arrow, knn, learned  # noqa: F401  (register "arrow", "knn", "learned")

from ..config import BUILTIN_DEFAULT_ROUTER as DEFAULT_ROUTER  # noqa: E402  (plain `auto` without a config)
