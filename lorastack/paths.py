"""Where lorastack keeps its state: one home directory, overridable by `$LORASTACK_HOME`."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def lorastack_home() -> Path:
    """The root for the default library and caches; env var first so tests and CI can isolate."""
    env = os.environ.get("LORASTACK_HOME")
    root = Path(env).expanduser() if env else Path(platformdirs.user_data_dir("lorastack"))
    return root


def default_library_dir() -> Path:
    return lorastack_home() / "library"


def cache_dir() -> Path:
    """Derived data (the dequantized base); `$LORASTACK_CACHE` lets tests share one copy."""
    env = os.environ.get("LORASTACK_CACHE")
    return Path(env).expanduser() if env else lorastack_home() / "cache"
