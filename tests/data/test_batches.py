"""TokenShards and the packed causal-LM batches: memmapped, exact windows, seeded order, resumable, rank rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lamina.data import CausalBatches, DataConfig, TokenShards, prepare, val_batches
from lamina.errors import ConfigError, DataError
from lamina.tokenizer import Tokenizer


@pytest.fixture
def tokens(tmp_path: Path) -> TokenShards:
    """The stream 0, 1, ..., 1000 (token i is i) in three shards of uneven size, so a window's tokens say
    where it starts and slices cross shard boundaries.
    """
    stream = np.arange(1001, dtype=np.uint16)
    files = []
    for i, (a, b) in enumerate([(0, 300), (300, 301), (301, 1001)]):
        files.append(tmp_path / f"train-{i:05d}.bin")
        stream[a:b].tofile(files[-1])
    return TokenShards(files, "uint16")


def test_token_shards_are_memory_maps_and_slice_across_shards(tokens: TokenShards) -> None:
    assert len(tokens) == 1001 and all(isinstance(s, np.memmap) for s in tokens.shards)
    assert tokens[295:305].tolist() == list(range(295, 305))  # three shards in one slice
    assert tokens[:].tolist() == list(range(1001))
    assert tokens[300] == 300 and tokens[-1] == 1000 and tokens[5:5].tolist() == []
    assert isinstance(tokens[310:320].base, np.memmap) or isinstance(tokens[310:320], np.memmap)
    with pytest.raises(IndexError):
        tokens[1001]


def test_batches_are_shifted_windows(tokens: TokenShards) -> None:
    batches = CausalBatches(tokens, batch_size=4, seq_len=10, seed=0)
    x, y = next(batches)
    assert x.shape == y.shape == (4, 10) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y, x + 1)
    assert (x[:, 0] % 10 == 0).all()  # windows start at multiples of seq_len
    assert len(batches) == (1000 // 10) // 4 == 25


def test_an_epoch_visits_each_window_once_in_a_seeded_order(tokens: TokenShards) -> None:
    batches = CausalBatches(tokens, batch_size=3, seq_len=10, seed=1)  # 100 windows, 33 steps, 1 left over
    first = torch.cat([next(batches)[0][:, 0] for _ in range(len(batches))]) // 10
    assert len(set(first.tolist())) == 99 and batches.epoch == 0
    assert first.tolist() != sorted(first.tolist())  # shuffled
    second = torch.cat([next(batches)[0][:, 0] for _ in range(len(batches))]) // 10
    assert batches.epoch == 1 and len(set(second.tolist())) == 99 and not torch.equal(first, second)
    plain = CausalBatches(tokens, batch_size=3, seq_len=10, shuffle=False)
    assert next(plain)[0][:, 0].tolist() == [0, 10, 20]


def test_deterministic_per_seed_and_step(tokens: TokenShards) -> None:
    a = CausalBatches(tokens, batch_size=4, seq_len=8, seed=7)
    b = CausalBatches(tokens, batch_size=4, seq_len=8, seed=7)
    c = CausalBatches(tokens, batch_size=4, seq_len=8, seed=8)
    seen = [next(a) for _ in range(70)]  # more than two epochs (31 steps each)
    for step, (x, y) in enumerate(seen):
        bx, by = next(b)
        assert torch.equal(x, bx) and torch.equal(y, by)
        assert torch.equal(a.batch_at(step)[0], x) and torch.equal(a.batch_at(step)[1], y)
    assert not torch.equal(next(c)[0], seen[0][0])


def test_resume_from_state_dict(tokens: TokenShards) -> None:
    run = CausalBatches(tokens, batch_size=4, seq_len=8, seed=3)
    for _ in range(29):  # stop two steps before the end of epoch 0
        next(run)
    state = run.state_dict()
    assert state["epoch"] == 0 and state["position"] == 29 * 4 and state["step"] == 29
    expected = [next(run) for _ in range(5)]  # crosses into epoch 1
    resumed = CausalBatches(tokens, batch_size=4, seq_len=8, seed=3)
    resumed.load_state_dict(state)
    for x, y in expected:
        rx, ry = next(resumed)
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert resumed.state_dict() == run.state_dict()
    with pytest.raises(DataError, match="seq_len=8 in the saved state but 16 now"):
        CausalBatches(tokens, batch_size=4, seq_len=16, seed=3).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        CausalBatches(tokens, batch_size=4, seq_len=8, seed=4).load_state_dict(state)


def test_ranks_split_the_global_batch_in_contiguous_blocks(tokens: TokenShards) -> None:
    single = CausalBatches(tokens, batch_size=6, seq_len=8, seed=5)
    ranks = [CausalBatches(tokens, batch_size=3, seq_len=8, seed=5, rank=r, world_size=2) for r in (0, 1)]
    assert len(single) == len(ranks[0]) == len(ranks[1])
    for step in range(40):  # more than two epochs
        x, y = next(single)
        parts = [next(r) for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
        assert not set(parts[0][0][:, 0].tolist()) & set(parts[1][0][:, 0].tolist())
        assert torch.equal(ranks[1].batch_at(step)[0], x[3:])
    # a state saved by one world size resumes under another at the same window
    state = ranks[0].state_dict()
    after = CausalBatches(tokens, batch_size=6, seq_len=8, seed=5)
    after.load_state_dict(state)
    assert torch.equal(next(after)[0], next(single)[0])
    with pytest.raises(ConfigError, match="rank=2"):
        CausalBatches(tokens, batch_size=3, seq_len=8, rank=2, world_size=2)


def test_too_small_corpus_says_what_to_lower(tokens: TokenShards) -> None:
    with pytest.raises(DataError, match=r"1,001 tokens.*lower batch_size or seq_len"):
        CausalBatches(tokens, batch_size=8, seq_len=128)
    with pytest.raises(DataError, match="world_size 2"):
        CausalBatches(tokens, batch_size=4, seq_len=128, world_size=2)
    CausalBatches(tokens, batch_size=1, seq_len=1000)  # exactly one window of 1001 tokens fits


def test_val_batches_in_fixed_order(tokens: TokenShards) -> None:
    batches = list(val_batches(tokens, batch_size=8, seq_len=10))
    starts = torch.cat([x[:, 0] for x, _ in batches])
    assert starts.tolist() == list(range(0, 1000, 10))  # every window once, in order
    assert [len(x) for x, _ in batches] == [8] * 12 + [4]
    assert all(torch.equal(y, x + 1) for x, y in batches)
    by_rank = [list(val_batches(tokens, batch_size=4, seq_len=10, rank=r, world_size=2)) for r in (0, 1)]
    assert len(by_rank[0]) == len(by_rank[1]) == 13  # the same count on every rank
    for k, (x, _) in enumerate(batches):
        assert torch.equal(torch.cat([by_rank[0][k][0], by_rank[1][k][0]]), x)
    assert by_rank[1][-1][0].shape == (0, 10)  # the short last batch fits in rank 0's block
    assert len(list(val_batches(tokens, batch_size=8, seq_len=10, max_batches=2))) == 2
    with pytest.raises(DataError, match="validation split has 1,001 tokens"):
        list(val_batches(tokens, batch_size=1, seq_len=1001))


def test_open_a_prepared_folder(tmp_path: Path) -> None:
    texts = [f"document number {i}: " + "some words to tokenize " * 20 for i in range(12)]
    tok = Tokenizer.train(texts, vocab_size=300, show_progress=False)
    for i, text in enumerate(texts):
        (tmp_path / f"{i:02d}.txt").write_text(text)
    cfg = DataConfig(
        sources=[str(tmp_path / "*.txt")],
        tokenizer=str(tok.save(tmp_path / "tok")),
        out=str(tmp_path / "data"),
        val_fraction=0.2,
        num_workers=1,
    )
    m = prepare(cfg, progress=False)
    train, val = TokenShards.open(m.root, "train"), TokenShards.open(m.root, "val")
    assert len(train) == m.splits["train"].tokens and len(val) == m.splits["val"].tokens > 0
    assert isinstance(train.shards[0], np.memmap) and train.dtype == np.uint16
    x, _ = next(CausalBatches(train, batch_size=2, seq_len=16))
    assert x.shape == (2, 16) and int(x.max()) < m.vocab_size
    assert sum(len(x) for x, _ in val_batches(val, batch_size=2, seq_len=16)) == (len(val) - 1) // 16
    with pytest.raises(DataError, match="split 'test' is not in"):
        TokenShards.open(m.root, "test")
    with pytest.raises(DataError, match=r"no manifest\.json"):
        TokenShards.open(tmp_path, "train")
