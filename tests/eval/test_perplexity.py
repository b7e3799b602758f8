"""Sliding-window perplexity: every token after the first scored once; equal to one full forward when the
window holds the text; bits per byte and word perplexity from the same total; encoders get
pseudo-perplexity, other models a clear message."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_chat import tiny_lm

from lamina.errors import ConfigError
from lamina.eval.perplexity import perplexity, read_documents, token_nll, windows

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize(
    ("n", "max_length", "stride"), [(10, 4, 2), (10, 4, 4), (9, 16, 8), (17, 5, 3), (1, 4, 2)]
)
def test_windows_score_each_token_once(n: int, max_length: int, stride: int) -> None:
    scored = [p for _, end, first in windows(n, max_length, stride) for p in range(first, end)]
    starts = set(range(0, n, stride)) if stride == max_length else {0}  # no context in their window
    assert scored == [p for p in range(n) if p not in starts]
    assert all(end - begin <= max_length for begin, end, _ in windows(n, max_length, stride))


@pytest.fixture(scope="module")
def lm() -> Any:
    return tiny_lm()


def test_one_window_equals_a_full_forward(lm: Any) -> None:
    ids = [3 + i % 10 for i in range(20)]
    with torch.no_grad():
        lp = lm.model(torch.tensor([ids]))[0].float().log_softmax(-1)
    want = -sum(float(lp[i - 1, ids[i]]) for i in range(1, len(ids)))
    assert token_nll(lm.model, ids) == (pytest.approx(want, rel=1e-6), 19)
    nll, count = token_nll(lm.model, ids, max_length=8, stride=3)  # less context: a different number
    assert count == 19 and nll != pytest.approx(want, rel=1e-6)


def test_report(lm: Any) -> None:
    docs = ["the cat sat on the mat", "a dog ran"]
    r = perplexity(lm, docs)
    assert (r.tokens, r.words, r.bytes, r.documents) == (5 + 2, 9, 31, 2)
    assert r.token_perplexity == pytest.approx(math.exp(r.nll / 7))
    assert r.bits_per_byte == pytest.approx(r.nll / math.log(2) / 31)
    assert r.word_perplexity == pytest.approx(math.exp(r.nll / 9))
    assert perplexity(lm, docs, prefix=True).tokens == 9  # the first token of each document too
    with pytest.raises(ConfigError, match=r"stride 9 must be in 1..max_length"):
        perplexity(lm, docs, max_length=4, stride=9)


def test_documents() -> None:
    assert len(read_documents(FIXTURES / "text" / "notes.jsonl")) == 3
    assert len(read_documents(FIXTURES / "text")) == 4  # the .txt file is one document
    with pytest.raises(ConfigError, match=r"notes.jsonl:1: expected an object with a string field 'body'"):
        read_documents(FIXTURES / "text" / "notes.jsonl", field="body")


def test_encoders_get_pseudo_perplexity_others_a_message() -> None:
    from lamina.tokenizer import Tokenizer

    enc = tiny_lm(arch="encoder", pos_encoding="learned")
    tok = enc.tokenizer
    if tok.mask_token_id is None:  # the word-level tokenizer has no [MASK]: name one
        enc.tokenizer = Tokenizer(tok.backend, mask_token="[UNK]", eos_token="<|im_end|>")
    r = perplexity(enc, ["the cat sat"])
    assert r.pseudo and r.tokens == 3 and r.token_perplexity > 1
    with pytest.raises(ConfigError, match="perplexity is not defined for model 'tiny'"):
        perplexity(tiny_lm(head="classify", n_labels=2), ["the cat"])


def test_token_shards_score_as_their_texts(lm: Any, tmp_path: Path) -> None:
    from lamina.data.corpus import DataConfig, prepare
    from lamina.eval.perplexity import is_token_shards, shard_documents
    from lamina.eval.runner import EvalConfig, evaluate

    texts = ["the cat sat on the mat", "a dog ran", "the dog sat", "a cat ran on the mat"]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(f'{{"text": "{t}"}}\n' for t in texts), encoding="utf-8")
    lm.tokenizer.save(tmp_path / "tok")
    data = tmp_path / "data"
    prepare(DataConfig(sources=[str(src)], out=str(data), tokenizer=str(tmp_path / "tok"), val_fraction=0.5,
                       num_workers=0))  # fmt: skip
    assert is_token_shards(data) and not is_token_shards(src)
    docs, _ = shard_documents(data, "val")
    val_texts = [lm.tokenizer.decode(d) for d in docs]
    assert docs and set(val_texts) < set(texts)  # cut at the eos ids: whole documents, none run together
    got = evaluate(lm, EvalConfig(perplexity=str(data), split="val"))["perplexity"]
    want = perplexity(lm, val_texts).as_dict()
    assert got == pytest.approx(want)

    lm.tokenizer.save(tmp_path / "other")
    vocab = (tmp_path / "other" / "tokenizer.json").read_text(encoding="utf-8").replace('"mat"', '"mats"')
    (tmp_path / "other" / "tokenizer.json").write_text(vocab, encoding="utf-8")
    prepare(DataConfig(sources=[str(src)], out=str(tmp_path / "d2"), tokenizer=str(tmp_path / "other"),
                       val_fraction=0.5, num_workers=0))  # fmt: skip
    with pytest.raises(ConfigError, match="another tokenizer"):
        evaluate(lm, EvalConfig(perplexity=str(tmp_path / "d2")))
