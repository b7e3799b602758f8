"""Running the app: ``serve`` (blocking, what ``lamina serve`` calls) and ``BackgroundServer`` (a live
server in a thread of this process, for tests, benchmarks and notebooks)::

    from lamina.serve import BackgroundServer

    with BackgroundServer({"smollm2": lamina.load("smollm2")}) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Mapping
from types import TracebackType

import uvicorn

from lamina.checkpoint.load import LoadedModel
from lamina.errors import LaminaError
from lamina.serve.app import create_app
from lamina.serve.registry import Registry
from lamina.serve.settings import ServeConfig

log = logging.getLogger("lamina.serve")


def build_registry(models: Mapping[str, LoadedModel], config: ServeConfig | None = None) -> Registry:
    """A registry serving each loaded model under its name (kind from its architecture), and the LoRA
    adapters of ``config.lora_modules`` over them (``Registry.add_adapter``)."""
    registry = Registry(config)
    for name, lm in models.items():
        registry.add(name, lm)
    for name, path, base in registry.config.adapters():
        registry.add_adapter(name, path, base)
    return registry


def serve(
    models: Mapping[str, LoadedModel], config: ServeConfig | None = None, log_level: str = "info"
) -> None:
    """Serve ``models`` (name -> loaded model) over HTTP until interrupted (Ctrl-C). The process's
    allocator is left alone: ``lamina serve`` sets ``lamina.malloc.set_malloc_policy("release")`` (free
    memory returned to the system) after loading, before calling this."""
    config = config or ServeConfig()
    app = create_app(build_registry(models, config), config)
    uvicorn.run(app, host=config.host, port=config.port, log_level=log_level, timeout_graceful_shutdown=5,
                root_path=config.root_path)  # fmt: skip


class BackgroundServer:
    """A live server on loopback in a background thread; ``url`` is its base URL (``http://127.0.0.1:PORT``).

    ``port=0`` (the default) picks a free port (``config.port`` is not used). Use as a context manager, or call ``start`` / ``stop``.
    """

    def __init__(
        self,
        models: Mapping[str, LoadedModel],
        config: ServeConfig | None = None,
        port: int = 0,
        log_level: str = "warning",
    ) -> None:
        self.config = config or ServeConfig(port=port)
        self.registry = build_registry(models, self.config)
        self.app = create_app(self.registry, self.config)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((self.config.host, port))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://{self.config.host}:{self.port}"
        self._server = uvicorn.Server(
            uvicorn.Config(
                self.app, log_level=log_level, timeout_graceful_shutdown=2, root_path=self.config.root_path
            )
        )
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        """Start serving; returns when the server accepts connections."""
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, name="lamina-serve", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise LaminaError(f"the server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and wait for the thread."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
