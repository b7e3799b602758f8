"""The synthetic reverse task: pairs, splits and the symbol tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from lamina.data.pairs import PairBatches, read_pairs
from lamina.data.synthetic import reverse_pairs, symbol_tokenizer, write_reverse_task
from lamina.errors import ConfigError


def test_reverse_pairs() -> None:
    data = reverse_pairs(500, seed=1)
    assert len(set(data.sources)) == 500
    lengths = [len(s.split()) for s in data.sources]
    assert min(lengths) == 1 and max(lengths) == 8
    assert {w for s in data.sources for w in s.split()} == {f"s{i}" for i in range(20)}
    for s, t in zip(data.sources, data.targets, strict=True):
        assert t.split() == s.split()[::-1]
    assert reverse_pairs(500, seed=1).sources == data.sources
    with pytest.raises(ConfigError, match="only 6 exist"):
        reverse_pairs(7, max_len=2, n_symbols=2)


def test_symbol_tokenizer_round_trips_and_batches() -> None:
    tok = symbol_tokenizer()
    assert len(tok) == 24 and (tok.pad_token_id, tok.eos_token_id) == (0, 2)
    ids = tok.encode("s3 s17 s0", add_special_tokens=False)
    assert ids == [7, 21, 4] and tok.decode(ids) == "s3 s17 s0"
    data = reverse_pairs(4, seed=0)
    b = PairBatches(tok, data, batch_size=4).batch(0)
    assert (b["decoder_input_ids"][:, 0] == 0).all()  # the pad id starts the decoder, as in T5


def test_splits_share_no_source(tmp_path: Path) -> None:
    paths = write_reverse_task(tmp_path, n_train=300, n_val=50, n_test=50)
    splits = {k: read_pairs(p) for k, p in paths.items()}
    assert [len(splits[k]) for k in ("train", "val", "test")] == [300, 50, 50]
    train = set(splits["train"].sources)
    assert not train & set(splits["test"].sources) and not train & set(splits["val"].sources)
