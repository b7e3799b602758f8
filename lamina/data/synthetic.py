"""Synthetic seq2seq tasks that a tiny model learns in seconds: a check that a training setup works.

Reverse: the source is a sequence of 1 to ``max_len`` (8) symbols drawn uniformly from ``n_symbols`` (20),
written as space-separated words ``s0`` ... ``s19``; the target is the same sequence reversed::

    s3 s17 s0  ->  s0 s17 s3

``symbol_tokenizer`` maps each symbol to one id (and has pad, bos, eos, unk), so decoding a generated
sequence gives back the exact text and exact match is meaningful.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lamina.data.pairs import PairData
from lamina.errors import ConfigError
from lamina.tokenizer import Tokenizer

__all__ = ["reverse_pairs", "symbol_tokenizer", "write_reverse_task"]

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


def symbols(n_symbols: int = 20) -> list[str]:
    """The task's vocabulary of symbols: ``s0`` ... ``s{n-1}``."""
    return [f"s{i}" for i in range(n_symbols)]


def reverse_pairs(
    n: int, *, max_len: int = 8, n_symbols: int = 20, seed: int = 0, exclude: set[str] | None = None
) -> PairData:
    """``n`` distinct reverse-task pairs: lengths uniform in [1, max_len], symbols uniform; sources in
    ``exclude`` are skipped (held-out splits that never repeat a training source).

    Raises ``ConfigError`` when fewer than ``n`` distinct sources exist.
    """
    if max_len < 1 or n_symbols < 1:
        raise ConfigError(f"max_len={max_len} and n_symbols={n_symbols} must be >= 1")
    possible = sum(n_symbols**k for k in range(1, max_len + 1)) - len(exclude or ())
    if n > possible:
        raise ConfigError(f"n={n} distinct sequences asked for, but only {possible} exist; lower n")
    rng = np.random.default_rng(seed)
    names = symbols(n_symbols)
    seen = set(exclude or ())
    sources: list[str] = []
    while len(sources) < n:
        length = int(rng.integers(1, max_len + 1))
        seq = [names[i] for i in rng.integers(0, n_symbols, size=length)]
        text = " ".join(seq)
        if text not in seen:
            seen.add(text)
            sources.append(text)
    return PairData(sources, [" ".join(reversed(s.split())) for s in sources])


def symbol_tokenizer(n_symbols: int = 20) -> Tokenizer:
    """A word-level tokenizer over ``<pad> <s> </s> <unk>`` (ids 0-3) and the symbols (ids 4 ...); decoding
    joins symbols with single spaces."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate([*SPECIALS, *symbols(n_symbols)])}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    backend.add_special_tokens(list(SPECIALS))
    return Tokenizer(backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def write_reverse_task(
    out_dir: str | Path,
    *,
    n_train: int = 20_000,
    n_val: int = 500,
    n_test: int = 500,
    max_len: int = 8,
    n_symbols: int = 20,
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` (``{"source", "target"}`` rows) of the reverse
    task into ``out_dir``; no source is in two splits. Returns the paths by split."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    paths = {}
    for k, (split, n) in enumerate((("train", n_train), ("val", n_val), ("test", n_test))):
        data = reverse_pairs(n, max_len=max_len, n_symbols=n_symbols, seed=seed * 3 + k, exclude=taken)
        taken.update(data.sources)
        path = out / f"{split}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for s, t in zip(data.sources, data.targets, strict=True):
                f.write(json.dumps({"source": s, "target": t}) + "\n")
        paths[split] = path
    return paths
