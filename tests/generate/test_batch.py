"""JSONL batch generation (lamina.generate.batch) on a tiny chat model: rows in request order, each
request's own controls, logprobs with their alternatives, and errors that name the request."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import lamina
from lamina.errors import ConfigError
from lamina.generate.batch import generate_batch, read_requests


def test_rows_follow_the_requests_and_equal_one_at_a_time(tiny: Any) -> None:
    requests = [
        {"prompt": "hello world"},
        {"id": "b", "messages": [{"role": "user", "content": "the cat"}], "max_new_tokens": 2},
        {"prompt": "a dog", "temperature": 0.9, "seed": 4, "n": 2},
        {"prompt": "hello world", "num_beams": 3},
    ]
    seen: list[tuple[int, int]] = []
    rows = generate_batch(tiny, requests, max_new_tokens=4, ignore_eos=True, max_batch_size=3,
                          progress=lambda done, total: seen.append((done, total)))  # fmt: skip
    assert [(r["index"], r["id"], r.get("n")) for r in rows] == [
        (0, 0, None), (1, "b", None), (2, 2, 0), (2, 2, 1), (3, 3, None),
    ]  # fmt: skip
    assert seen[-1] == (5, 5)
    common = dict(max_new_tokens=4, ignore_eos=True)
    assert rows[0]["text"] == lamina.generate(tiny, "hello world", **common)
    assert rows[1]["text"] == lamina.generate(
        tiny, requests[1]["messages"], max_new_tokens=2, ignore_eos=True
    )
    assert rows[1]["completion_tokens"] == 2 and rows[0]["finish_reason"] == "length"
    assert rows[2]["text"] == lamina.generate(tiny, "a dog", temperature=0.9, seed=4, **common)
    assert rows[4]["text"] == lamina.generate(tiny, "hello world", num_beams=3, **common)
    assert "logprobs" not in rows[0] and "top_logprobs" not in rows[0]


def test_rows_hold_logprobs_top_logprobs_and_prompt_logprobs_when_asked(tiny: Any) -> None:
    req = {"prompt": "hello", "logprobs": True, "top_logprobs": 2, "prompt_logprobs": 1}
    (row,) = generate_batch(tiny, [req], max_new_tokens=3, ignore_eos=True, temperature=0)
    assert len(row["tokens"]) == len(row["logprobs"]) == len(row["top_logprobs"]) == 3
    assert " ".join(row["tokens"]) == row["text"].strip()  # word-level: the text is the words joined
    for alts, lp in zip(row["top_logprobs"], row["logprobs"], strict=True):
        assert len(alts) == 2 and set(alts[0]) == {"token", "id", "logprob"}
        assert alts[0]["logprob"] == pytest.approx(lp)  # greedy: the chosen token is the most likely
    assert row["prompt_logprobs"][0] is None and len(row["prompt_logprobs"]) == row["prompt_tokens"]
    assert {"token", "id", "logprob", "rank", "top"} <= set(row["prompt_logprobs"][1])
    json.dumps(row)  # JSON-ready
    (plain,) = generate_batch(tiny, [{"prompt": "hello", "logprobs": True}], max_new_tokens=2)
    assert "top_logprobs" not in plain and len(plain["logprobs"]) == plain["completion_tokens"]


def test_a_bad_request_is_refused_before_any_decoding_naming_it(tiny: Any, tmp_path: Path) -> None:
    requests = [{"prompt": "hello", "num_beams": 2}, {"prompt": "hi", "logit_bias": {50256: -100}}]
    with pytest.raises(ConfigError, match=r"^p.jsonl:7: logit_bias names token id 50256"):
        generate_batch(tiny, requests, labels=["p.jsonl:3", "p.jsonl:7"])
    with pytest.raises(ConfigError, match=r"^request 0: top_p=7"):
        generate_batch(tiny, [{"prompt": "x", "top_p": 7}])
    path = tmp_path / "p.jsonl"
    path.write_text('\n{"prompt": "a"}\n\n{"messages": []}\n')
    assert read_requests(path) == ([{"prompt": "a"}, {"messages": []}], [2, 4])
    path.write_text('{"prompt": "ok"}\n{"text": "no"}\n')
    with pytest.raises(ConfigError, match=r"p.jsonl:2: each line must be an object"):
        read_requests(path)
