"""``lamina serve``: an OpenAI-compatible HTTP server with continuous batching (needs the ``serve`` extra:
fastapi, uvicorn, pydantic).

    app.py        create_app(): the routes         schemas.py    request / response bodies (pydantic)
    params.py     requests -> engine inputs         outputs.py    engine results -> responses, SSE chunks
    scheduler.py  engine thread, jobs, queue bound  registry.py   served models by name and kind
    guards.py     API keys, body size, counting     errors.py     OpenAI error objects and handlers
    metrics.py    Prometheus text                   settings.py   ServeConfig
    server.py     serve(), BackgroundServer
"""

from __future__ import annotations

from lamina.serve.app import create_app
from lamina.serve.registry import Registry, ServedModel
from lamina.serve.server import BackgroundServer, build_registry, serve
from lamina.serve.settings import ServeConfig

__all__ = [
    "BackgroundServer",
    "Registry",
    "ServeConfig",
    "ServedModel",
    "build_registry",
    "create_app",
    "serve",
]
