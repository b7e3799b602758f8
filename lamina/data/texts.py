"""Texts to run a model on, read from a file: one per line, or one field of each JSONL row."""

from __future__ import annotations

import sys
from pathlib import Path

from lamina.data.rows import iter_jsonl
from lamina.errors import DataError


def read_texts(source: str, field: str = "text") -> list[str]:
    """The texts of ``source``: the lines of a text file (blank lines kept, so line N is text N), or the
    ``field`` of each row of a ``.jsonl`` file; ``"-"`` reads standard input.

    Raises ``DataError`` naming the file (and line) when it is missing, a row is not JSON, or a row has
    no string ``field``.

    Args:
        field: the JSONL field holding the text
    """
    if source == "-":
        return sys.stdin.read().splitlines()
    path = Path(source)
    if not path.is_file():
        raise DataError(f"--input {source!r} does not exist; fix: pass a text or .jsonl file")
    if not source.endswith(".jsonl"):
        return path.read_text(encoding="utf-8").splitlines()
    texts = []
    for n, row in iter_jsonl(
        path,
        lambda n, e: DataError(f"{source}:{n} is not valid JSON ({e.msg}); fix the line or use a text file"),
    ):
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise DataError(f"{source}:{n} has no string field {field!r}; fix: pass --field NAME")
        texts.append(row[field])
    return texts
