"""Live servers on loopback for the serve tests: uvicorn in a thread of the test process, real SmolLM2."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

API_KEY = "test-key"


@pytest.fixture(scope="module")
def make_server(lamina_smollm2: Any) -> Iterator[Callable[..., Any]]:
    """``make_server(models=None, **ServeConfig fields)``: a started ``BackgroundServer`` (SmolLM2 as
    "smollm2" unless ``models`` is given), stopped when the test module ends. Its request timeout is 90 s
    unless given (not the default 600 s): a request that hangs fails with a 504 before the client gives up."""
    from lamina.serve import BackgroundServer, ServeConfig

    servers: list[Any] = []

    def make(models: dict[str, Any] | None = None, **config: Any) -> Any:
        cfg = ServeConfig(**{"timeout": 90.0, **config})
        server = BackgroundServer(models or {"smollm2": lamina_smollm2}, cfg).start()
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.stop()
