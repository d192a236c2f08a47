"""Adapter names become directory names and URL path parts, so they are validated strictly.

Allowed: 1-64 characters from letters, digits, `.`, `_`, `-`, starting with a letter or
digit; no `..`; not a reserved SPEC word. This rules out path traversal (`../x`, `a/b`),
hidden files, and names that would be ambiguous in the `model` field (`a:0.5+b`).
"""

from __future__ import annotations

import re

from .errors import LorastackError

MAX_NAME_LEN = 64
# Matched with `fullmatch`: `$` alone would accept a trailing newline ("base\n").
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
RESERVED = {"base", "auto", "stack"}


class InvalidNameError(LorastackError):
    """The adapter name is not safe to use as a file name or SPEC term."""


def validate_name(name: str) -> str:
    """Return `name` unchanged if it is a valid adapter name, else raise with the reason."""
    if not isinstance(name, str) or not name:
        raise InvalidNameError("adapter name must not be empty")
    if len(name) > MAX_NAME_LEN:
        raise InvalidNameError(f"adapter name is {len(name)} characters; the limit is {MAX_NAME_LEN}")
    if ".." in name:
        raise InvalidNameError(f"adapter name {name!r} must not contain '..'")
    if not _NAME_RE.fullmatch(name):
        raise InvalidNameError(
            f"adapter name {name!r} may use only letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    if name.lower() in RESERVED:
        raise InvalidNameError(f"adapter name {name!r} is reserved (it means something else in a model SPEC)")
    return name
