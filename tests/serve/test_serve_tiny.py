"""The routes in process on a tiny random model (fast): what a response holds when the first generated token
is end-of-sequence, n with greedy decoding, and prompts over the context window."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_chat import CONTEXT, tiny_tokenizer


def _tiny_lm(tok: Any, eos_after: list[int]) -> Any:
    """A random 2-layer decoder whose greedy next token after ``eos_after`` is eos (``<|im_end|>``)."""
    from lamina.checkpoint.load import LoadedModel
    from lamina.checkpoint.registry import ModelEntry
    from lamina.config import GenerationConfig, ModelConfig
    from lamina.model.transformer import Transformer

    torch.manual_seed(0)
    vocab, eos = tok.backend.get_vocab_size(), tok.eos_token_id
    cfg = ModelConfig.preset("llama-tiny", vocab_size=vocab, max_seq_len=CONTEXT, tie_embeddings=False)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        top = int(model(torch.tensor([eos_after]))[0, -1].argmax())
        w = model.lm_head.weight  # swap the output rows of the greedy token and eos
        w[[top, eos]] = w[[eos, top]]
    entry = ModelEntry("tiny", Path("."), "path", "lamina")
    return LoadedModel(model, tok, GenerationConfig(eos_token_ids=[eos]), entry)


MESSAGES = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def tiny() -> Iterator[tuple[Any, Any, list[int], int]]:
    """(a TestClient of a server of the tiny model "tiny", the model, the chat prompt's ids, the eos id)."""
    from fastapi.testclient import TestClient

    from lamina.serve import Registry, ServeConfig, create_app

    tok = tiny_tokenizer()
    prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    lm = _tiny_lm(tok, prompt)
    registry = Registry(ServeConfig(timeout=60.0))  # a hang: a 504 in 60 s, not 600
    registry.add("tiny", lm)
    with TestClient(create_app(registry)) as client:
        yield client, lm, prompt, lm.generation.eos_token_ids[0]


def _logsoftmax(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)


def _events(r: Any) -> list[dict[str, Any]]:
    lines = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_an_eos_first_token_has_its_logprobs_entry(tiny: Any) -> None:
    """lm-eval's scoring request (echo, logprobs=1, max_tokens=1, token ids): the prompt's entries and one
    for the generated token, eos included, so that dropping the last entry drops only it."""
    client, lm, prompt, eos = tiny
    body = {"model": "tiny", "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    n = len(prompt)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    assert len(lp["tokens"]) == n + 1 and choice["finish_reason"] == "stop"
    ref = _logsoftmax(lm.model, prompt)
    assert lp["tokens"][-1] == "<|im_end|>" and choice["text"] == lm.tokenizer.decode(prompt)
    assert lp["token_logprobs"][-1] == pytest.approx(float(ref[-1, eos]), abs=1e-4)
    assert lp["top_logprobs"][-1] == {"<|im_end|>": pytest.approx(float(ref[-1].max()), abs=1e-4)}
    assert r.json()["usage"]["completion_tokens"] == 1
    # without echo, and streamed: the same one entry
    r = client.post("/v1/completions", json={**body, "echo": False})
    assert r.json()["choices"][0]["logprobs"]["tokens"] == ["<|im_end|>"]
    r = client.post("/v1/completions", json={**body, "echo": False, "stream": True})
    entries = [t for e in _events(r) for c in e["choices"] if c["logprobs"] for t in c["logprobs"]["tokens"]]
    assert entries == ["<|im_end|>"]


def test_an_eos_first_token_is_in_chat_logprobs(tiny: Any) -> None:
    client, lm, prompt, eos = tiny
    body = {"model": "tiny", "messages": MESSAGES, "temperature": 0, "logprobs": True, "top_logprobs": 1}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == "" and choice["finish_reason"] == "stop"
    content = choice["logprobs"]["content"]
    assert [c["token"] for c in content] == ["<|im_end|>"] and r.json()["usage"]["completion_tokens"] == 1
    assert content[0]["logprob"] == pytest.approx(float(_logsoftmax(lm.model, prompt)[-1, eos]), abs=1e-4)
    r = client.post("/v1/chat/completions", json={**body, "stream": True})
    streamed = [
        t["token"]
        for e in _events(r)
        for c in e["choices"]
        if c.get("logprobs")
        for t in c["logprobs"]["content"]
    ]
    assert streamed == ["<|im_end|>"]


def test_n_with_greedy_decoding_gives_identical_choices(tiny: Any) -> None:
    """OpenAI and vLLM accept n > 1 with temperature 0 and return n identical choices."""
    client, _, prompt, _ = tiny
    body = {
        "model": "tiny",
        "prompt": prompt[:3],
        "max_tokens": 4,
        "temperature": 0,
        "n": 2,
        "ignore_eos": True,
    }
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1] and choices[0]["text"] == choices[1]["text"]
    assert r.json()["usage"]["completion_tokens"] == 8
    chat = {"model": "tiny", "messages": MESSAGES, "max_tokens": 3, "temperature": 0, "n": 3}
    r = client.post("/v1/chat/completions", json=chat)
    assert r.status_code == 200, r.text
    assert len({c["message"]["content"] for c in r.json()["choices"]}) == 1 and len(r.json()["choices"]) == 3
