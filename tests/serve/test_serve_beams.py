"""Beam search served: lamina's ``num_beams`` extra field and vLLM's ``use_beam_search`` (with ``best_of`` /
``n``) on /v1/completions and /v1/chat/completions, in the engine's batch; streaming refused. Speculative
decoding served (``ServeConfig.speculative_layers``): the same choices, acceptance in /metrics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_chat import CONTEXT, tiny_tokenizer

MESSAGES = [{"role": "user", "content": "hello world"}]


def _client(**limits: Any) -> Any:
    """A TestClient of a server (``limits``: ServeConfig fields) of a tiny random model "tiny"; its model."""
    from fastapi.testclient import TestClient

    from lamina.checkpoint.load import LoadedModel
    from lamina.checkpoint.registry import ModelEntry
    from lamina.config import GenerationConfig, ModelConfig
    from lamina.model.transformer import Transformer
    from lamina.serve import Registry, ServeConfig, create_app

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = ModelConfig.preset("llama-tiny", vocab_size=tok.vocab_size, max_seq_len=CONTEXT)
    lm = LoadedModel(
        Transformer(cfg).eval(), tok, GenerationConfig(eos_token_ids=[tok.eos_token_id]),
        ModelEntry("tiny", Path("."), "path", "lamina"),
    )  # fmt: skip
    registry = Registry(ServeConfig(**{"timeout": 60.0, **limits}))  # a hang: a 504 in 60 s, not 600
    registry.add("tiny", lm)
    return TestClient(create_app(registry)), lm


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Any, Any]]:
    """(a TestClient of a server of a tiny random model "tiny", the model)."""
    client, lm = _client()
    with client:
        yield client, lm


def _beams(lm: Any, ids: list[int], max_tokens: int, num_beams: int, n: int) -> list[list[int]]:
    from lamina.config import GenerationConfig
    from lamina.generate.beam import beam_search

    cfg = GenerationConfig(max_new_tokens=max_tokens, num_beams=num_beams, n=n, temperature=0)
    return [b.tokens for b in beam_search(lm.model, [ids], cfg, lm.generation.eos_token_ids)[0]]


def test_num_beams_and_use_beam_search_return_the_best_beams(served: Any) -> None:
    # before: num_beams was a reserved field (400 "beam search is not served"), use_beam_search unknown
    client, lm = served
    tok = lm.tokenizer
    ids = tok.encode("the cat")
    want = _beams(lm, ids, 6, 3, 2)
    for extra in ({"num_beams": 3, "n": 2}, {"use_beam_search": True, "best_of": 3, "n": 2}):
        body = {"model": "tiny", "prompt": "the cat", "max_tokens": 6, **extra}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        assert [c["index"] for c in choices] == [0, 1]
        assert [tok.encode(c["text"]) for c in choices] == want, extra
        assert r.json()["usage"]["completion_tokens"] == sum(len(w) for w in want)
    chat_ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    (best,) = _beams(lm, chat_ids, 5, 2, 1)
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 5, "use_beam_search": True}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    assert tok.encode(choice["message"]["content"]) == best and choice["finish_reason"] == "length"
    # the batch keeps serving around a beam request
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "the cat", "max_tokens": 3})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "num_beams": 2, "stream": True}, "stream"),
        ({"prompt": "x", "use_beam_search": True, "logprobs": 1}, "logprobs"),
        ({"prompt": "x", "num_beams": 2, "n": 3}, "n"),
        ({"prompt": "x", "num_beams": 2, "stop": ["y"]}, "stop"),
        ({"messages": MESSAGES, "use_beam_search": True, "stream": True}, "stream"),
    ],
)
def test_what_beam_search_cannot_give_is_a_400(served: Any, body: dict[str, Any], param: str) -> None:
    client, _ = served
    route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = client.post(route, json={"model": "tiny", "max_tokens": 3, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_a_beam_request_counts_its_beams_in_flight() -> None:
    # num_beams rows are decoded together: 4 x (2 prompt + 10) = 48 tokens > 40; n=1 alone would be 12
    client, _ = _client(max_tokens_in_flight=40)
    with client:
        body = {"model": "tiny", "prompt": "the cat", "max_tokens": 10, "num_beams": 4}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 400 and "4 sequences" in r.json()["error"]["message"], r.text
        r = client.post("/v1/completions", json={**body, "num_beams": 2})
        assert r.status_code == 200, r.text


def test_speculative_decoding_serves_the_greedy_text_and_counts_acceptance(served: Any) -> None:
    # before: the server had no draft (--draft / --speculative-layers reached only lamina generate)
    plain_client, _ = served
    client, _ = _client(speculative_layers=1, num_draft_tokens=3)
    bodies = [
        {"model": "tiny", "prompt": "the cat", "max_tokens": 12, "temperature": 0},
        {"model": "tiny", "prompt": "hello world", "max_tokens": 6, "temperature": 0, "num_beams": 2},
        {"model": "tiny", "prompt": "the cat", "max_tokens": 8, "temperature": 0.8, "seed": 3},
    ]
    with client:
        for body in bodies:
            r = client.post("/v1/completions", json=body)
            want = plain_client.post("/v1/completions", json=body)
            assert r.status_code == want.status_code == 200, r.text
            assert r.json()["choices"] == want.json()["choices"], body
        metrics = client.get("/metrics").text
    proposed = [line for line in metrics.splitlines() if line.startswith("lamina_draft_tokens_proposed")]
    assert proposed and float(proposed[0].split()[-1]) > 0, metrics
