"""Labeled text for task heads: CSV or JSONL rows with a text column (optionally a second text, for
pairs) and a label column, tokenized once and served as padded batches by index.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lamina.errors import DataError
from lamina.tokenizer import Tokenizer


@dataclass
class LabeledData:
    """Texts (and optional second texts) with their raw labels (strings or numbers), as read."""

    texts: list[str]
    labels: list[str | float]
    pairs: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def split(self, fraction: float, seed: int) -> tuple[LabeledData, LabeledData]:
        """A random (train, held-out) split with ``fraction`` of the rows held out (at least one)."""
        order = np.random.default_rng(seed).permutation(len(self))
        n_val = max(1, round(fraction * len(self)))
        return self.subset(order[n_val:]), self.subset(order[:n_val])

    def subset(self, rows: Sequence[int] | np.ndarray) -> LabeledData:
        """The rows ``rows``, in that order."""
        pick = [int(i) for i in rows]
        pairs = [self.pairs[i] for i in pick] if self.pairs is not None else None
        return LabeledData([self.texts[i] for i in pick], [self.labels[i] for i in pick], pairs)


def read_labeled(
    path: str | Path, text_field: str = "text", label_field: str = "label", pair_field: str | None = None
) -> LabeledData:
    """Rows of a ``.csv`` (with a header) or ``.jsonl`` file; a missing column is an error naming the
    columns the file has."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no labeled data file {str(path)!r}; fix: pass a .csv or .jsonl file")
    rows: list[dict[str, object]]
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    elif path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n} is not valid JSON ({e})") from e
    else:
        raise DataError(f"{str(path)!r}: labeled data must be a .csv or .jsonl file")
    if not rows:
        raise DataError(f"{str(path)!r} has no rows")
    wanted = [text_field, label_field] + ([pair_field] if pair_field else [])
    for n, row in enumerate(rows, 1):
        missing = [c for c in wanted if row.get(c) is None]
        if missing:
            raise DataError(
                f"{path} row {n} has no column {missing[0]!r} (it has {', '.join(map(str, row))}); fix: "
                "pass --task.text_field / --task.label_field naming the right columns"
            )
    labels: list[str | float] = []
    for row in rows:
        value = row[label_field]
        labels.append(value if isinstance(value, str) else float(value))  # type: ignore[arg-type]
    return LabeledData(
        [str(r[text_field]) for r in rows],
        labels,
        [str(r[pair_field]) for r in rows] if pair_field else None,
    )


class LabeledBatches:
    """Padded batches ``{"input_ids", "attention_mask", "token_type_ids"?, "labels"}`` of encoded rows.

    ``batch(i)`` is a pure function of ``i``: epoch ``i // steps_per_epoch`` shuffles the rows with
    (seed, epoch); the last short batch of an epoch is dropped (``eval_batches`` keeps everything).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        data: LabeledData,
        targets: torch.Tensor,
        batch_size: int,
        max_seq_len: int,
        seed: int = 0,
        token_types: bool = False,
    ) -> None:
        backend = tokenizer.backend
        budget = max_seq_len - backend.num_special_tokens_to_add(is_pair=data.pairs is not None)
        enc_a = backend.encode_batch(data.texts, add_special_tokens=False)
        enc_b = backend.encode_batch(data.pairs, add_special_tokens=False) if data.pairs else None
        self.ids: list[list[int]] = []
        self.types: list[list[int]] = []
        for k, a in enumerate(enc_a):
            b = enc_b[k] if enc_b is not None else None
            while len(a.ids) + (len(b.ids) if b is not None else 0) > budget:  # longest first, as HF
                if b is not None and len(b.ids) >= len(a.ids):
                    b.truncate(len(b.ids) - 1)
                else:
                    a.truncate(len(a.ids) - 1)
            e = backend.post_process(a, b)
            self.ids.append(e.ids)
            self.types.append(e.type_ids)
        self.targets, self.batch_size, self.seed = targets, batch_size, seed
        self.pad = tokenizer.pad_token_id or 0
        self.token_types = token_types
        self.steps_per_epoch = max(1, len(self.ids) // batch_size)

    def _collate(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        T = max(len(self.ids[i]) for i in rows)
        x = torch.full((len(rows), T), self.pad, dtype=torch.long)
        tt = torch.zeros((len(rows), T), dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for r, i in enumerate(rows):
            n = len(self.ids[i])
            x[r, :n], tt[r, :n], mask[r, :n] = torch.tensor(self.ids[i]), torch.tensor(self.types[i]), 1
        out = {"input_ids": x, "attention_mask": mask, "labels": self.targets[list(rows)]}
        if self.token_types:
            out["token_type_ids"] = tt
        return out

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """Training batch ``index`` (shuffled per epoch)."""
        epoch, k = divmod(index, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.ids))
        return self._collate(order[k * self.batch_size : (k + 1) * self.batch_size].tolist())

    def eval_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Every row once, in order."""
        for start in range(0, len(self.ids), self.batch_size):
            yield self._collate(range(start, min(start + self.batch_size, len(self.ids))))

    def n_eval_batches(self) -> int:
        """How many batches ``eval_batches`` yields."""
        return math.ceil(len(self.ids) / self.batch_size)
