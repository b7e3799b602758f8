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

from typing import Any

from lamina.serve.settings import ServeConfig

# The rest needs the serve extra (fastapi, uvicorn, pydantic): imported on first use, so `lamina serve
# --help` and `from lamina.serve.settings import ServeConfig` stay light.
_LAZY = {
    "create_app": "lamina.serve.app",
    "Registry": "lamina.serve.registry",
    "ServedModel": "lamina.serve.registry",
    "BackgroundServer": "lamina.serve.server",
    "build_registry": "lamina.serve.server",
    "serve": "lamina.serve.server",
}

__all__ = [
    "BackgroundServer",
    "Registry",
    "ServeConfig",
    "ServedModel",
    "build_registry",
    "create_app",
    "serve",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lamina.serve' has no attribute {name!r}")
