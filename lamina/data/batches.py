"""Batches from token shards: the packed causal-LM source, resumable and shardable across ranks.

    train = TokenShards.open("data/mine", "train")       # np.memmap views, nothing loaded
    batches = CausalBatches(train, batch_size=8, seq_len=512, seed=0)
    for step, (x, y) in zip(range(1000), batches):      # x, y: LongTensor (8, 512), y = x shifted by one
        ...
    state = batches.state_dict()                        # save with the checkpoint; load_state_dict resumes
    for x, y in val_batches(TokenShards.open("data/mine", "val"), batch_size=8, seq_len=512):
        ...

Windows. A split of ``L`` tokens holds ``N = (L - 1) // seq_len`` windows; window ``w`` is the ``seq_len + 1``
tokens starting at ``w * seq_len`` (inputs are its first ``seq_len``, targets its last ``seq_len``), so
consecutive windows share one token and every token is predicted once per epoch. Documents are packed:
a window may span the eos between two documents and a shard boundary.

Order. Epoch ``e`` visits the windows in the order ``np.random.default_rng([seed, e]).permutation(N)``
(identity with ``shuffle=False``). A step takes the next ``G = batch_size * world_size`` windows of that
order (the global batch); an epoch has ``N // G`` steps and the ``N % G`` windows left over at its end are
not used in that epoch (the next epoch's order is a new permutation, so they are in other epochs).

Ranks. Rank ``r`` takes the contiguous block ``[r * batch_size, (r + 1) * batch_size)`` of the global
batch. So ``torch.cat([rank 0's batch, rank 1's batch, ...])`` at any step equals, row for row, the batch of
a single process with ``batch_size * world_size`` and the same seed; the ranks' windows are disjoint.

Resuming. The position is ``(epoch, position)``: the index into the epoch's order of the next global
batch's first window. ``state_dict()`` returns it with the step count; ``load_state_dict()`` continues from
exactly there. ``batch_at(step)`` gives any step's batch directly (epoch ``step // steps_per_epoch``, position
``(step % steps_per_epoch) * G``), which equals what iterating from step 0 gives.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lamina.data.corpus import Manifest
from lamina.errors import ConfigError, DataError

__all__ = ["CausalBatches", "TokenShards", "val_batches"]


class TokenShards:
    """The token stream of one split, read through ``np.memmap`` views of its shard files.

    ``len(shards)`` is the number of tokens; ``shards[a:b]`` is a NumPy array of those tokens (copied only
    when the slice crosses a shard boundary); ``shards[i]`` one token.
    """

    def __init__(self, files: Sequence[str | os.PathLike[str]], dtype: str | np.dtype = "uint16") -> None:
        self.files = [Path(f) for f in files]
        self.dtype = np.dtype(dtype)
        self.shards: list[np.memmap] = []
        for f in self.files:
            if not f.is_file():
                raise DataError(f"token shard {str(f)!r} is missing; prepare the data folder again")
            if f.stat().st_size % self.dtype.itemsize:
                raise DataError(
                    f"token shard {str(f)!r} is {f.stat().st_size} bytes, not a whole number of {self.dtype} "
                    "ids: it is truncated or has another dtype; prepare the data folder again"
                )
            if f.stat().st_size:  # np.memmap cannot map an empty file
                self.shards.append(np.memmap(f, dtype=self.dtype, mode="r"))
        # offsets[i]: the index in the stream of shard i's first token; offsets[-1]: the total.
        self.offsets = np.cumsum([0, *(len(s) for s in self.shards)], dtype=np.int64)

    @classmethod
    def open(cls, folder: str | os.PathLike[str], split: str = "train") -> TokenShards:
        """The ``split`` ("train" or "val") of a folder written by ``lamina.data.prepare``."""
        manifest = Manifest.load(folder)
        return cls(manifest.shard_paths(split), manifest.dtype)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return f"TokenShards({len(self):,} tokens in {len(self.shards)} shards, {self.dtype})"

    def __getitem__(self, index: int | slice) -> Any:
        n = len(self)
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step != 1:
                raise IndexError("TokenShards slices take no step")
            return self._read(start, max(start, stop))
        i = int(index) + (n if int(index) < 0 else 0)
        if not 0 <= i < n:
            raise IndexError(f"token index {index} out of range for {n} tokens")
        return self._read(i, i + 1)[0]

    def _read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the stream; a view when they lie in one shard."""
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces = []
        while start < stop:
            shard, base = self.shards[first], int(self.offsets[first])
            end = min(stop, base + len(shard))
            pieces.append(shard[start - base : end - base])
            start, first = end, first + 1
        if len(pieces) == 1:
            return np.asarray(pieces[0])
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=self.dtype)


def _windows(tokens: TokenShards, seq_len: int) -> int:
    """How many ``seq_len + 1``-token windows, overlapping by one token, the stream holds."""
    return max(0, (len(tokens) - 1) // seq_len)


def _check_sizes(batch_size: int, seq_len: int, rank: int, world_size: int) -> None:
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name}={value!r} must be a positive integer")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ConfigError(f"rank={rank!r} must be in [0, world_size={world_size})")


def _stack(tokens: TokenShards, windows: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, targets) of the given windows: LongTensors (len(windows), seq_len)."""
    rows = np.empty((len(windows), seq_len + 1), dtype=np.int64)
    for i, w in enumerate(windows):
        start = int(w) * seq_len
        rows[i] = tokens[start : start + seq_len + 1]
    data = torch.from_numpy(rows)
    return data[:, :-1], data[:, 1:]


class CausalBatches:
    """Packed causal-LM batches ``(input_ids, targets)``, LongTensors ``(batch_size, seq_len)`` with
    ``targets[:, t] == input_ids[:, t + 1]`` (see the module docstring for the exact order and rank rule).

    ``batch_size`` is per rank; the global batch is ``batch_size * world_size`` windows. Iterating never
    ends (epoch after epoch); ``epoch`` and ``step`` say where it is; ``len()`` is steps per epoch.
    """

    def __init__(
        self,
        tokens: TokenShards,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        _check_sizes(batch_size, seq_len, rank, world_size)
        self.tokens = tokens
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.global_batch = batch_size * world_size
        self.n_windows = _windows(tokens, seq_len)
        if self.n_windows < self.global_batch:
            need = self.global_batch * seq_len + 1
            per_rank = f" x world_size {world_size}" if world_size > 1 else ""
            raise DataError(
                f"the corpus is too small for one batch: it has {len(tokens):,} tokens, and batch_size "
                f"{batch_size}{per_rank} x seq_len {seq_len} needs {need:,} (+1 for the last target); "
                f"fix: lower batch_size or seq_len (at most {self.n_windows} windows of seq_len {seq_len}; "
                f"seq_len <= {max(0, (len(tokens) - 1) // self.global_batch)} fits batch_size "
                f"{batch_size}), or add data"
            )
        self.steps_per_epoch = self.n_windows // self.global_batch
        self.epoch = 0
        self.position = 0  # index into this epoch's order of the next global batch's first window
        self.step = 0
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __repr__(self) -> str:
        return (
            f"CausalBatches(batch_size={self.batch_size}, seq_len={self.seq_len}, seed={self.seed}, "
            f"rank={self.rank}, world_size={self.world_size}, epoch={self.epoch}, step={self.step})"
        )

    def order(self, epoch: int) -> np.ndarray:
        """The window order of ``epoch``: a seeded permutation of ``range(n_windows)`` (identity without
        shuffle).
        """
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            else:
                perm = np.arange(self.n_windows)
            self._order = (epoch, perm)
        return self._order[1]

    def _batch(self, epoch: int, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = position + self.rank * self.batch_size
        windows = self.order(epoch)[first : first + self.batch_size]
        return _stack(self.tokens, windows, self.seq_len)

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's batch of global step ``step`` (counting from 0 with this global batch size)."""
        if step < 0:
            raise ConfigError(f"step={step} must be >= 0")
        epoch, k = divmod(step, self.steps_per_epoch)
        return self._batch(epoch, k * self.global_batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position + self.global_batch > self.n_windows:
            self.epoch, self.position = self.epoch + 1, 0
        batch = self._batch(self.epoch, self.position)
        self.position += self.global_batch
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        """Where the iteration is, plus what must match to resume it exactly."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "step": self.step,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "n_windows": self.n_windows,
            "shuffle": int(self.shuffle),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state`` (from :meth:`state_dict`; any rank's, they are the same).

        The data, ``seq_len``, ``seed`` and ``shuffle`` must be those of the run that saved it; the batch
        size and world size may change (the next batch starts at the same window of the same epoch).
        """
        for key in ("seed", "seq_len", "n_windows", "shuffle"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                what = "the token data changed" if key == "n_windows" else f"{key} differs"
                raise DataError(
                    f"cannot resume these batches: {key}={state[key]} in the saved state but {mine} now "
                    f"({what}); fix: resume with the same data, seq_len, seed and shuffle"
                )
        self.epoch, self.position, self.step = int(state["epoch"]), int(state["position"]), int(state["step"])


def val_batches(
    tokens: TokenShards,
    batch_size: int,
    seq_len: int,
    rank: int = 0,
    world_size: int = 1,
    max_batches: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The windows of ``tokens`` in order (window 0, 1, 2, ...), as ``(input_ids, targets)`` batches.

    The same rank rule as :class:`CausalBatches`: global batch ``k`` is windows ``[k * G, (k + 1) * G)``
    with ``G = batch_size * world_size`` and rank ``r`` takes block ``r`` of it. Every window is used once;
    the last global batch may be short, so there a rank may get fewer rows, or none (a ``(0, seq_len)``
    batch): every rank yields the same number of batches, so sum the loss and count the tokens, then
    all-reduce both. ``max_batches`` stops early (a quick estimate on the first windows).
    """
    _check_sizes(batch_size, seq_len, rank, world_size)
    n = _windows(tokens, seq_len)
    if n == 0:
        raise DataError(
            f"the validation split has {len(tokens):,} tokens, fewer than one window of seq_len + 1 = "
            f"{seq_len + 1}; fix: lower seq_len, raise val_fraction when preparing the data, or add data"
        )
    g = batch_size * world_size
    n_batches = -(-n // g)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for k in range(n_batches):
        first = k * g + rank * batch_size
        windows = np.arange(first, min(first + batch_size, n))
        yield _stack(tokens, windows, seq_len)
