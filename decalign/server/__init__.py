"""`decalign serve`: an OpenAI-compatible HTTP server that aligns at decoding time.

- config: ServerConfig, the server's settings
- schemas: the request, answer, stream-chunk and error bodies (pydantic), ApiError
- alignment: a request's `alignment` field, OpenAI's sampling fields and the defaults as one
  decalign Request (validated as the CLI's and the Python API's are)
- scheduler: the engine's worker thread, its bounded queue, and the requests that arrived together
  decoded in one batch whatever each asked for
- metrics: the Prometheus series behind /metrics
- app: create_app, the FastAPI routes, auth and error handling
- shutdown: serve_app, uvicorn with a shutdown that answers what is in flight and stops the engine
  (imported by the command only: uvicorn brings click, which the library does without)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_names

_HOMES = {"ServerConfig": ".config", "create_app": ".app", "shared_reward": ".alignment"}

__all__ = ["ServerConfig", "create_app", "shared_reward"]

if TYPE_CHECKING:  # what type checkers and editors see
    from .alignment import shared_reward
    from .app import create_app
    from .config import ServerConfig

# on first use: the command line reads the settings' defaults and choices (config) without fastapi and torch
__getattr__ = lazy_names(__name__, _HOMES)
