"""Optional user settings in `$LORASTACK_HOME/config.toml`.

Only choices a user may want to change without code live here; everything has a default,
so no file is needed. Example:

    [routing]
    default = "knn"          # what plain `auto` means (env LORASTACK_ROUTER wins)

    [routing.knn]            # keyword options of that router
    calibration = 0.92       # abstention threshold, as a fraction of in-library similarity
    k = 8

    [routing.learned]
    top_k = 2
    min_prob = 0.5
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from .errors import LorastackError
from .paths import lorastack_home

BUILTIN_DEFAULT_ROUTER = "knn"


def config_path() -> Path:
    return lorastack_home() / "config.toml"


def load_config(path: Path | None = None) -> dict[str, Any]:
    path = path or config_path()
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise LorastackError(f"{path}: not valid TOML ({e})") from None


def default_router(config: dict[str, Any] | None = None) -> str:
    routing = (config if config is not None else load_config()).get("routing", {})
    return os.environ.get("LORASTACK_ROUTER") or routing.get("default") or BUILTIN_DEFAULT_ROUTER


def router_options(name: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    options = (config if config is not None else load_config()).get("routing", {}).get(name, {})
    if not isinstance(options, dict):
        raise LorastackError(f"{config_path()}: [routing.{name}] must be a table of options")
    return options
