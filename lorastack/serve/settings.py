"""Server limits and security settings, in one place so the CLI, tests and docs agree."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LorastackError


@dataclass(frozen=True)
class ServeSettings:
    # Clients send `Authorization: Bearer KEY` (the openai client does); None = no auth.
    api_key: str | None = None
    # Requests waiting for a batch slot; past this the server answers 429 + Retry-After
    # instead of queueing without bound.
    max_queue: int = 64
    max_body_bytes: int = 1 << 20
    max_tokens_cap: int = 1024
    default_max_tokens: int = 256
    max_prompt_tokens: int = 4096
    # Directories that POST /v1/adapters and /v1/load_lora_adapter may import from; empty =
    # imports over HTTP are disabled (a server must not read arbitrary paths for a client).
    import_roots: tuple[Path, ...] = field(default_factory=tuple)
    retry_after_s: int = 1
    # /docs, /redoc and /openapi.json; behind the API key when one is set.
    docs: bool = True
    # One line per request (client, method, path, status, model, route, tokens, latency) to
    # the `lorastack.access` logger, stderr by default (`lorastack serve --access-log`).
    access_log: bool = False

    def __post_init__(self) -> None:
        for name in ("max_queue", "max_body_bytes", "max_tokens_cap", "default_max_tokens", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise LorastackError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.default_max_tokens > self.max_tokens_cap:  # a lower cap lowers the default with it
            object.__setattr__(self, "default_max_tokens", self.max_tokens_cap)
        roots = []
        for r in self.import_roots:
            p = Path(r).expanduser().resolve()
            if not p.is_dir():
                raise LorastackError(f"import root {r} is not a directory")
            roots.append(p)
        object.__setattr__(self, "import_roots", tuple(roots))

    @classmethod
    def with_env(cls, **kw) -> "ServeSettings":
        """`api_key` falls back to $LORASTACK_API_KEY, so the key need not be on a command line."""
        if not kw.get("api_key"):
            kw["api_key"] = os.environ.get("LORASTACK_API_KEY") or None
        return cls(**kw)

    def allowed_import(self, path: str) -> Path:
        """The resolved path if it lies under an import root; otherwise a clear refusal."""
        if not self.import_roots:
            raise PermissionError("adapter imports over HTTP are disabled; start the server with --import-root DIR")
        try:
            p = Path(path).expanduser().resolve()
        except (ValueError, OSError, RuntimeError) as e:  # NUL bytes, symlink loops, bad ~user
            raise PermissionError(f"{path!r} is not a usable path ({e})") from None
        if not any(p == r or r in p.parents for r in self.import_roots):
            raise PermissionError(f"{path} is outside the server's import roots")
        return p
