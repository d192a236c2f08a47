"""User-facing errors.

Every error a user can cause (bad input, unknown names, incompatible files) derives from
`LorastackError`; the CLI prints these as one clear message instead of a traceback.
Anything else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LorastackError(Exception):
    """An error caused by user input or environment, reported without a traceback."""


class DataError(LorastackError):
    """Malformed dataset input (names the file and line)."""


class NotFoundError(LorastackError):
    """A named thing (adapter, task, base) does not exist."""


class IncompatibleError(LorastackError):
    """An adapter does not fit the base it is used with."""


class EngineError(LorastackError):
    """A request failed inside the engine (not because of what the client sent); the
    engine itself goes on serving every other request."""


def unknown_name_message(kind: str, name: str, known: Iterable[str]) -> str:
    """Say what was asked for and which known names are close, so typos fix themselves."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    msg = f"unknown {kind} {name!r}"
    if close:
        msg += f"; did you mean {', '.join(repr(c) for c in close)}?"
    if known:
        shown = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "")
        msg += f" (known: {shown})"
    else:
        msg += f" (no {kind}s exist yet)"
    return msg
