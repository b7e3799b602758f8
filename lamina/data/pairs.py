"""Source/target pairs for sequence-to-sequence training (translation, summarization): read from TSV, CSV or
JSONL, tokenized once, served as padded teacher-forcing batches by index.

    train, val = load_pairs(PairDataConfig(path="pairs.tsv", source_field="en", target_field="fr"))
    batches = PairBatches(tokenizer, train, batch_size=16, decoder_start_token_id=0)
    batch = batches.batch(0)

A batch of ``B`` pairs holds (LongTensors):

- ``input_ids`` (B, S), ``attention_mask`` (B, S): the source's tokens then eos, padded on the right with
  the pad id; the mask is 1 on real tokens, 0 on padding;
- ``decoder_input_ids`` (B, T): ``decoder_start_token_id`` then the target's tokens, i.e. the labels shifted
  right by one (``shift_tokens_right`` of transformers' T5, BART and Marian), padded with the pad id;
- ``labels`` (B, T): the target's tokens then eos, ``-100`` on padding (skipped by the loss).

Texts are encoded without the tokenizer's own special tokens and eos is appended to both sides when the
tokenizer has one (what T5's tokenizer does). ``max_source_len`` / ``max_target_len`` count that eos.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lamina.data.rows import iter_jsonl, split_indices
from lamina.errors import ConfigError, DataError
from lamina.tokenizer import Tokenizer

__all__ = ["IGNORE", "PairBatches", "PairData", "PairDataConfig", "load_pairs", "read_pairs"]

IGNORE = -100  # the label of positions the loss skips (torch's cross_entropy ignore_index default)
FORMATS = (".tsv", ".tab", ".csv", ".jsonl", ".ndjson")


@dataclass
class PairDataConfig:
    """Where the pairs are and how they become batches (the ``data`` of a seq2seq run)."""

    path: str = ""  # the training pairs: .tsv or .csv with a header row, or .jsonl (one object per line)
    val_path: str | None = None  # validation pairs, same format (None: hold out val_fraction of path)
    val_fraction: float = (
        0.1  # share of path's pairs held out for validation when val_path is None, in (0, 1)
    )
    source_field: str = "source"  # the column (TSV/CSV header) or key (JSONL) holding the source text
    target_field: str = "target"  # the column or key holding the target text
    max_source_len: int = 512  # source tokens per pair, eos included (at most the model's max_seq_len)
    max_target_len: int = 128  # target tokens per pair, eos included (at most the model's max_seq_len)
    # cut a longer source or target to fit and count it in the run's notes; false: refuse such a pair
    truncate: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction={self.val_fraction} must be in (0, 1) (e.g. 0.1)")
        for name in ("max_source_len", "max_target_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 2:
                raise ConfigError(f"{name}={value!r} must be an integer >= 2 (one token and eos)")
        if self.source_field == self.target_field:
            raise ConfigError(
                f"source_field and target_field are both {self.source_field!r}; fix: name two columns"
            )


@dataclass
class PairData:
    """Source and target texts as read, and where each pair came from (``FILE:LINE``, for messages)."""

    sources: list[str]
    targets: list[str]
    where: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sources)

    def split(self, fraction: float, seed: int = 0) -> tuple[PairData, PairData]:
        """A random (train, held-out) split with ``fraction`` of the pairs held out (at least one, and at
        least one left for training)."""
        if len(self) < 2:
            raise DataError(f"{len(self)} pair(s) cannot be split into train and validation; add pairs")
        keep, held = split_indices(len(self), fraction, seed)
        return self.subset(keep), self.subset(held)

    def subset(self, rows: Sequence[int] | np.ndarray) -> PairData:
        """The pairs ``rows``, in that order."""
        pick = [int(i) for i in rows]
        where = [self.where[i] for i in pick] if self.where else []
        return PairData([self.sources[i] for i in pick], [self.targets[i] for i in pick], where)


def read_pairs(path: str | Path, source_field: str = "source", target_field: str = "target") -> PairData:
    """The pairs of a ``.tsv``/``.tab`` (tab-separated, header row, no quoting), ``.csv`` (header row,
    standard quoting) or ``.jsonl``/``.ndjson`` file (one JSON object per line; blank lines skipped).

    Raises ``DataError`` naming the file and line when the file is missing or empty, a JSONL line is not
    an object, or a pair has no ``source_field`` / ``target_field`` (or a value that is not text).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no pair file {str(path)!r}; fix: pass a .tsv, .csv or .jsonl file of pairs")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DataError(
            f"{str(path)!r}: pair files must be .tsv, .csv or .jsonl, not {suffix or 'no suffix'}"
        )
    data = PairData([], [], [])
    fields = (source_field, target_field)
    if suffix in (".jsonl", ".ndjson"):
        for n, row in iter_jsonl(
            path, lambda n, e: DataError(f"{path}:{n} is not valid JSON ({e.msg}); fix the line")
        ):
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n} is not a JSON object; each line must be {{...}}")
            _add(data, row, fields, f"{path}:{n}")
    else:
        with open(path, newline="", encoding="utf-8") as f:
            if suffix == ".csv":
                reader = csv.DictReader(f)
            else:  # TSV: tabs separate, quotes are text (translation corpora hold unbalanced quotes)
                reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            try:
                for row in reader:
                    _add(data, row, fields, f"{path}:{reader.line_num}")
            except csv.Error as e:
                raise DataError(f"{path}:{reader.line_num} is not valid {suffix[1:].upper()} ({e})") from None
    if not data.sources:
        raise DataError(f"{str(path)!r} has no pairs")
    return data


def _add(data: PairData, row: dict[str, object], fields: tuple[str, str], where: str) -> None:
    for name in fields:
        value = row.get(name)
        if value is None:
            has = ", ".join(repr(k) for k in row if k is not None) or "nothing"
            raise DataError(
                f"{where} has no field {name!r} (it has {has}); fix: add it, or name the right column with "
                f"{'source_field' if name == fields[0] else 'target_field'}"
            )
        if not isinstance(value, str):
            raise DataError(f"{where}: field {name!r} must be text, got {type(value).__name__} {value!r:.60}")
    data.sources.append(row[fields[0]])  # type: ignore[arg-type]
    data.targets.append(row[fields[1]])  # type: ignore[arg-type]
    data.where.append(where)


def load_pairs(cfg: PairDataConfig, seed: int = 0) -> tuple[PairData, PairData]:
    """(train, validation) pairs of ``cfg``: ``cfg.val_path`` when given, else a seeded random
    ``cfg.val_fraction`` of ``cfg.path``. Raises ``DataError`` (see ``read_pairs``)."""
    if not cfg.path:
        raise DataError("no pair file given; fix: set path (a .tsv, .csv or .jsonl file of pairs)")
    train = read_pairs(cfg.path, cfg.source_field, cfg.target_field)
    if cfg.val_path:
        return train, read_pairs(cfg.val_path, cfg.source_field, cfg.target_field)
    return train.split(cfg.val_fraction, seed)


class PairBatches:
    """Encoded pairs served as padded teacher-forcing batches (see the module docstring for the layout).

    ``batch(i)`` is a pure function of ``i``: epoch ``i // steps_per_epoch`` shuffles the pairs with
    (seed, epoch) and the last short batch of an epoch is dropped; ``eval_batches()`` gives every pair once,
    in order. A source (target) longer than ``max_source_len`` (``max_target_len``) tokens, eos included,
    is cut to its first tokens and eos and counted in ``truncated_sources`` (``truncated_targets``); with
    ``truncate=False`` such a pair is a ``DataError`` that counts them and names the first.

    ``decoder_start_token_id`` (the model's; T5 and Marian use the pad id, BART eos) defaults to the
    tokenizer's pad id, else its bos, else its eos. Padding uses the pad id (else eos, else 0).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        data: PairData,
        batch_size: int,
        max_source_len: int = PairDataConfig.max_source_len,
        max_target_len: int = PairDataConfig.max_target_len,
        decoder_start_token_id: int | None = None,
        seed: int = 0,
        truncate: bool = PairDataConfig.truncate,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be a positive integer")
        if len(data) == 0:
            raise DataError("no pairs to batch; add pairs to the file")
        eos = tokenizer.eos_token_id
        self.pad = next((i for i in (tokenizer.pad_token_id, eos) if i is not None), 0)
        if decoder_start_token_id is None:
            choices = (tokenizer.pad_token_id, tokenizer.bos_token_id, eos)
            decoder_start_token_id = next((i for i in choices if i is not None), 0)
        self.decoder_start_token_id = decoder_start_token_id
        self.batch_size, self.seed, self.where = batch_size, seed, data.where
        self.sources, too_long_src = _encode(tokenizer, data.sources, max_source_len, eos)
        self.targets, too_long_tgt = _encode(tokenizer, data.targets, max_target_len, eos)
        for side, too_long, limit in (
            ("source", too_long_src, max_source_len),
            ("target", too_long_tgt, max_target_len),
        ):
            if too_long and not truncate:
                row, n = too_long[0]
                at = data.where[row] if data.where else f"pair {row + 1}"
                raise DataError(
                    f"{len(too_long)} of {len(data)} {side}s are longer than max_{side}_len={limit} tokens "
                    f"(first: {at}, {n} tokens with eos) and truncate is off; fix: raise max_{side}_len "
                    "(at most the model's max_seq_len) or set truncate true to cut them"
                )
        self.truncated_sources, self.truncated_targets = len(too_long_src), len(too_long_tgt)
        self.max_source_len, self.max_target_len = max_source_len, max_target_len
        self.steps_per_epoch = max(1, len(data) // batch_size)

    def __len__(self) -> int:
        """Pairs held."""
        return len(self.sources)

    def stats(self) -> dict[str, float]:
        """Counts for a run's report: pairs, truncated sources and targets, mean tokens per side."""
        return {
            "pairs": len(self),
            "truncated_sources": self.truncated_sources,
            "truncated_targets": self.truncated_targets,
            "mean_source_tokens": float(np.mean([len(s) for s in self.sources])),
            "mean_target_tokens": float(np.mean([len(t) for t in self.targets])),
        }

    def notes(self, what: str = "training") -> list[str]:
        """Lines for a person about truncation ("3 of 80 training sources truncated to 512 tokens")."""
        out = []
        for side, n, limit in (
            ("sources", self.truncated_sources, self.max_source_len),
            ("targets", self.truncated_targets, self.max_target_len),
        ):
            if n:
                out.append(f"{n} of {len(self)} {what} {side} truncated to {limit} tokens")
        return out

    def collate(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        """The batch of pairs ``rows`` (see the module docstring)."""
        B = len(rows)
        S = max(len(self.sources[i]) for i in rows)
        T = max(len(self.targets[i]) for i in rows)
        input_ids = torch.full((B, S), self.pad, dtype=torch.long)
        attention_mask = torch.zeros((B, S), dtype=torch.long)
        decoder_input_ids = torch.full((B, T), self.pad, dtype=torch.long)
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        for r, i in enumerate(rows):
            src, tgt = self.sources[i], self.targets[i]
            input_ids[r, : len(src)] = torch.tensor(src)
            attention_mask[r, : len(src)] = 1
            labels[r, : len(tgt)] = torch.tensor(tgt)
            decoder_input_ids[r, 0] = self.decoder_start_token_id
            decoder_input_ids[r, 1 : len(tgt)] = torch.tensor(tgt[:-1], dtype=torch.long)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "decoder_input_ids": decoder_input_ids,
            "labels": labels,
        }

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """Training batch ``index`` (shuffled per epoch, a pure function of ``index`` and the seed)."""
        if index < 0:
            raise ConfigError(f"batch index {index} must be >= 0")
        epoch, k = divmod(index, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self))
        return self.collate(order[k * self.batch_size : (k + 1) * self.batch_size].tolist())

    def eval_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Every pair once, in order, ``batch_size`` at a time (the last batch may be short)."""
        for start in range(0, len(self), self.batch_size):
            yield self.collate(range(start, min(start + self.batch_size, len(self))))

    def n_eval_batches(self) -> int:
        """How many batches ``eval_batches`` yields."""
        return math.ceil(len(self) / self.batch_size)


def _encode(
    tokenizer: Tokenizer, texts: list[str], limit: int, eos: int | None
) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Each text's ids (+ eos), cut to ``limit``; and (row, length with eos) of those that were longer."""
    extra = 1 if eos is not None else 0
    out, too_long = [], []
    # user text stays text: a "</s>" written in a source is characters, never the control token
    for k, ids in enumerate(
        tokenizer.encode_batch(texts, add_special_tokens=False, split_special_tokens=True)
    ):
        if len(ids) + extra > limit:
            too_long.append((k, len(ids) + extra))
            ids = ids[: limit - extra]
        out.append([*ids, eos] if eos is not None else ids)
    return out, too_long
