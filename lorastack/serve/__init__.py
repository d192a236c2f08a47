"""The OpenAI-compatible HTTP server (`lorastack serve`): FastAPI over the engine's background loop."""

from .app import create_app  # noqa: F401
from .settings import ServeSettings  # noqa: F401
