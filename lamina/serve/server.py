"""Running the app: ``serve`` (blocking, what ``lamina serve`` calls) and ``BackgroundServer`` (a live
server in a thread of this process, for tests, benchmarks and notebooks)::

    from lamina.serve import BackgroundServer

    with BackgroundServer({"smollm2": lamina.load("smollm2")}) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
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


# glibc mallopt parameters (malloc.h) and the values the server sets unless the environment sets them
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
MALLOC_SETTINGS = {
    "MALLOC_MMAP_THRESHOLD_": (_M_MMAP_THRESHOLD, 256 * 1024),
    "MALLOC_TRIM_THRESHOLD_": (_M_TRIM_THRESHOLD, 1024 * 1024),
    "MALLOC_ARENA_MAX": (_M_ARENA_MAX, 2),
}


def release_memory() -> bool:
    """Keep the server's resident memory close to what it uses (glibc only; False elsewhere).

    By default glibc serves blocks up to 32 MiB from its heaps once a block that large has been freed (its
    mmap threshold adapts), keeps freed heap memory, and gives each thread its own heap: a server whose
    KV caches, logits and activations change size with every batch keeps tens of MiB it no longer uses.
    Here blocks of 256 KiB and more are mapped apart (returned to the system when freed), free heap memory
    above 1 MiB is returned, at most 2 heaps are made, and what is free now is returned (``malloc_trim``).
    A ``MALLOC_*`` variable set in the environment keeps its value (glibc read it at start)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows)
        return False
    for var, (param, value) in MALLOC_SETTINGS.items():
        if var not in os.environ:
            mallopt(param, value)
    trim(0)
    return True


def serve(
    models: Mapping[str, LoadedModel], config: ServeConfig | None = None, log_level: str = "info"
) -> None:
    """Serve ``models`` (name -> loaded model) over HTTP until interrupted (Ctrl-C); on glibc the
    allocator is set to return memory it no longer uses (``release_memory``)."""
    config = config or ServeConfig()
    release_memory()
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
