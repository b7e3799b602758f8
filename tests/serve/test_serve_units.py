"""The server's parts without a model: Prometheus text, OpenAI error shapes, limits, the CLI verb."""

from __future__ import annotations

from typing import Any

import pytest

from lamina.errors import ConfigError
from lamina.serve.errors import APIError
from lamina.serve.metrics import Metrics, parse
from lamina.serve.settings import ServeConfig


def test_prometheus_text() -> None:
    m = Metrics()
    m.inc("requests_total", route="/v1/completions", status="200")
    m.inc("requests_total", route="/v1/completions", status="200")
    m.set("queued_requests", lambda: 3, model="m")
    m.set_max("running_sequences_max", 5, model="m")
    m.set_max("running_sequences_max", 2, model="m")
    for v in (0.003, 0.2, 7.0):
        m.observe("time_to_first_token_seconds", v, model="m")
    m.generated(40, model="m")
    text = m.render()
    assert "# TYPE lamina_time_to_first_token_seconds histogram" in text
    values = parse(text)
    assert values['lamina_requests_total{route="/v1/completions",status="200"}'] == 2
    assert values['lamina_queued_requests{model="m"}'] == 3
    assert values['lamina_running_sequences_max{model="m"}'] == 5
    assert values['lamina_time_to_first_token_seconds_bucket{model="m",le="0.005"}'] == 1
    assert values['lamina_time_to_first_token_seconds_bucket{model="m",le="+Inf"}'] == 3
    assert values['lamina_time_to_first_token_seconds_count{model="m"}'] == 3
    assert values['lamina_generation_tokens_total{model="m"}'] == 40
    assert values['lamina_tokens_per_second{model="m"}'] == pytest.approx(4.0)


def test_api_error_shapes() -> None:
    e = APIError(429, "busy", code="queue_full", headers={"Retry-After": "1"})
    assert e.body() == {
        "error": {"message": "busy", "type": "rate_limit_error", "param": None, "code": "queue_full"}
    }
    assert e.response().status_code == 429 and e.response().headers["retry-after"] == "1"
    assert e.sse().startswith('data: {"error": ')
    assert APIError(500, "x").type == "server_error" and APIError(400, "x").type == "invalid_request_error"


def test_serve_config_checks_its_values() -> None:
    assert ServeConfig().host == "127.0.0.1"  # loopback by default
    for bad in ({"max_n": 0}, {"timeout": -1}, {"max_queue": 0}, {"api_keys": [""]}, {"port": 70000}):
        with pytest.raises(ConfigError):
            ServeConfig(**bad)  # type: ignore[arg-type]


def test_cli_serve_builds_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    import lamina.cli.generate
    import lamina.cli.serve
    import lamina.serve
    from lamina.cli.main import main

    seen: dict[str, Any] = {}
    monkeypatch.setattr(
        lamina.serve, "serve", lambda models, config, log_level: seen.update(models=models, config=config)
    )
    events: list[str] = []  # the server process returns free memory (lamina.malloc), set after loading
    monkeypatch.setattr(lamina.cli.generate, "load",
                        lambda model, **options: events.append("load") or f"loaded {model}")  # fmt: skip
    monkeypatch.setattr(lamina.cli.serve, "set_malloc_policy", lambda policy: events.append(policy))
    monkeypatch.setenv("LAMINA_API_KEY", "k1,k2")
    argv = ["serve", "smollm2", "minilm", "--served-model-name", "chat", "--port", "9001", "--max-n", "4",
            "--timeout", "0", "--max-tokens-in-flight", "4096"]  # fmt: skip
    assert main(argv) == 0
    assert seen["models"] == {"chat": "loaded smollm2", "minilm": "loaded minilm"}
    assert events == ["load", "load", "release"]
    cfg = seen["config"]
    assert (cfg.host, cfg.port, cfg.api_keys, cfg.max_n, cfg.timeout) == (
        "127.0.0.1",
        9001,
        ["k1", "k2"],
        4,
        None,
    )
    assert cfg.max_tokens_in_flight == 4096
    assert main([*argv, "--api-key", "only"]) == 0 and seen["config"].api_keys == ["only"]
    assert main(["serve", "a", "--served-model-name", "x", "--served-model-name", "y"]) == 1  # too many names


def test_cli_serve_help(capsys: pytest.CaptureFixture[str]) -> None:
    from lamina.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--host", "--port", "--api-key", "--max-batch-size", "--max-queue", "--timeout",
                 "--served-model-name", "--max-tokens-in-flight"):  # fmt: skip
        assert flag in out
