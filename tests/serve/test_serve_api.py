"""The OpenAI-compatible routes against a live server, through the official `openai` client and raw HTTP:
completions, chat, streaming, n, stop, seed, logprobs (and lm-evaluation-harness's echo scoring), JSON
mode, embeddings, auth, and an OpenAI-shaped 4xx for every kind of bad request."""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch

pytestmark = pytest.mark.slow

API_KEY = "test-key"

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server(make_server: Any, lamina_smollm2: Any, lamina_minilm: Any) -> Any:
    return make_server({"smollm2": lamina_smollm2, "minilm": lamina_minilm}, api_keys=[API_KEY])


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server: Any) -> Any:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def greedy(client: openai.OpenAI) -> Any:
    """The greedy 10-token completion of PROMPT, with logprobs (3 alternatives) and token ids."""
    return client.completions.create(
        model="smollm2",
        prompt=PROMPT,
        max_tokens=10,
        temperature=0,
        logprobs=3,
        extra_body={"return_tokens_as_token_ids": True},
    )


def _ids(logprobs: Any) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in logprobs.tokens]


def test_models_health_metrics_and_openapi(client: openai.OpenAI, server: Any) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"smollm2", "minilm"}
    assert models["smollm2"].kind == "generation" and models["minilm"].kind == "embedding"  # type: ignore[attr-defined]
    assert models["smollm2"].max_model_len == 8192  # type: ignore[attr-defined]
    assert client.models.retrieve("smollm2").id == "smollm2"
    health = httpx.get(server.url + "/health")  # no API key needed
    assert health.status_code == 200 and health.json()["status"] == "ok"
    metrics = httpx.get(server.url + "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'lamina_queued_requests{model="smollm2"}' in metrics.text
    schema = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/embeddings"} <= set(schema["paths"])


def test_greedy_completion_is_the_engine_output(greedy: Any, lamina_smollm2: Any) -> None:
    from lamina.config import GenerationConfig
    from lamina.generate.engine import generate_ids

    lm = lamina_smollm2
    ids = lm.tokenizer.encode(PROMPT)
    ref = generate_ids(
        lm.model,
        [ids],
        GenerationConfig(temperature=0, max_new_tokens=10),
        lm.generation.eos_token_ids,
        tokenizer=lm.tokenizer,
    )[0]
    choice = greedy.choices[0]
    assert _ids(choice.logprobs) == ref.tokens and choice.text == ref.text
    assert choice.finish_reason == "length" and choice.index == 0
    assert greedy.id.startswith("cmpl-") and greedy.object == "text_completion" and greedy.created > 1e9
    assert greedy.usage.prompt_tokens == len(ids) and greedy.usage.completion_tokens == 10
    assert greedy.usage.total_tokens == len(ids) + 10


def test_completion_logprobs(greedy: Any, client: openai.OpenAI) -> None:
    lp = greedy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 10
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0 and token in top and 1 <= len(top) <= 4
        assert math.isclose(value, max(top.values()), abs_tol=1e-5)  # greedy: the chosen one is the top one
    text = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=10, temperature=0, logprobs=0)
    lp = text.choices[0].logprobs
    assert "".join(lp.tokens) == text.choices[0].text
    assert lp.text_offset[0] == len(PROMPT) and all(len(t) == 1 for t in lp.top_logprobs)
    assert all(
        b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:], lp.tokens, strict=False)
    )


def test_streaming_equals_the_whole_response(greedy: Any, client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model="smollm2",
            prompt=PROMPT,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == greedy.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert len({c.id for c in chunks}) == 1


def test_chat_whole_and_streamed(client: openai.OpenAI, lamina_smollm2: Any) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]},
    ]
    whole = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length") and whole.object == "chat.completion"
    flat = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}]
    ids = lamina_smollm2.tokenizer.apply_chat_template(flat, add_generation_prompt=True, tokenize=True)
    assert whole.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(
        model="smollm2",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token
        assert math.isclose(t.top_logprobs[0].logprob, t.logprob, abs_tol=1e-5)
        assert bytes(t.bytes or []).decode() == t.token


def test_n_and_seed_reproducibility(client: openai.OpenAI) -> None:
    def run(seed: int) -> list[str]:
        r = client.completions.create(
            model="smollm2", prompt="Once upon a time", max_tokens=8, temperature=1.0, n=3, seed=seed
        )
        assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 24
        return [c.text for c in r.choices]

    first = run(7)
    assert run(7) == first  # same seed, same texts
    assert len(set(first)) > 1  # n sequences draw from their own streams
    assert run(8) != first


def test_stop_strings(greedy: Any, client: openai.OpenAI) -> None:
    text = greedy.choices[0].text  # " Paris.\n\nThe answer is:" or similar
    stop = text.strip()[3]  # a character inside the greedy text
    r = client.completions.create(
        model="smollm2", prompt=PROMPT, max_tokens=10, temperature=0, stop=[stop, "zzz"]
    )
    assert r.choices[0].text == text[: text.index(stop)] and r.choices[0].finish_reason == "stop"
    assert r.choices[0].stop_reason == stop  # type: ignore[attr-defined]


def test_token_id_prompts_and_several_prompts(
    greedy: Any, client: openai.OpenAI, lamina_smollm2: Any
) -> None:
    ids = lamina_smollm2.tokenizer.encode(PROMPT)
    r = client.completions.create(model="smollm2", prompt=ids, max_tokens=10, temperature=0)
    assert r.choices[0].text == greedy.choices[0].text
    r = client.completions.create(  # n > 1 needs sampling; top_k=1 samples the greedy token
        model="smollm2", prompt=[PROMPT, "2 + 2 ="], max_tokens=4, n=2, extra_body={"top_k": 1}
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == greedy.choices[0].text[: len(r.choices[0].text)]
    assert r.choices[2].text == r.choices[3].text != r.choices[0].text


def test_echo_logprobs_score_prompts_as_lm_evaluation_harness_does(http: Any, lamina_smollm2: Any) -> None:
    """lm-eval's `local-completions` sends token ids with echo=True, logprobs=1, max_tokens=0 (or 1) and sums
    token_logprobs over the continuation."""
    tok, model = lamina_smollm2.tokenizer, lamina_smollm2.model
    contexts = [tok.encode("The capital of France is"), tok.encode("Two plus two equals")]
    conts = [tok.encode(" Paris"), tok.encode(" four")]
    with torch.no_grad():
        refs = []
        for ctx, cont in zip(contexts, conts, strict=True):
            full = torch.tensor([ctx + cont])
            lp = torch.log_softmax(model(full)[0].float(), -1)
            refs.append([float(lp[i - 1, t]) for i, t in enumerate(ctx + cont) if i > 0])
    for max_tokens in (0, 1):
        body = {
            "model": "smollm2",
            "prompt": [c + d for c, d in zip(contexts, conts, strict=True)],
            "echo": True,
            "logprobs": 1,
            "max_tokens": max_tokens,
            "temperature": 0,
            "seed": 1234,
        }
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        choices = sorted(r.json()["choices"], key=lambda c: c["index"])
        for choice, ctx, cont, ref in zip(choices, contexts, conts, refs, strict=True):
            lp = choice["logprobs"]
            n_prompt = len(ctx) + len(cont)
            assert len(lp["tokens"]) == n_prompt + max_tokens
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            assert np.allclose(lp["token_logprobs"][1:n_prompt], ref, atol=1e-4)
            end = len(lp["token_logprobs"]) - max_tokens
            score = sum(lp["token_logprobs"][len(ctx) : end])  # lm-eval: [ctxlen:-1] with max_tokens=1
            assert math.isclose(score, sum(ref[len(ctx) - 1 :]), abs_tol=1e-3)
            top = lp["top_logprobs"][len(ctx)]  # is_greedy: the continuation token vs the top one
            assert isinstance(top, dict) and lp["tokens"][len(ctx)] in top
            assert choice["text"].startswith(tok.decode(ctx + cont))
            assert lp["text_offset"][0] == 0
        assert r.json()["usage"]["completion_tokens"] == 2 * max_tokens


def test_json_object_output_parses_whatever_the_prompt(client: openai.OpenAI) -> None:
    # short: each new JSON state costs constrain.py seconds of mask building on a loaded 2-core machine
    r = client.completions.create(
        model="smollm2",
        prompt="Once upon a time",  # does not ask for JSON
        max_tokens=8,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},  # vLLM's extension of completions
    )
    json.loads(r.choices[0].text)
    chat = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=8,
        temperature=0,
        response_format={"type": "json_object"},
    )
    json.loads(chat.choices[0].message.content or "")


def test_lamina_controls_as_extra_fields(greedy: Any, client: openai.OpenAI, lamina_smollm2: Any) -> None:
    r = client.completions.create(
        model="smollm2", prompt=PROMPT, max_tokens=10, temperature=1.0, extra_body={"top_k": 1, "min_p": 0.1}
    )
    assert r.choices[0].text == greedy.choices[0].text  # top_k=1 is greedy
    first = _ids(greedy.choices[0].logprobs)[2]
    r = client.completions.create(
        model="smollm2", prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"stop_token_ids": [first]}
    )
    # the stop token counts as generated (as OpenAI's eos does) and is left out of the text
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "stop"
    assert r.choices[0].stop_reason == first  # type: ignore[attr-defined]
    assert r.choices[0].text == lamina_smollm2.tokenizer.decode(_ids(greedy.choices[0].logprobs)[:2])
    r = client.completions.create(
        model="smollm2", prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"repetition_penalty": 1.3}
    )
    assert r.usage.completion_tokens == 10


def test_embeddings(client: openai.OpenAI, server: Any, lamina_minilm: Any) -> None:
    import lamina

    texts = ["A cat sits on the mat.", "Stock markets fell today."]
    r = client.embeddings.create(model="minilm", input=texts)
    got = np.array([d.embedding for d in r.data], dtype=np.float32)
    ref = lamina.embed(lamina_minilm, texts).numpy()
    assert got.shape == (2, 384) and np.allclose(got, ref, atol=1e-5)
    assert r.usage.prompt_tokens > 0 and [d.index for d in r.data] == [0, 1]
    # (the openai client asks for base64 by default and decodes it: the call above used it)
    raw = httpx.post(
        server.url + "/v1/embeddings",
        json={"model": "minilm", "input": texts[0], "encoding_format": "base64"},
        headers={"Authorization": f"Bearer {API_KEY}"},
    ).json()
    assert np.allclose(np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4"), ref[0], atol=1e-5)
    floats = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    assert np.allclose(np.array([d.embedding for d in floats.data]), ref, atol=1e-5)


def test_embeddings_refuse_over_long_input_unless_truncate(http: Any, lamina_minilm: Any) -> None:
    """The issue's 1,130-token input answered 200 with prompt_tokens 256 and no signal: now OpenAI's
    context-length error, or with truncate=true the cut vectors and which inputs were cut."""
    import lamina

    texts = ["A cat sits on the mat.", "word " * 1128]  # 1,130 tokens with [CLS] and [SEP]
    r = http.post("/v1/embeddings", json={"model": "minilm", "input": texts})
    assert r.status_code == 400
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "input[1]")
    assert (
        "maximum context length is 256 tokens" in error["message"]
        and "input[1] has 1130 tokens" in error["message"]
    )
    r = http.post("/v1/embeddings", json={"model": "minilm", "input": texts[1]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    r = http.post("/v1/embeddings", json={"model": "minilm", "input": texts, "truncate": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["truncated_inputs"] == [1] and r.headers["x-truncated-inputs"] == "1"
    assert body["usage"]["prompt_tokens"] == 256 + len(lamina_minilm.tokenizer.encode(texts[0]))
    ref = lamina.embed(lamina_minilm, texts, truncate=True).numpy()
    assert np.allclose(np.array([d["embedding"] for d in body["data"]]), ref, atol=1e-5)
    plain = http.post("/v1/embeddings", json={"model": "minilm", "input": texts[:1]})
    assert "truncated_inputs" not in plain.json() and "x-truncated-inputs" not in plain.headers


def test_wrong_kind_of_model_reads_right(http: Any) -> None:
    r = http.post("/v1/completions", json={"model": "minilm", "prompt": "x"})
    assert "is an embedding model: it does not support completions" in r.json()["error"]["message"]
    r = http.post("/v1/embeddings", json={"model": "smollm2", "input": "x"})
    assert "is a generation model: it does not support embeddings" in r.json()["error"]["message"]


BAD_REQUESTS: list[tuple[str, str, Any, int, str | None, str | None]] = [
    # (id, path, body, status, error.param, error.code)
    ("not-json", "/v1/completions", b"{bad", 400, None, "invalid_json"),
    ("not-utf8", "/v1/completions", b'{"model": "smollm2", "prompt": "\xff\xfe"}', 400, None, "invalid_json"),
    ("not-an-object", "/v1/completions", b"[1, 2]", 400, None, "invalid_json"),
    ("missing-prompt", "/v1/completions", {"model": "smollm2"}, 400, "prompt", "missing_required_parameter"),
    ("wrong-type", "/v1/completions", {"model": "smollm2", "prompt": "x", "n": "2"}, 400, "n", None),
    ("negative-max-tokens", "/v1/completions", {"model": "smollm2", "prompt": "x", "max_tokens": -1}, 400, "max_tokens", None),
    ("n-too-large", "/v1/completions", {"model": "smollm2", "prompt": "x", "n": 17}, 400, "n", None),
    ("temperature-range", "/v1/completions", {"model": "smollm2", "prompt": "x", "temperature": 3}, 400, "temperature", None),
    ("unknown-model", "/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404, "model", "model_not_found"),
    ("huge-logit-bias", "/v1/completions", {"model": "smollm2", "prompt": "x", "logit_bias": {str(i): 1 for i in range(301)}}, 400, "logit_bias", None),
    ("logit-bias-value", "/v1/completions", {"model": "smollm2", "prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias", None),
    ("logit-bias-key", "/v1/completions", {"model": "smollm2", "prompt": "x", "logit_bias": {"cat": 1}}, 400, "logit_bias", None),
    ("token-id-range", "/v1/completions", {"model": "smollm2", "prompt": [1, 99999]}, 400, "prompt", None),
    ("empty-prompt", "/v1/completions", {"model": "smollm2", "prompt": ""}, 400, "prompt", None),
    ("unknown-field", "/v1/completions", {"model": "smollm2", "prompt": "x", "temprature": 0}, 400, "temprature", None),
    ("reserved-field", "/v1/completions", {"model": "smollm2", "prompt": "x", "eos_token_ids": [4]}, 400, "eos_token_ids", None),
    ("invalid-control", "/v1/completions", {"model": "smollm2", "prompt": "x", "top_k": -1}, 400, "top_k", None),
    ("max-tokens-over-context", "/v1/completions", {"model": "smollm2", "prompt": "x", "max_tokens": 9000}, 400, "max_tokens", None),
    ("context-length", "/v1/completions", {"model": "smollm2", "prompt": "hi " * 8000, "max_tokens": 500}, 400, "max_tokens", "context_length_exceeded"),
    ("prompt-over-context", "/v1/completions", {"model": "smollm2", "prompt": "hi " * 8300}, 400, "prompt", "context_length_exceeded"),
    ("one-of-prompts-over-context", "/v1/completions", {"model": "smollm2", "prompt": ["hi", "hi " * 8300]}, 400, "prompt[1]", "context_length_exceeded"),
    ("embedding-over-context", "/v1/embeddings", {"model": "minilm", "input": ["x", "word " * 300]}, 400, "input[1]", "context_length_exceeded"),
    ("suffix", "/v1/completions", {"model": "smollm2", "prompt": "x", "suffix": "y"}, 400, "suffix", None),
    ("json-schema", "/v1/completions", {"model": "smollm2", "prompt": "x", "response_format": {"type": "json_schema"}}, 400, "response_format", None),
    ("json-too-short", "/v1/completions", {"model": "smollm2", "prompt": "x", "max_tokens": 1, "response_format": {"type": "json_object"}}, 400, "response_format", None),
    ("empty-messages", "/v1/chat/completions", {"model": "smollm2", "messages": []}, 400, "messages", None),
    ("bad-role", "/v1/chat/completions", {"model": "smollm2", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", None),
    ("image-part", "/v1/chat/completions", {"model": "smollm2", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages[0].content", None),
    ("top-logprobs-alone", "/v1/chat/completions", {"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs", None),
    ("tools", "/v1/chat/completions", {"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400, "tools", None),
    ("chat-context", "/v1/chat/completions", {"model": "smollm2", "messages": [{"role": "user", "content": "hi " * 8300}]}, 400, "messages", "context_length_exceeded"),
    ("embeddings-on-a-generator", "/v1/embeddings", {"model": "smollm2", "input": "x"}, 400, "model", "model_not_supported"),
    ("completions-on-an-encoder", "/v1/completions", {"model": "minilm", "prompt": "x"}, 400, "model", "model_not_supported"),
    ("unknown-route", "/v1/nothing", {}, 404, None, "not_found"),
    ("lone-surrogate", "/v1/completions", b'{"model": "smollm2", "prompt": "\\ud800"}', 400, "prompt", None),
    ("nan", "/v1/completions", b'{"model": "smollm2", "prompt": "x", "top_p": NaN}', 400, "top_p", None),
    ("seed-over-64-bits", "/v1/completions", {"model": "smollm2", "prompt": "x", "seed": 2**70}, 400, "seed", None),
    ("allowed-ids-range", "/v1/completions", {"model": "smollm2", "prompt": "x", "allowed_token_ids": [10**9]}, 400, "allowed_token_ids", None),
    ("every-token-banned", "/v1/completions", {"model": "smollm2", "prompt": "x", "allowed_token_ids": [5], "bad_words_ids": [[5]]}, 400, None, None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "code"),
    [r[1:] for r in BAD_REQUESTS],
    ids=[r[0] for r in BAD_REQUESTS],
)
def test_bad_requests_get_openai_errors(http: Any, path: str, body: Any, status: int, param: str | None, code: str | None) -> None:  # fmt: skip
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code), error


def test_openai_client_exception_classes(client: openai.OpenAI, server: Any) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smollm2", prompt="hi " * 8000, max_tokens=1000)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "x"}], n=99)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_auth_and_limits_and_the_server_keeps_serving(server: Any, http: Any) -> None:
    r = httpx.post(server.url + "/v1/completions", json={"model": "smollm2", "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    big = b'{"model": "smollm2", "prompt": "' + b"a" * (5 * 1024 * 1024) + b'"}'
    r = http.post("/v1/completions", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "request_too_large"
    r = http.get("/v1/completions")
    assert r.status_code == 405 and "error" in r.json()
    ok = http.post("/v1/completions", json={"model": "smollm2", "prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
