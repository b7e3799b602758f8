"""Labeled text for task heads, tokenized once and served as padded batches by index.

- sequence labels (classify, regress): CSV or JSONL rows with a text column (optionally a second text,
  for pairs) and a label column (``read_labeled``, ``LabeledBatches``);
- word labels (token_classify): JSONL rows with a list of words and a list of tags, one per word, the
  format of CoNLL-style datasets on the Hugging Face hub (``read_tagged``, ``TaggedBatches``).
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
from lamina.errors import DataError
from lamina.tokenizer import Tokenizer


@dataclass
class LabeledData:
    """Texts (and optional second texts) with their raw labels (strings or numbers), as read, and where
    each row came from (``FILE row N``, for error messages)."""

    texts: list[str]
    labels: list[str | float]
    pairs: list[str] | None = None
    where: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def split(self, fraction: float, seed: int) -> tuple[LabeledData, LabeledData]:
        """A random (train, held-out) split with ``fraction`` of the rows held out (at least one each from two rows on)."""
        keep, held_out = split_indices(len(self), fraction, seed)
        return self.subset(keep), self.subset(held_out)

    def subset(self, rows: Sequence[int] | np.ndarray) -> LabeledData:
        """The rows ``rows``, in that order."""
        pick = [int(i) for i in rows]
        pairs = [self.pairs[i] for i in pick] if self.pairs is not None else None
        where = [self.where[i] for i in pick] if self.where else []
        return LabeledData([self.texts[i] for i in pick], [self.labels[i] for i in pick], pairs, where)


@dataclass
class TaggedData:
    """Sentences as lists of words with one raw tag (string or number) per word, and where each came
    from (``FILE:LINE``, for error messages)."""

    words: list[list[str]]
    tags: list[list[str | float]]
    where: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.words)

    def split(self, fraction: float, seed: int) -> tuple[TaggedData, TaggedData]:
        """A random (train, held-out) split with ``fraction`` of the sentences held out (at least one each from two sentences on)."""
        keep, held_out = split_indices(len(self), fraction, seed)
        return self.subset(keep), self.subset(held_out)

    def subset(self, rows: Sequence[int] | np.ndarray) -> TaggedData:
        """The sentences ``rows``, in that order."""
        pick = [int(i) for i in rows]
        where = [self.where[i] for i in pick] if self.where else []
        return TaggedData([self.words[i] for i in pick], [self.tags[i] for i in pick], where)


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
        rows = [
            row for _, row in iter_jsonl(path, lambda n, e: DataError(f"{path}:{n} is not valid JSON ({e})"))
        ]
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
        [f"{path} row {n}" for n in range(1, len(rows) + 1)],
    )


def read_tagged(path: str | Path, tokens_field: str = "tokens", tags_field: str = "tags") -> TaggedData:
    """Sentences of a ``.jsonl`` file, one ``{"tokens": [words], "tags": [one per word]}`` per line.

    Tags are names (``"B-PER"``) or numbers (HF datasets export ``ner_tags`` as class ids); sentences
    with no words are skipped. Bad rows are an error naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no tagged data file {str(path)!r}; fix: pass a .jsonl file")
    if path.suffix != ".jsonl":
        raise DataError(
            f"{str(path)!r}: token classification data must be a .jsonl file with one "
            f'{{"{tokens_field}": [words], "{tags_field}": [tags]}} per line'
        )
    data = TaggedData([], [], [])
    for n, row in iter_jsonl(path, lambda n, e: DataError(f"{path}:{n} is not valid JSON ({e})")):
        where = f"{path}:{n}"
        if not isinstance(row, dict) or tokens_field not in row or tags_field not in row:
            has = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
            raise DataError(
                f"{where} has no {tokens_field!r} or no {tags_field!r} (it has {has}); fix: pass "
                "--task.tokens_field / --task.tags_field naming the right columns"
            )
        words, tags = row[tokens_field], row[tags_field]
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise DataError(f"{where}: {tokens_field!r} must be a list of words (strings), got {words!r:.80}")
        if not isinstance(tags, list) or not all(
            isinstance(t, (str, int, float)) and not isinstance(t, bool) for t in tags
        ):
            raise DataError(
                f"{where}: {tags_field!r} must be a list of tags (strings or numbers), got {tags!r:.80}"
            )
        if len(words) != len(tags):
            raise DataError(
                f"{where} has {len(words)} {tokens_field} but {len(tags)} {tags_field}; fix: one tag per word"
            )
        if words:
            data.words.append(words)
            data.tags.append([t if isinstance(t, str) else float(t) for t in tags])
            data.where.append(where)
    if not data.words:
        raise DataError(f"{str(path)!r} has no tagged sentences")
    return data


class _Batches:
    """Rows of token ids (and token-type ids) served as padded batches by index; subclasses encode the
    rows and say what a batch's ``labels`` are.

    ``batch(i)`` is a pure function of ``i``: epoch ``i // steps_per_epoch`` shuffles the rows with
    (seed, epoch); the last short batch of an epoch is dropped (``eval_batches`` keeps everything).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        ids: list[list[int]],
        types: list[list[int]],
        batch_size: int,
        seed: int,
        token_types: bool,
    ) -> None:
        self.ids, self.types = ids, types
        self.batch_size, self.seed = batch_size, seed
        self.pad = tokenizer.pad_token_id or 0
        self.token_types = token_types
        self.steps_per_epoch = max(1, len(self.ids) // batch_size)
        self.truncated = 0  # rows longer than max_seq_len, cut to fit (set by the subclasses)

    @staticmethod
    def _check_lengths(
        too_long: list[tuple[int, int]],
        total: int,
        max_seq_len: int,
        where: list[str],
        truncate: bool,
        what: str,
    ) -> None:
        """Refuse over-long rows ((row, tokens) pairs) unless ``truncate``; the message counts them and
        names the first."""
        if too_long and not truncate:
            row, n = too_long[0]
            at = where[row] if where else f"row {row + 1}"
            raise DataError(
                f"{len(too_long)} of {total} {what} are longer than max_seq_len={max_seq_len} tokens "
                f"(first: {at}, {n} tokens) and truncation is off; fix: raise task.max_seq_len (at most "
                "the model's max_seq_len) or turn truncation on (task.truncate true) to cut them"
            )

    def _labels(self, rows: Sequence[int], T: int) -> torch.Tensor:
        raise NotImplementedError

    def _collate(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        T = max(len(self.ids[i]) for i in rows)
        x = torch.full((len(rows), T), self.pad, dtype=torch.long)
        tt = torch.zeros((len(rows), T), dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for r, i in enumerate(rows):
            n = len(self.ids[i])
            x[r, :n], tt[r, :n], mask[r, :n] = torch.tensor(self.ids[i]), torch.tensor(self.types[i]), 1
        out = {"input_ids": x, "attention_mask": mask, "labels": self._labels(rows, T)}
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


class LabeledBatches(_Batches):
    """Padded batches ``{"input_ids", "attention_mask", "token_type_ids"?, "labels"}`` of encoded rows,
    ``labels`` (B,) one target per row (``targets[row]``).

    A row longer than ``max_seq_len`` tokens (special tokens included) is cut to fit, pairs longest
    first as transformers does, and counted in ``truncated``; with ``truncate=False`` any such row is
    a ``DataError`` that counts them and names the first.
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
        truncate: bool = True,
    ) -> None:
        backend = tokenizer.backend
        specials = backend.num_special_tokens_to_add(is_pair=data.pairs is not None)
        budget = max_seq_len - specials
        enc_a = backend.encode_batch(data.texts, add_special_tokens=False)
        enc_b = backend.encode_batch(data.pairs, add_special_tokens=False) if data.pairs else None
        ids: list[list[int]] = []
        types: list[list[int]] = []
        too_long: list[tuple[int, int]] = []
        for k, a in enumerate(enc_a):
            b = enc_b[k] if enc_b is not None else None
            n = len(a.ids) + (len(b.ids) if b is not None else 0)
            if n > budget:
                too_long.append((k, n + specials))
            while len(a.ids) + (len(b.ids) if b is not None else 0) > budget:  # longest first, as HF
                if b is not None and len(b.ids) >= len(a.ids):
                    b.truncate(len(b.ids) - 1)
                else:
                    a.truncate(len(a.ids) - 1)
            e = backend.post_process(a, b)
            ids.append(e.ids)
            types.append(e.type_ids)
        what = "text pairs" if data.pairs is not None else "texts"
        self._check_lengths(too_long, len(data), max_seq_len, data.where, truncate, what)
        super().__init__(tokenizer, ids, types, batch_size, seed, token_types)
        self.targets = targets
        self.truncated = len(too_long)

    def _labels(self, rows: Sequence[int], T: int) -> torch.Tensor:
        return self.targets[list(rows)]


IGNORE = -100  # the label of positions the loss skips (torch's cross_entropy ignore_index default)


class TaggedBatches(_Batches):
    """Padded batches of tagged sentences: ``labels`` (B, T) holds a word's tag id at the word's first
    subword and ``IGNORE`` (-100) at its other subwords, at special tokens and at padding, the labelling
    of transformers' token-classification recipe.

    A sentence is tokenized as the text ``" ".join(words)``, the way the model reads running text, and
    each token belongs to the word of its first non-space character (by the tokenizer's offsets). For
    WordPiece this equals encoding the words one by one (transformers' ``is_split_into_words``); byte-level
    and SentencePiece tokenizers keep the leading-space tokens they were trained on, which word-by-word
    encoding loses. A sentence longer than ``max_seq_len`` tokens is cut (the words cut off are not
    scored) and counted in ``truncated``; with ``truncate=False`` it is a ``DataError`` instead.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        data: TaggedData,
        targets: list[list[int]],
        batch_size: int,
        max_seq_len: int,
        seed: int = 0,
        token_types: bool = False,
        truncate: bool = True,
    ) -> None:
        backend = tokenizer.backend
        specials = backend.num_special_tokens_to_add(is_pair=False)
        budget = max_seq_len - specials
        texts = [" ".join(words) for words in data.words]
        ids: list[list[int]] = []
        types: list[list[int]] = []
        self.token_labels: list[list[int]] = []
        too_long: list[tuple[int, int]] = []
        for k, (words, tags, text, a) in enumerate(
            zip(
                data.words, targets, texts, backend.encode_batch(texts, add_special_tokens=False), strict=True
            )
        ):
            if len(a.ids) > budget:
                too_long.append((k, len(a.ids) + specials))
                a.truncate(budget)
            e = backend.post_process(a)
            owner = np.full(len(text) + 1, -1)  # character -> index of its word (-1: the spaces between)
            start = 0
            for k, w in enumerate(words):
                owner[start : start + len(w)] = k
                start += len(w) + 1
            labels, previous = [], -1
            for (s, t), special in zip(e.offsets, e.special_tokens_mask, strict=True):
                hit = owner[s:t][owner[s:t] >= 0]
                word = -1 if special or len(hit) == 0 else int(hit[0])
                labels.append(tags[word] if word >= 0 and word != previous else IGNORE)
                previous = max(previous, word)
            ids.append(e.ids)
            types.append(e.type_ids)
            self.token_labels.append(labels)
        self._check_lengths(too_long, len(data), max_seq_len, data.where, truncate, "sentences")
        super().__init__(tokenizer, ids, types, batch_size, seed, token_types)
        self.truncated = len(too_long)

    def _labels(self, rows: Sequence[int], T: int) -> torch.Tensor:
        y = torch.full((len(rows), T), IGNORE, dtype=torch.long)
        for r, i in enumerate(rows):
            y[r, : len(self.token_labels[i])] = torch.tensor(self.token_labels[i], dtype=torch.long)
        return y
