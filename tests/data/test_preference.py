"""Preference pairs: strings and message lists render the same through the chat template, the prompt is
stored once and only completion tokens are marked; bad rows are named by line; the batch layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_chat import tiny_tokenizer

from lamina.data.preference import PreferenceBatches, encode_pair, encode_preferences, read_preferences
from lamina.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return tiny_tokenizer()


def test_strings_and_messages_render_alike(tok) -> None:  # type: ignore[no-untyped-def]
    p = encode_pair(tok, "the cat", "sat on a mat", "ran")
    text = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    assert text(p.prompt) == "<|im_start|> user the cat <|im_end|> <|im_start|> assistant"
    assert text(p.chosen) == "sat on a mat <|im_end|>" and text(p.rejected) == "ran <|im_end|>"
    assert all(p.chosen_mask) and all(p.rejected_mask)
    m = encode_pair(
        tok,
        [{"role": "user", "content": "the cat"}],
        [{"role": "assistant", "content": "sat on a mat"}],
        [{"role": "assistant", "content": "ran"}],
    )
    assert (m.prompt, m.chosen, m.rejected) == (p.prompt, p.chosen, p.rejected)
    # a multi-turn prompt: its earlier answer is prompt, not completion
    mt = encode_pair(
        tok,
        [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "world"},
            {"role": "user", "content": "the cat"},
        ],
        "sat",
        "ran",
    )
    assert text(mt.prompt).endswith("user the cat <|im_end|> <|im_start|> assistant") and "world" in text(
        mt.prompt
    )
    assert text(mt.chosen) == "sat <|im_end|>"


def test_no_template_joins_text_and_ends_with_eos(tok) -> None:  # type: ignore[no-untyped-def]
    p = encode_pair(tok, "the cat", " sat", " ran", templated=False)
    assert p.prompt == tok.encode("the cat") and p.chosen[-1] == tok.eos_token_id
    assert tok.decode(p.chosen, skip_special_tokens=True) == "sat"
    assert tok.decode(p.rejected, skip_special_tokens=True) == "ran"


def test_no_template_keeps_user_text_as_text(tok) -> None:  # type: ignore[no-untyped-def]
    # before: the text was encoded with special tokens parsed, so a completion that spelled the eos marker
    # ended early on a forged control token, and message lists hit a bare assert
    eos = tok.eos_token
    assert eos is not None
    p = encode_pair(tok, f"the cat {eos}", f" sat {eos}", " ran", templated=False)
    assert (p.prompt + p.chosen).count(tok.eos_token_id) == 1 and p.chosen[-1] == tok.eos_token_id
    with pytest.raises(ConfigError, match="chat_template"):
        encode_pair(tok, [{"role": "user", "content": "x"}], "a", "b", templated=False)


def test_bad_rows_named(tok, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rows = [
        {"prompt": "the cat", "chosen": "sat", "rejected": "ran"},
        {"prompt": "the cat", "chosen": "sat", "rejected": "sat"},
        {"prompt": "the cat", "chosen": "  ", "rejected": "ran"},
        {"prompt": "the cat", "chosen": "sat"},
        "not an object",
        {
            "prompt": "the cat",
            "chosen": [{"role": "assistant", "content": ""}],
            "rejected": [{"role": "assistant", "content": "x"}],
        },
        {"prompt": "the cat", "chosen": "sat", "rejected": [{"role": "assistant", "content": "ran"}]},
        {"prompt": "a dog", "chosen": "red", "rejected": "blue", "margin": 1.5},
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    data = read_preferences(path)
    assert len(data) == 2 and data.margins == [0.0, 1.5]
    shown = [str(p) for p in data.problems]
    assert shown[0] == "p.jsonl line 2: chosen equals rejected: nothing to prefer; skipped"
    assert shown[1] == "p.jsonl line 3: 'chosen' is empty; skipped"
    assert shown[2].startswith("p.jsonl line 4: no 'rejected' key")
    assert shown[3].startswith("p.jsonl line 5: a JSON str")
    assert shown[4] == "p.jsonl line 6: 'chosen' is empty; skipped"
    assert shown[5].startswith("p.jsonl line 7: prompt, chosen and rejected must all be strings")
    assert shown[6].startswith("p.jsonl line 9: not JSON")
    with pytest.raises(DataError, match="not found"):
        read_preferences(tmp_path / "missing.jsonl")


def test_truncation_and_same_tokens(tok, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rows = [
        {"prompt": "the cat", "chosen": "sat on a mat", "rejected": "ran"},
        {"prompt": "the cat", "chosen": "sat", "rejected": "sat "},  # different text, same tokens
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    enc = encode_preferences(tok, read_preferences(path), max_seq_len=9)
    assert len(enc.pairs) == 1 and enc.truncated == 1 and enc.skipped == 1
    assert len(enc.pairs[0].prompt) + len(enc.pairs[0].chosen) == 9
    assert "encode to the same tokens" in str(enc.problems[-1])
    assert encode_preferences(tok, read_preferences(path), 9, truncate=False).pairs == []


def test_batch_layout(tok) -> None:  # type: ignore[no-untyped-def]
    pairs = [
        encode_pair(tok, "the cat", "sat on a mat", "ran"),
        encode_pair(tok, "a dog", "red", "blue green"),
    ]
    b = PreferenceBatches(pairs, 2, seed=0, pad_id=0).collate([0, 1])
    assert b["input_ids"].shape == (4, len(pairs[0].prompt) + 5)
    for row, (p, comp) in enumerate(
        [
            (pairs[0], pairs[0].chosen),
            (pairs[1], pairs[1].chosen),
            (pairs[0], pairs[0].rejected),
            (pairs[1], pairs[1].rejected),
        ]
    ):
        n = len(p.prompt) + len(comp)
        assert b["input_ids"][row, :n].tolist() == p.prompt + comp
        assert b["attention_mask"][row].sum() == n and b["completion_mask"][row].sum() == len(comp)
        assert b["completion_mask"][row, : len(p.prompt)].sum() == 0
    batches = PreferenceBatches(pairs * 3, 2, seed=1)
    assert torch.equal(batches.batch(4)["input_ids"], batches.batch(4)["input_ids"])
    assert sum(len(x["margin"]) for x in batches.eval_batches()) == 6 == 2 * batches.n_eval_batches()
