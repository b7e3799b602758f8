"""Retrieval in the server (``lamina serve --index``): ``POST /v1/retrieve`` and chat completions grounded
on the index (``rag``), against a live server of tiny random models and a tiny SQLite index built with a
tiny random encoder (``tiny_index``); grounded answers through the official ``openai`` client
(``extra_body``). The chat model's tokenizer has the tokens ``[1]`` and ``[9]``, so ``logit_bias`` makes an
answer that cites."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tiny_chat import tiny_lm
from tiny_index import DOCS, build_index, chat_lm

from lamina.rag.synthesize import Citation, cite


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    return {"chat": chat_lm(), "embed": tiny_lm(arch="encoder", pos_encoding="learned", head="none")}


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Any]) -> Path:
    return build_index(tmp_path_factory.mktemp("serve_rag") / "tiny.sqlite", models["embed"])


@pytest.fixture(scope="module")
def server(models: dict[str, Any], index: Path) -> Iterator[Any]:
    from lamina.serve import BackgroundServer, ServeConfig

    with BackgroundServer(models, ServeConfig(index=str(index), timeout=60.0, max_retrieve_top_k=10)) as s:
        yield s


def _post(server: Any, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def _token(models: dict[str, Any], text: str) -> str:
    return str(models["chat"].tokenizer.backend.token_to_id(text))


def test_retrieve_returns_passages_with_document_span_page_and_score(server: Any) -> None:
    r = _post(server, "/v1/retrieve", {"query": "a dog ran", "mode": "bm25", "top_k": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "bm25" and body["embedding_model"] == "tiny"
    data = body["data"]
    assert [p["number"] for p in data] == [1, 2] and data[0]["document"] == "dogs.md"
    assert data[0]["score"] >= data[1]["score"]
    for p in data:
        start, end = p["span"]
        assert DOCS[p["document"]][start:end] == p["text"] and p["page"] is None
        assert p["chunk_id"].startswith(p["document"] + "#")
    dense = _post(server, "/v1/retrieve", {"query": "the cat sat", "top_k": 4}).json()
    assert body is not dense and dense["mode"] == "dense" and len(dense["data"]) == 4  # every document
    assert sorted(p["document"] for p in dense["data"]) == sorted(DOCS)
    hybrid = _post(
        server,
        "/v1/retrieve",
        {"query": "blue", "mode": "hybrid", "filters": {"doc_id": ["colors.md", "cats.md"]}},
    )
    assert {p["document"] for p in hybrid.json()["data"]} <= {"colors.md", "cats.md"}
    assert hybrid.json()["data"][0]["document"] == "colors.md"
    config = httpx.get(server.url + "/lamina/config").json()
    assert config["index"]["embedding_model"] == "tiny" and config["index"]["chunks"] >= len(DOCS)


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"query": "cat", "top_k": 0}, "top_k", "greater than or equal to 1"),
        ({"query": "cat", "top_k": 11}, "top_k", "more than the server allows (10)"),
        ({"query": "cat", "top_k": "3"}, "top_k", "valid integer"),
        ({"query": "cat", "mode": "magic"}, "mode", "'dense', 'bm25' or 'hybrid'"),
        ({"query": "cat", "filters": {"path": {"$ne": 1}}}, "filters.path", ""),
        ({"query": "cat", "filters": {"a'b": "x"}}, "query", "filter key"),
        ({"query": ""}, "query", "at least 1 character"),
        ({"query": "   "}, "query", "empty"),
        ({"query": "cat", "k": 3}, "k", "Unrecognized"),
        ({"query": "cat", "filters": {"doc_id": ["d"] * 40_000}}, "filters", "at most 1000"),
        ({"query": "cat", "filters": {"page": 2**64}}, "filters", "outside int64"),
        ({"query": "cat", "filters": {f"k{i}": 1 for i in range(17)}}, "filters", "at most 16"),
        ({"query": "cat " * 2001}, "query", "at most 8000 characters"),
    ],
)
def test_hostile_retrieve_requests_get_400s(
    server: Any, body: dict[str, Any], param: str, words: str
) -> None:
    r = _post(server, "/v1/retrieve", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] is not None and err["param"].startswith(param) and words in err["message"], err


def test_a_grounded_answer_cites_the_passages_in_its_prompt(server: Any, models: dict[str, Any]) -> None:
    """Through the openai client: sources are the passages retrieval found, in its order; the prompt held
    exactly compact synthesis' prompt of them; [1] is a citation, [9] (no such passage) is dropped."""
    import openai

    from lamina.generate.text import build_prompt_ids
    from lamina.rag.retrieve import RetrieveConfig, retrieve
    from lamina.rag.store import open_store
    from lamina.rag.synthesize import SynthesizeConfig, compact_prompt

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    question = "where did the dog run"
    bias = {_token(models, "[1]"): 100, _token(models, "[9]"): 99}
    resp = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": question}], max_tokens=4, temperature=0,
        extra_body={"rag": {"top_k": 3, "mode": "hybrid"}, "logit_bias": bias},
    )  # fmt: skip
    extra = resp.model_extra or {}
    sources = extra["sources"]
    retrieved = _post(server, "/v1/retrieve", {"query": question, "top_k": 3, "mode": "hybrid"}).json()[
        "data"
    ]
    assert sources == retrieved  # all three fit the window: shown whole, numbered by rank
    choice = resp.choices[0]
    text = choice.message.content
    assert "[9]" not in text and "[1]" in text
    assert (choice.model_extra or {})["citations"] == [1]
    assert (choice.model_extra or {})["dropped_citations"] == 4 - text.count("[1]")
    store = open_store(str(server.config.index))
    try:
        hits = retrieve(store, question, RetrieveConfig(k=3, mode="hybrid"), models["embed"])
    finally:
        store.close()
    prompt, shown = compact_prompt(
        models["chat"], question, hits, SynthesizeConfig(max_new_tokens=4, context_window=1024)
    )
    assert [s.chunk_id for s in shown] == [s["chunk_id"] for s in sources]
    assert resp.usage is not None and resp.usage.prompt_tokens == len(
        build_prompt_ids(models["chat"], prompt)
    )


def test_a_streamed_grounded_answer_carries_sources_then_citations(
    server: Any, models: dict[str, Any]
) -> None:
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "red or blue"},
    ]
    stream = client.chat.completions.create(
        model="chat", messages=messages, max_tokens=3, temperature=0, stream=True,
        extra_body={"rag": True, "logit_bias": {_token(models, "[9]"): 100}},
    )  # fmt: skip
    chunks = list(stream)
    first = chunks[0].model_extra or {}
    assert [s["number"] for s in first["sources"]] == [1, 2, 3, 4]  # rag: true retrieves the default 5
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.split() == ["[9]"] * 3  # streamed as generated: tokens are not held back
    last = chunks[-1].choices[0]
    assert last.finish_reason == "length"
    assert (last.model_extra or {})["citations"] == [] and (last.model_extra or {})["dropped_citations"] == 3


def test_nothing_retrieved_answers_not_found_without_the_model(server: Any) -> None:
    from lamina.rag.synthesize import NOT_FOUND

    body = {"model": "chat", "messages": [{"role": "user", "content": "the cat"}],
            "rag": {"score_threshold": 1.5}}  # fmt: skip
    before = httpx.get(server.url + "/metrics").text
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["message"]["content"] == NOT_FOUND and out["sources"] == []
    assert out["choices"][0]["citations"] == [] and out["usage"]["completion_tokens"] == 0
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}) as s:
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["sources"] == [] and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == NOT_FOUND
    after = httpx.get(server.url + "/metrics").text
    tokens = [line for line in after.splitlines() if line.startswith("lamina_prompt_tokens_total")]
    assert tokens == [line for line in before.splitlines() if line.startswith("lamina_prompt_tokens_total")]


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"rag": {"top_k": 0}}, "rag.top_k", "greater than or equal to 1"),
        ({"rag": {"mode": "magic"}}, "rag.mode", "hybrid"),
        ({"rag": "yes"}, "rag", ""),
        ({"rag": {"top_k": 50}}, "top_k", "more than the server allows"),
        ({"rag": True, "tools": [{"type": "function", "function": {"name": "f"}}]}, "rag", "tools"),
        ({"rag": True, "messages": [{"role": "system", "content": "hi"}]}, "messages[0]", "user's question"),
        ({"rag": True, "max_tokens": 1020}, "messages", "does not fit"),
        ({"rag": {"score_threshold": 1.5}, "n": 10**6}, "n", "more than the server allows"),
        # nothing retrieved ("not found") still checks the request as a model call would
        ({"rag": {"score_threshold": 1.5}, "top_logprobs": 2}, "top_logprobs", "needs logprobs"),
        ({"rag": {"score_threshold": 1.5}, "no_such_field": 1}, "no_such_field", "Unrecognized"),
        ({"rag": {"filters": {"doc_id": list(range(1001))}}}, "rag.filters", "at most 1000"),
        ({"rag": True, "response_format": {"type": "json_object"}}, "rag", "response_format 'json_object'"),
        ({"rag": True, "guided_regex": "[0-9]+"}, "rag", "guided_regex"),
        ({"rag": True, "choices": ["a", "b"]}, "rag", "choices"),
        ({"rag": True, "messages": [{"role": "user", "content": "x" * 8001}]}, "messages[0]", "(8000)"),
    ],
)
def test_hostile_grounded_requests_get_400s(
    server: Any, extra: dict[str, Any], param: str, words: str
) -> None:
    body = {"model": "chat", "messages": [{"role": "user", "content": "the cat"}], **extra}
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"] or "").startswith(param) and words in err["message"], err


def test_a_server_without_an_index_refuses_retrieval(models: dict[str, Any], tmp_path: Path) -> None:
    from lamina.errors import ConfigError
    from lamina.serve import BackgroundServer, ServeConfig

    with BackgroundServer({"chat": models["chat"]}, ServeConfig(timeout=60.0)) as s:
        r = _post(s, "/v1/retrieve", {"query": "cat"})
        assert r.status_code == 400 and "--index" in r.json()["error"]["message"]
        r = _post(s, "/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "a"}],
                                               "rag": True})  # fmt: skip
        assert r.status_code == 400 and "--index" in r.json()["error"]["message"]
        assert httpx.get(s.url + "/lamina/config").json()["index"] is None
    with pytest.raises(ConfigError, match=r"no index at .*lamina index"):
        BackgroundServer({"chat": models["chat"]}, ServeConfig(index=str(tmp_path / "none.sqlite")))


def test_lamina_serve_takes_index_as_a_flag() -> None:
    from lamina.cli.flags import values
    from lamina.cli.main import build_parser
    from lamina.fields import build
    from lamina.serve.settings import ServeConfig

    args = build_parser("serve").parse_args(
        ["serve", "tiny", "--index", "docs.sqlite", "--max-retrieve-top-k", "7"]
    )
    cfg = build(ServeConfig, values(args, ServeConfig))
    assert cfg.index == "docs.sqlite" and cfg.max_retrieve_top_k == 7


SHOWN = [Citation(i, f"d{i}", f"d{i}#0", 0, 1, None, f"d{i}", "x") for i in (1, 2, 3)]


@pytest.mark.parametrize(
    ("text", "out", "cited", "dropped"),
    [
        ("A [1] and B [2, 9], not [7].", "A [1] and B [2], not.", [1, 2], 2),
        ("sys.argv[0] and args[1] are lists [2]", "sys.argv[0] and args[1] are lists [2]", [2], 0),
        ("f(x)[3] and m[0][1] index", "f(x)[3] and m[0][1] index", [], 0),
        ("both [3][1][9] agree", "both [3][1] agree", [3, 1], 1),
        ("use `a [1]` and ``b [7]`` [2]", "use `a [1]` and ``b [7]`` [2]", [2], 0),
        ("so:\n```py\nx = [1]\n    y = [9]\n```\nthen [9]  [3]", "so:\n```py\nx = [1]\n    y = [9]\n```\nthen  [3]",
         [3], 1),
        ("cut off\n~~~\nz = [2]", "cut off\n~~~\nz = [2]", [], 0),  # a fence not closed yet (a stream)
        ("a stray ` [2]", "a stray ` [2]", [2], 0),
    ],
)  # fmt: skip
def test_cite_reads_markers_not_indexing_or_code(text: str, out: str, cited: list[int], dropped: int) -> None:
    """Served answers go through cite: indexing (``sys.argv[0]``) and code keep their brackets and are no
    citations; only an invented marker is removed, with the blanks before it (code indentation kept)."""
    a = cite(text, SHOWN)
    assert (a.text, [c.number for c in a.citations], a.dropped_citations) == (out, cited, dropped)


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (sqlite3.OperationalError("too many SQL variables"), 400),
        (OverflowError("Python int too large to convert to SQLite INTEGER"), 400),
        (sqlite3.OperationalError("disk I/O error"), None),  # the server's fault: raised (a 500)
    ],
)
def test_store_errors_the_request_caused_are_400s(
    monkeypatch: pytest.MonkeyPatch, error: Exception, status: int | None
) -> None:
    from lamina.serve import grounding
    from lamina.serve.errors import APIError
    from lamina.serve.schemas import RagOptions
    from lamina.serve.settings import ServeConfig

    def fail(*args: Any) -> None:
        raise error

    monkeypatch.setattr(grounding, "retrieve", fail)
    index = grounding.ServedIndex(store=None, embedder=None)  # type: ignore[arg-type]
    options = RagOptions(filters={"doc_id": ["a", "b"]})
    if status is None:
        with pytest.raises(type(error)):
            index.search("cat", options, ServeConfig())
        return
    with pytest.raises(APIError) as e:
        index.search("cat", options, ServeConfig())
    assert e.value.status == status and e.value.param == "filters" and "fewer" in e.value.message
