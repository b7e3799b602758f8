"""Row-level helpers shared by the data readers (chat, preference, pairs, labeled) and the trainers that
batch their rows."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from lamina.tokenizer import Tokenizer


def iter_jsonl(
    path: str | os.PathLike[str],
    bad_json: Callable[[int, json.JSONDecodeError], Exception | None],
    *,
    errors: str = "strict",
) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for each non-blank line of the JSONL file ``path``, numbered from 1.

    For a line that is not JSON, ``bad_json(n, error)`` decides: an exception it returns is raised
    (without the decoder's traceback: the caller's one-line message names the file and line); ``None``
    skips the line (a reader that records problems and goes on). ``errors`` is ``open``'s
    (``"replace"`` reads a file with stray bytes). Raises ``OSError`` if the file cannot be opened.
    """
    with open(path, encoding="utf-8", errors=errors) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                problem = bad_json(n, e)
                if problem is None:
                    continue
                raise problem from None
            yield n, value


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held-out) row indices of a seeded random split of ``n`` rows with ``round(n * fraction)``
    held out, at least one on each side when ``n >= 2`` (nothing held out below that), in the order of
    ``np.random.default_rng(seed).permutation(n)``."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    k = min(max(1, round(n * fraction)), n - 1) if n > 1 else 0
    return order[k:], order[:k]


def pad_id(tokenizer: Tokenizer, eos_ids: Sequence[int] | None = None) -> int:
    """The id that pads batch rows: the tokenizer's pad token, else the first of ``eos_ids`` (by default
    the tokenizer's eos), else 0. Padded positions are masked out, so any id in the vocabulary does (TRL
    and transformers fall back to eos the same way)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    eos = tokenizer.eos_token_ids if eos_ids is None else eos_ids
    return eos[0] if eos else 0
