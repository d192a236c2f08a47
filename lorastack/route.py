"""Routes and the SPEC grammar that names them.

A Route is an ordered list of `(adapter, weight)`; empty means the bare base. Every entry
point (CLI `--model`, Python API, server `model` field) parses the same SPEC:

    base                 the bare base model
    NAME                 one adapter at weight 1
    a:0.7+b:0.3          a weighted mixture of LoRA deltas
    auto[:ROUTER]        chosen per input by a router (see lorastack.routing)
    stack/NAME           a stored multi-stage stack (see lorastack.stacks)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import LorastackError


class SpecError(LorastackError):
    """A model SPEC string that does not parse."""


@dataclass(frozen=True)
class Route:
    entries: tuple[tuple[str, float], ...] = ()

    @property
    def is_base(self) -> bool:
        return not self.entries

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.entries]

    def __str__(self) -> str:
        if self.is_base:
            return "base"
        if len(self.entries) == 1 and self.entries[0][1] == 1.0:
            return self.entries[0][0]
        return "+".join(f"{n}:{w:g}" for n, w in self.entries)

    def to_json(self) -> list[dict[str, float | str]]:
        return [{"adapter": n, "weight": w} for n, w in self.entries]


BASE_ROUTE = Route()


@dataclass(frozen=True)
class AutoSpec:
    """`auto` or `auto:<router>`: resolved to a Route per input by a router."""

    router: str | None = None


@dataclass(frozen=True)
class StackRef:
    """`stack/<name>`: a stack stored in the library, run stage by stage (lorastack.stacks)."""

    name: str


def is_stack(spec: object) -> bool:
    """True when `spec` names a stack: `stack/NAME` (as a string or a parsed StackRef) or a
    stack spec itself (a lorastack.stacks.StackSpec; recognised by its `stages`, since this
    layer does not import stacks). The one test the runtime, server, CLI and eval all use, so
    they cannot disagree on what runs stage by stage. A string that does not parse raises SpecError."""
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    return isinstance(parsed, StackRef) or hasattr(parsed, "stages")


MAX_WEIGHT = 10.0
_WEIGHT = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def parse_spec(spec: str) -> Route | AutoSpec | StackRef:
    """Parse a SPEC into a Route (names not yet checked against a library) or an AutoSpec."""
    s = spec.strip(" ")
    if not s:
        raise SpecError("empty model spec; use 'base', an adapter name, or 'a:0.7+b:0.3'")
    if any(ord(c) < 32 or ord(c) == 127 for c in s):
        raise SpecError(f"{spec!r}: model spec contains a control character (newline, tab, ...)")
    if s == "base":
        return BASE_ROUTE
    if "+" in s and any(t.strip(" ").split(":")[0] == "auto" for t in s.split("+")):
        raise SpecError(f"{spec!r}: 'auto' cannot be part of a mixture (it picks its own adapters per input); "
                        "use 'auto' alone, or [routing.learned] top_k > 1 for routed mixtures")
    if s == "auto" or s.startswith("auto:"):
        router = s[5:]
        if s.startswith("auto:") and not router:
            raise SpecError(f"{spec!r}: name a router after 'auto:' (e.g. auto:knn) or use plain 'auto'")
        return AutoSpec(router or None)
    if s.startswith("stack/"):
        from .names import InvalidNameError, validate_name

        try:
            return StackRef(validate_name(s[6:]))
        except InvalidNameError as e:
            raise SpecError(f"{spec!r}: stack {e}".replace("adapter name", "name")) from None
    if any(c.isspace() and c != " " for c in s):
        raise SpecError(f"{spec!r}: model spec contains unusual whitespace (only plain spaces may surround its terms)")
    parts = s.split("+")
    entries: list[tuple[str, float]] = []
    for part in parts:
        part = part.strip(" ")
        if not part:
            raise SpecError(f"{spec!r}: empty term in mixture (check the '+' signs)")
        if ":" in part:
            name, _, wtxt = part.rpartition(":")
            name, wtxt = name.strip(" "), wtxt.strip(" ")
            if not _WEIGHT.fullmatch(wtxt):  # float() would also take '1_0', 'inf', ' 2 '
                try:
                    float(wtxt)
                except ValueError:
                    raise SpecError(f"{spec!r}: weight {wtxt!r} of {name!r} is not a number") from None
                raise SpecError(f"{spec!r}: weight {wtxt!r} of {name!r} must be a positive number written plainly, such as 0.5")
            weight = float(wtxt)
        else:
            if len(parts) > 1:
                raise SpecError(f"{spec!r}: every term of a mixture needs a weight, e.g. {part}:0.5")
            name, weight = part, 1.0
        if not name:
            raise SpecError(f"{spec!r}: a weight without an adapter name")
        if not math.isfinite(weight) or weight <= 0:
            raise SpecError(f"{spec!r}: weight of {name!r} must be a positive number, got {wtxt}")
        if weight > MAX_WEIGHT:
            raise SpecError(f"{spec!r}: weight of {name!r} is {wtxt}; at most {MAX_WEIGHT:g} (a delta scaled far beyond its "
                            "trained size only adds noise)")
        if any(n == name for n, _ in entries):
            raise SpecError(f"{spec!r}: adapter {name!r} appears twice")
        entries.append((name, weight))
    return Route(tuple(entries))
