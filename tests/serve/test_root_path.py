"""Behind a reverse proxy that strips a path prefix (``root_path``): the routes answer, and the API key is
still required on /v1/* (uvicorn puts the prefix in the request path; a guard that looked at the raw path
let every request through)."""

from __future__ import annotations

import httpx
import pytest
from tiny_chat import tiny_lm

from lamina.errors import ConfigError
from lamina.serve.server import BackgroundServer
from lamina.serve.settings import ServeConfig


def test_root_path_keeps_the_api_key_and_the_routes() -> None:
    config = ServeConfig(root_path="/lamina", api_keys=["k1"])
    with BackgroundServer({"tiny": tiny_lm()}, config) as server:
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
        ok = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer k1"})
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "tiny"
        assert httpx.get(f"{server.url}/health").status_code == 200
        page = httpx.get(f"{server.url}/")
        assert page.status_code == 200 and "<html" in page.text.lower()
    with pytest.raises(ConfigError, match="root_path"):
        ServeConfig(root_path="lamina/")
