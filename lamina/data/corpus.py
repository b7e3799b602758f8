"""Text in, token shards out: ``prepare(DataConfig(...))`` turns text files, folders, globs, JSONL files
and the built-in corpus into memory-mappable token shards with a train/validation split.

    cfg = DataConfig(sources=["notes/", "web/*.jsonl"], tokenizer="smollm2", out="data/mine")
    manifest = prepare(cfg)                 # data/mine/{train,val}-00000.bin, tokenizer/, manifest.json
    print(manifest.summary())

The output folder holds, and nothing else:

* ``train-NNNNN.bin``, ``val-NNNNN.bin``: the token ids of each split, raw little-endian ``uint16`` when the
  vocabulary has at most 65536 ids, else ``uint32`` (``np.memmap(file, dtype)`` reads them). Each document
  is followed by the eos id (``append_eos``); a split is one stream cut into shards of at most
  ``shard_tokens`` ids, so a document may continue in the next shard.
* ``tokenizer/``: a copy of the tokenizer the ids belong to (``Tokenizer.from_file`` loads it).
* ``manifest.json``: tokenizer, dtype, eos id, documents and tokens per split, the shards, the sources, and
  every input that was skipped and why (see :class:`Manifest`).

What is a document: a text file, or one line of a JSONL file (its ``jsonl_field``). Binary files (a NUL
byte in the first 8 KiB), empty documents, unreadable files and bad JSONL lines are skipped and reported,
never fatal; bytes that are not UTF-8 are replaced by U+FFFD and the files holding them are listed.

The split is by document and by content: a document goes to validation when a keyed hash of its text
(``seed`` is the key) falls below ``val_fraction``, so the split does not depend on file order, paths or
``num_workers``, and duplicate documents land on the same side. With two or more documents and
``val_fraction > 0`` neither split is left empty (the document with the smallest hash moves to val, or the
one with the largest to train). A split whose share of tokens ends up far from ``val_fraction`` (few or
uneven documents) is reported with a one-line warning on stderr (``Manifest.split_warning``).

Parallel and serial runs give byte-identical output: workers tokenize tasks (groups of files, or chunks of
a JSONL file) into part files, and the parent writes the shards in input order. The whole folder is built
under a temporary name beside ``out`` and renamed into place at the end, so a failed run leaves nothing.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import multiprocessing
import os
import secrets
import shutil
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from lamina.config import _check_types
from lamina.data.builtin import cut_at_line, stdlib_files
from lamina.errors import ConfigError, DataError, ModelNotFoundError, TokenizerError
from lamina.fields import SIZE
from lamina.tokenizer import Tokenizer

__all__ = ["DataConfig", "Manifest", "Shard", "Skipped", "SplitInfo", "load_tokenizer", "prepare"]

MANIFEST = "manifest.json"
SPLITS = ("train", "val")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
BINARY_SNIFF_BYTES = 8192
# Work units for the worker processes: up to TASK_FILES text files or TASK_BYTES bytes, or one JSONL chunk.
# They do not depend on num_workers (the output would not either way; this keeps the part files the same).
TASK_FILES = 16
TASK_BYTES = 1 << 20
JSONL_CHUNK_BYTES = 64 << 20
UINT16_VOCAB = 1 << 16
# how a JSONL field's value is named in messages (a JSON number, array, object, boolean)
_JSON_KIND = {bool: "a boolean", list: "an array", dict: "an object", str: "a string", type(None): "null"}


@dataclass
class DataConfig:
    """What ``prepare`` reads, how it tokenizes and splits, and where it writes.

    ``sources``: files, folders (read recursively; hidden files and folders are left out) and glob
    patterns (``**`` recurses). Files ending in ``.jsonl``/``.ndjson`` hold one JSON object per line, whose
    ``jsonl_field`` is the document; any other file is one document. ``builtin="stdlib"`` adds the
    built-in corpus (:mod:`lamina.data.builtin`) after the sources.
    ``tokenizer``: a ``tokenizer.json``, a folder holding one, or any MODEL (``smollm2``, a checkpoint
    folder, a ``.gguf``); or leave it None and set ``train_tokenizer`` to a vocabulary size to train a
    byte-level BPE on the same documents first.
    ``max_bytes``: read the inputs in order until their sizes add up to this; the text file that crosses
    it is the last and is cut at its last newline before the limit, a JSONL file that crosses it is read
    up to and including the record that crosses it; the files after are counted in ``unread_files``.
    ``val_fraction``: the share of documents held out for validation (0 for none).
    ``num_workers``: tokenizer processes (None: min(4, CPU count); 0 or 1: in this process).
    ``append_eos``: put the tokenizer's eos id after every document, so the model learns where one ends.
    ``parse_special_tokens``: read special-token text such as ``"<|endoftext|>"`` inside documents as the
    special token (False, the default: as plain text, so a document cannot forge an eos).
    ``shard_tokens``: most ids per shard file. ``overwrite``: replace an existing ``out`` folder.
    """

    # files, folders (read recursively, hidden ones left out) and glob patterns (** recurses); a .jsonl /
    # .ndjson file holds one document per line, any other file is one document
    sources: list[str] = field(default_factory=list)
    out: str = ""  # the output folder (shards, tokenizer/, manifest.json); must be given
    tokenizer: str | None = None  # a tokenizer.json, a folder holding one, or any MODEL (smollm2, a .gguf)
    train_tokenizer: int | None = None  # instead of tokenizer: train a byte-level BPE of this vocabulary size
    builtin: Literal["stdlib"] | None = None  # "stdlib": also read the built-in corpus, after the sources
    # read the inputs in order until their sizes add up to this many bytes (50M, 1GiB; None: all); the
    # text file that crosses it is cut at its last newline before the limit
    max_bytes: int | None = field(default=None, metadata=SIZE)
    jsonl_field: str = "text"  # the key of each JSONL record that holds the document
    val_fraction: float = 0.01  # share of documents held out for validation, in [0, 1) (0: none)
    seed: int = 0  # key of the hash that sends each document to train or validation
    num_workers: int | None = None  # tokenizer processes (None: min(4, CPU count); 0 or 1: this process)
    append_eos: bool = True  # put the eos id after every document, so the model learns where one ends
    # read special-token text such as "<|endoftext|>" in documents as the special token (False: as plain
    # text, so a document cannot forge an eos)
    parse_special_tokens: bool = False
    # most token ids per shard file (a count such as 100M)
    shard_tokens: int = field(default=1 << 27, metadata=SIZE)
    overwrite: bool = False  # replace an existing out folder

    def __post_init__(self) -> None:
        # Paths are welcome where strings are expected; the config stays plain strings for YAML.
        if isinstance(self.sources, str | os.PathLike):
            self.sources = [self.sources]  # type: ignore[list-item]
        self.sources = [os.fspath(s) if isinstance(s, os.PathLike) else s for s in self.sources]
        if isinstance(self.out, os.PathLike):
            self.out = os.fspath(self.out)
        if isinstance(self.tokenizer, os.PathLike):
            self.tokenizer = os.fspath(self.tokenizer)
        self.validate()

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the field and value of any invalid setting."""
        _check_types(self)
        if not self.out:
            raise ConfigError("out is empty: name the output folder (out=... / --out DIR)")
        if self.tokenizer is not None and self.train_tokenizer is not None:
            raise ConfigError(
                f"tokenizer={self.tokenizer!r} and train_tokenizer={self.train_tokenizer} both given: "
                "use an existing tokenizer or train one, not both"
            )
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise ConfigError(f"max_bytes={self.max_bytes} must be a positive number of bytes (or None)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction={self.val_fraction} must be in [0, 1) (typical: 0.01 to 0.05)")
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"num_workers={self.num_workers} must be >= 0 (None: min(4, CPU count))")
        if self.shard_tokens <= 0:
            raise ConfigError(f"shard_tokens={self.shard_tokens} must be a positive number of tokens")
        if not self.jsonl_field:
            raise ConfigError(
                "jsonl_field is empty: name the JSON field that holds the text (default 'text')"
            )


# ---------------------------------------------------------------------------------------------- manifest


@dataclass
class Shard:
    """One token file of a split: its name inside the data folder and how many ids it holds."""

    file: str
    tokens: int


@dataclass
class SplitInfo:
    """A split's size and its shards, in stream order."""

    documents: int = 0
    tokens: int = 0
    shards: list[Shard] = field(default_factory=list)


@dataclass
class Skipped:
    """Inputs left out, grouped per source and reason.

    ``reason``: "binary", "empty", "unreadable" or "bad_record" (a JSONL line that is not a JSON object
    with a string ``jsonl_field``). ``detail`` describes the first case; ``count`` how many there were.
    """

    source: str
    reason: str
    detail: str
    count: int = 1


@dataclass
class Manifest:
    """``manifest.json`` of a prepared data folder; ``root`` is the folder (not stored in the file)."""

    tokenizer: str  # what was asked for: a path, a MODEL name, or "trained:<vocab size>"
    tokenizer_path: str  # the copy inside the folder, relative to it
    vocab_size: int
    dtype: str  # "uint16" or "uint32"
    eos_token_id: int | None
    append_eos: bool
    splits: dict[str, SplitInfo]
    sources: list[dict[str, Any]]  # {"source": pattern or "builtin:stdlib", "files": n}
    skipped: list[Skipped]
    invalid_utf8: list[str]  # sources holding bytes that are not UTF-8 (replaced by U+FFFD)
    bytes_read: int
    max_bytes: int | None
    unread_files: int  # files not read because max_bytes was reached
    val_fraction: float
    seed: int
    jsonl_field: str
    version: int = 1
    root: Path = field(default=Path("."), compare=False)

    @property
    def documents(self) -> int:
        """Documents in both splits."""
        return sum(s.documents for s in self.splits.values())

    def shard_paths(self, split: str = "train") -> list[Path]:
        """The shard files of ``split``, in stream order."""
        if split not in self.splits:
            raise DataError(f"split {split!r} is not in {self.root}; splits: {', '.join(self.splits)}")
        return [self.root / s.file for s in self.splits[split].shards]

    def load_tokenizer(self) -> Tokenizer:
        """The tokenizer the ids belong to (the copy inside the data folder)."""
        return Tokenizer.from_file(self.root / self.tokenizer_path)

    def to_dict(self) -> dict[str, Any]:
        """The manifest as plain JSON types (``root`` left out)."""
        data = dataclasses.asdict(self)
        del data["root"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], root: str | os.PathLike[str] = ".") -> Manifest:
        """The inverse of :meth:`to_dict`."""
        data = dict(data)
        data["splits"] = {
            name: SplitInfo(s["documents"], s["tokens"], [Shard(**sh) for sh in s["shards"]])
            for name, s in data["splits"].items()
        }
        data["skipped"] = [Skipped(**s) for s in data["skipped"]]
        return cls(**data, root=Path(root))

    def save(self, folder: str | os.PathLike[str] | None = None) -> Path:
        """Write ``manifest.json`` into ``folder`` (default: ``root``); returns its path."""
        path = Path(folder if folder is not None else self.root) / MANIFEST
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> Manifest:
        """Read ``folder/manifest.json`` (or the file itself when ``folder`` names it)."""
        path = Path(folder)
        if path.is_dir():
            path = path / MANIFEST
        if not path.is_file():
            raise DataError(
                f"no {MANIFEST} at {str(path)!r}: not a prepared data folder; fix: run "
                "`lamina data prepare ... --out DIR` and pass DIR"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls.from_dict(data, root=path.parent)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(
                f"{str(path)!r} is not a valid lamina data manifest ({e}); prepare it again"
            ) from e

    def skipped_by_reason(self) -> dict[str, int]:
        """How many inputs were skipped for each reason."""
        counts: Counter[str] = Counter()
        for s in self.skipped:
            counts[s.reason] += s.count
        return dict(sorted(counts.items()))

    def split_warning(self) -> str | None:
        """One line when the validation split's share of tokens is far from ``val_fraction`` (off by more
        than a factor 3 either way, or by more than 20 percentage points), else None.

        Documents go wholly to one split, so with few or uneven documents the split is coarse: two input
        files can give more validation tokens than training tokens.
        """
        total = sum(s.tokens for s in self.splits.values())
        val = self.splits["val"] if "val" in self.splits else SplitInfo()
        f = self.val_fraction
        if f <= 0 or total == 0:
            return None
        share = val.tokens / total
        if f / 3 <= share <= 3 * f and abs(share - f) <= 0.2:
            return None
        return (
            f"the validation split holds {share:.1%} of the tokens ({val.documents:,} of {self.documents:,} "
            f"documents), far from val_fraction={f:g}: each document goes wholly to one split; fix: use "
            "more, smaller documents, or another val_fraction (--val-fraction)"
        )

    def summary(self) -> str:
        """A few lines for people: documents, tokens and shards per split, what was skipped, the tokenizer."""
        lines = [f"{_count(self.documents, 'document')} from {_mb(self.bytes_read)} of text -> {self.root}"]
        for name, s in self.splits.items():
            n = len(s.shards)
            lines.append(
                f"  {name + ':':6} {s.documents:>10,} {'document ' if s.documents == 1 else 'documents'}"
                f"{s.tokens:>15,} tokens  ({_count(n, 'shard')})"
            )
        skipped = self.skipped_by_reason()
        lines.append(
            "  skipped: " + (", ".join(f"{n:,} {reason}" for reason, n in skipped.items()) or "nothing")
        )
        if self.invalid_utf8:
            n = len(self.invalid_utf8)
            lines.append(f"  not UTF-8 (bytes replaced by U+FFFD): {_count(n, 'source')}")
        if self.unread_files:
            lines.append(
                f"  max_bytes={self.max_bytes:,} reached: {_count(self.unread_files, 'file')} not read"
            )
        lines.append(
            f"  tokenizer: {self.tokenizer} (vocab {self.vocab_size:,}, {self.dtype}, eos id "
            f"{self.eos_token_id})"
        )
        return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    """``"1 document"``, ``"12,345 documents"``."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 100_000 else f"{n:,} bytes"


# ---------------------------------------------------------------------------------------------- tokenizer


def load_tokenizer(name: str | os.PathLike[str]) -> Tokenizer:
    """A tokenizer by name: a ``tokenizer.json``, a folder holding one, or any MODEL (only its tokenizer
    is read; a GGUF's comes from its metadata, the weights are not loaded). The resolver of
    ``lamina.checkpoint.load.load_tokenizer``, with a not-found message that also offers training one.
    """
    from lamina.checkpoint.load import load_tokenizer as tokenizer_of

    try:
        return tokenizer_of(name)
    except ModelNotFoundError as e:
        raise TokenizerError(
            f"tokenizer {os.fspath(name)!r} not found: it is not a tokenizer.json, a folder holding one, or "
            f"a MODEL ({e}); fix: pass one of those, or train one (train_tokenizer=VOCAB_SIZE / "
            "--train-tokenizer VOCAB_SIZE)"
        ) from e


# ---------------------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class _Item:
    """One input to read: a text file (``end``: bytes to read, None for all) or the JSONL lines that start
    in ``[start, end)``.
    """

    name: str
    path: str
    kind: Literal["text", "jsonl"]
    start: int = 0
    end: int | None = None


@dataclass
class _Plan:
    tasks: list[list[_Item]]
    sources: list[dict[str, Any]]
    total_bytes: int
    unread_files: int


def _expand(pattern: str) -> list[Path]:
    """The files a source names: the file itself, every file under a folder, or the glob's matches."""
    p = Path(pattern).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        return _walk(p)
    if glob.has_magic(pattern):
        files: list[Path] = []
        for match in sorted(glob.glob(os.path.expanduser(pattern), recursive=True)):
            m = Path(match)
            files += [m] if m.is_file() else _walk(m) if m.is_dir() else []
        return files
    return []


def _walk(folder: Path) -> list[Path]:
    """Every file under ``folder`` in sorted order, hidden files and folders left out."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return found


def _plan(cfg: DataConfig) -> _Plan:
    """Expand the sources, apply ``max_bytes``, and group the inputs into tasks for the workers."""
    named: list[tuple[str, Path]] = []
    sources = []
    for pattern in cfg.sources:
        files = _expand(pattern)
        if not files:
            raise DataError(
                f"no input files matched {pattern!r}; fix: check the path, or quote a glob so the shell "
                "does not expand it ('data/**/*.txt')"
            )
        sources.append({"source": pattern, "files": len(files)})
        named += [(str(f), f) for f in files]
    if cfg.builtin == "stdlib":
        files_ = stdlib_files()
        sources.append({"source": "builtin:stdlib", "files": len(files_)})
        named += files_
    seen: set[Path] = set()
    budget = cfg.max_bytes
    items: list[_Item] = []
    unread = 0
    total = 0
    for name, path in named:
        key = path.resolve()
        if key in seen:
            continue
        seen.add(key)
        if budget is not None and budget <= 0:
            unread += 1
            continue
        try:
            size = path.stat().st_size
        except OSError:
            size = 0  # the worker reports it as unreadable
        take = size if budget is None else min(size, budget)
        if path.suffix.lower() in JSONL_SUFFIXES:
            for start in range(0, max(take, 1), JSONL_CHUNK_BYTES):
                items.append(_Item(name, str(path), "jsonl", start, min(start + JSONL_CHUNK_BYTES, take)))
        else:
            items.append(_Item(name, str(path), "text", 0, None if take == size else take))
        total += take
        if budget is not None:
            budget -= take
    tasks: list[list[_Item]] = []
    group: list[_Item] = []
    group_bytes = 0
    for item in items:
        if item.kind == "jsonl":
            tasks.append([item])
            continue
        group.append(item)
        group_bytes += item.end if item.end is not None else _size(item.path)
        if len(group) >= TASK_FILES or group_bytes >= TASK_BYTES:
            tasks.append(group)
            group, group_bytes = [], 0
    if group:
        tasks.append(group)
    return _Plan(tasks, sources, total, unread)


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class _Read:
    """What reading gave besides the documents: skips (per source and reason), sources that were not
    UTF-8, and the bytes read.
    """

    skipped: dict[tuple[str, str], Skipped] = field(default_factory=dict)
    invalid_utf8: list[str] = field(default_factory=list)
    bytes_read: int = 0

    def skip(self, source: str, reason: str, detail: str) -> None:
        key = (source, reason)
        if key in self.skipped:
            self.skipped[key].count += 1
        else:
            self.skipped[key] = Skipped(source, reason, detail)


def _decode(data: bytes) -> tuple[str, bool]:
    """``data`` as text, and whether some bytes were not UTF-8 (those become U+FFFD)."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


def _read_task(items: Sequence[_Item], jsonl_field: str, log: _Read) -> Iterator[str]:
    """The documents of ``items`` in order; everything skipped is recorded in ``log``."""
    for item in items:
        try:
            if item.kind == "text":
                yield from _read_text(item, log)
            else:
                yield from _read_jsonl(item, jsonl_field, log)
        except OSError as e:
            log.skip(item.name, "unreadable", f"{type(e).__name__}: {e.strerror or e}")


def _read_text(item: _Item, log: _Read) -> Iterator[str]:
    with open(item.path, "rb") as f:
        data = f.read() if item.end is None else f.read(item.end)
        if item.end is not None and f.read(1):  # cut by max_bytes: end on a whole line
            data = cut_at_line(data, item.end)
    log.bytes_read += len(data)
    if b"\0" in data[:BINARY_SNIFF_BYTES]:
        log.skip(item.name, "binary", "NUL byte in the first 8 KiB (a binary file, or UTF-16/32 text)")
        return
    text, bad = _decode(data)
    text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not part of the text
    if bad:
        log.invalid_utf8.append(item.name)
    if not text.strip():
        log.skip(item.name, "empty", "no text" if not data else "only whitespace")
        return
    yield text


def _read_jsonl(item: _Item, jsonl_field: str, log: _Read) -> Iterator[str]:
    assert item.end is not None
    bad_utf8 = False
    with open(item.path, "rb") as f:
        if item.start == 0:
            head = f.read(BINARY_SNIFF_BYTES)
            if b"\0" in head:
                log.skip(
                    item.name, "binary", "NUL byte in the first 8 KiB (a binary file, or UTF-16/32 text)"
                )
                return
            f.seek(0)
            pos = 0
        else:  # this chunk owns the lines that start in [start, end)
            f.seek(item.start - 1)
            pos = item.start - 1 + len(f.readline())
        lineno = 0
        content = 0  # lines that are not blank
        while pos < item.end:
            raw = f.readline()
            if not raw:
                break
            where = f"line {lineno + 1}" if item.start == 0 else f"the line at byte {pos}"
            pos += len(raw)
            lineno += 1
            log.bytes_read += len(raw)
            line, bad = _decode(raw)
            bad_utf8 |= bad
            if not line.strip():
                continue
            content += 1
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                log.skip(item.name, "bad_record", f"first at {where}: not valid JSON ({e.msg})")
                continue
            value = record.get(jsonl_field) if isinstance(record, dict) else None
            if not isinstance(value, str):
                if not isinstance(record, dict):
                    what = f"{_JSON_KIND.get(type(record), 'a number')}, not an object"
                elif jsonl_field not in record:  # name the keys it has: the one asked for is most likely one
                    keys = ", ".join(repr(k) for k in list(record)[:8]) or "none"
                    what = f"no {jsonl_field!r} field (its keys: {keys})"
                else:
                    what = f"{jsonl_field!r} is {_JSON_KIND.get(type(value), 'a number')}, not a string"
                log.skip(item.name, "bad_record", f"first at {where}: {what}")
                continue
            if not value.strip():
                log.skip(item.name, "empty", f"first at {where}: {jsonl_field!r} is empty")
                continue
            yield value
    if bad_utf8:
        log.invalid_utf8.append(item.name)
    if item.start == 0 and content == 0:
        log.skip(item.name, "empty", "no text" if pos == 0 else "only blank lines")


# ---------------------------------------------------------------------------------------------- tokenizing


@dataclass
class _TaskResult:
    hashes: list[int]  # per document: keyed 64-bit hash of its text (decides its split)
    lengths: list[int]  # per document: ids written to the part file (eos included)
    log: _Read


_WORKER: dict[str, Any] = {}


def _init_worker(
    tokenizer_json: str,
    parse_special_tokens: bool,
    eos: int | None,
    dtype: str,
    seed: int,
    jsonl_field: str,
    parts: str,
    in_pool: bool,
) -> None:
    """Load the tokenizer once per worker process (from its JSON: cheap, and the same for a MODEL)."""
    from tokenizers import Tokenizer as Backend

    if in_pool:  # one process per core already: no extra tokenizer threads inside each
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    backend = Backend.from_str(tokenizer_json)
    backend.encode_special_tokens = not parse_special_tokens
    _WORKER.update(
        backend=backend,
        eos=eos,
        dtype=np.dtype(dtype),
        key=str(seed).encode(),
        jsonl_field=jsonl_field,
        parts=Path(parts),
    )


def _tokenize_task(job: tuple[int, list[_Item]]) -> _TaskResult:
    """Read, tokenize and hash one task's documents; write their ids to ``parts/NNNNNN.bin``."""
    index, items = job
    w = _WORKER
    log = _Read()
    texts = list(_read_task(items, w["jsonl_field"], log))
    hashes = [
        int.from_bytes(
            hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=8, key=w["key"]).digest(),
            "little",
        )
        for t in texts
    ]
    lengths = []
    if texts:
        encodings = w["backend"].encode_batch(texts, add_special_tokens=False)
        tail = [w["eos"]] if w["eos"] is not None else []
        with open(w["parts"] / f"{index:06d}.bin", "wb") as f:
            for enc in encodings:
                ids = np.asarray(list(enc.ids) + tail, dtype=w["dtype"])
                ids.tofile(f)
                lengths.append(len(ids))
    return _TaskResult(hashes, lengths, log)


def _tokenize_all(
    plan: _Plan, cfg: DataConfig, tok: Tokenizer, dtype: str, parts: Path, progress: bool
) -> list[_TaskResult]:
    """Run every task, in worker processes when ``num_workers > 1``; results in task order."""
    eos = tok.eos_token_id if cfg.append_eos else None
    workers = cfg.num_workers if cfg.num_workers is not None else min(4, os.cpu_count() or 1)
    workers = min(workers, len(plan.tasks))
    args = (tok.backend.to_str(), cfg.parse_special_tokens, eos, dtype, cfg.seed, cfg.jsonl_field, str(parts))
    jobs = list(enumerate(plan.tasks))
    bar = tqdm(
        total=plan.total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress or None
    )
    results: list[_TaskResult] = []
    try:
        if workers <= 1:
            _init_worker(*args, in_pool=False)
            for job in jobs:
                results.append(_tokenize_task(job))
                bar.update(results[-1].log.bytes_read)
        else:
            # fork where the platform has it: a worker starts in milliseconds instead of re-importing
            # lamina and torch (seconds); the tokenizer travels as JSON, so spawn works the same.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
            with ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context(method),
                initializer=_init_worker,
                initargs=(*args, True),
            ) as pool:
                for result in pool.map(_tokenize_task, jobs):
                    results.append(result)
                    bar.update(result.log.bytes_read)
    finally:
        bar.close()
        _WORKER.clear()
    return results


# ---------------------------------------------------------------------------------------------- writing


class _ShardWriter:
    """Appends ids to ``{split}-NNNNN.bin`` files of at most ``shard_tokens`` ids each."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.cap = folder, split, dtype, shard_tokens
        self.shards: list[Shard] = []
        self._file: Any = None
        self.documents = 0

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._file is None or self.shards[-1].tokens == self.cap:
                self._open()
            room = self.cap - self.shards[-1].tokens
            chunk, ids = ids[:room], ids[room:]
            self._file.write(np.ascontiguousarray(chunk, dtype=self.dtype).tobytes())
            self.shards[-1].tokens += len(chunk)

    def _open(self) -> None:
        if self._file is not None:
            self._file.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._file = open(self.folder / name, "wb")  # noqa: SIM115  # closed in _open / close
        self.shards.append(Shard(name, 0))

    def close(self) -> SplitInfo:
        if self._file is not None:
            self._file.close()
        return SplitInfo(self.documents, sum(s.tokens for s in self.shards), self.shards)


def _assign_splits(hashes: np.ndarray, val_fraction: float) -> np.ndarray:
    """True where a document goes to val: its hash is below ``val_fraction`` of the hash range; with two
    or more documents, neither split is left empty.
    """
    is_val = hashes < np.uint64(min(int(val_fraction * 2**64), 2**64 - 1))
    if val_fraction > 0 and len(hashes) >= 2:
        if not is_val.any():
            is_val[int(np.argmin(hashes))] = True
        if is_val.all():
            is_val[int(np.argmax(hashes))] = False
    return is_val


def _write_shards(
    results: list[_TaskResult],
    is_val: np.ndarray,
    parts: Path,
    folder: Path,
    dtype: np.dtype,
    cfg: DataConfig,
    progress: bool,
) -> dict[str, SplitInfo]:
    writers = {split: _ShardWriter(folder, split, dtype, cfg.shard_tokens) for split in SPLITS}
    total = sum(sum(r.lengths) for r in results)
    doc = 0
    with tqdm(total=total, unit="tok", unit_scale=True, desc="writing", disable=not progress or None) as bar:
        for index, result in enumerate(results):
            if not result.lengths:
                continue
            part = parts / f"{index:06d}.bin"
            ids = np.fromfile(part, dtype=dtype)
            start = 0
            for n in result.lengths:
                writer = writers["val" if is_val[doc] else "train"]
                writer.write(ids[start : start + n])
                writer.documents += 1
                start += n
                doc += 1
            bar.update(start)
            part.unlink()
    return {split: w.close() for split, w in writers.items()}


# ---------------------------------------------------------------------------------------------- prepare


def prepare(cfg: DataConfig, progress: bool = True) -> Manifest:
    """Read, tokenize, split and shard the corpus ``cfg`` describes into ``cfg.out``; return its manifest.

    Raises ``DataError`` when a source matches no file, when nothing is left after skipping (the message
    says what was skipped), or when ``out`` exists (unless ``overwrite``); ``TokenizerError`` when the
    tokenizer cannot be found. ``progress``: tqdm bars on a terminal. Prints one warning line on stderr
    when the validation split is far from ``val_fraction`` (see :meth:`Manifest.split_warning`).
    """
    cfg.validate()
    if (
        not cfg.sources and cfg.builtin is None
    ):  # checked here: a run may reuse a prepared folder without inputs
        raise ConfigError(
            "no input: give sources=[files, folders or globs] (the PATHS arguments) or builtin='stdlib'"
        )
    if cfg.tokenizer is None and cfg.train_tokenizer is None:
        raise DataError(
            "no tokenizer: pass tokenizer=... (a tokenizer.json, a folder holding one, or a MODEL; "
            "--tokenizer) or train one on this corpus with train_tokenizer=VOCAB_SIZE (--train-tokenizer)"
        )
    out = Path(cfg.out).expanduser()
    if out.exists() and not (cfg.overwrite or (out.is_dir() and not any(out.iterdir()))):
        raise DataError(
            f"{str(out)!r} already exists; fix: pass overwrite=True (--overwrite) or another folder"
        )
    plan = _plan(cfg)
    tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer is not None else None
    if tok is not None:
        _check_eos(tok, cfg)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()  # beside out: the final rename stays on one file system
    try:
        if tok is None:
            assert cfg.train_tokenizer is not None
            tok = _train_tokenizer(plan, cfg, progress)
            _check_eos(tok, cfg)
        dtype = np.dtype(np.uint16 if tok.vocab_size <= UINT16_VOCAB else np.uint32)
        parts = tmp / "parts"
        parts.mkdir()
        results = _tokenize_all(plan, cfg, tok, dtype.name, parts, progress)
        log = _merge_logs(r.log for r in results)
        hashes = np.array([h for r in results for h in r.hashes], dtype=np.uint64)
        if len(hashes) == 0:
            raise DataError(_empty_corpus_message(plan, log))
        splits = _write_shards(
            results, _assign_splits(hashes, cfg.val_fraction), parts, tmp, dtype, cfg, progress
        )
        parts.rmdir()
        tok.save(tmp / "tokenizer")
        manifest = Manifest(
            tokenizer=cfg.tokenizer if cfg.tokenizer is not None else f"trained:{cfg.train_tokenizer}",
            tokenizer_path="tokenizer",
            vocab_size=tok.vocab_size,
            dtype=dtype.name,
            eos_token_id=tok.eos_token_id,
            append_eos=cfg.append_eos,
            splits=splits,
            sources=plan.sources,
            skipped=list(log.skipped.values()),
            invalid_utf8=log.invalid_utf8,
            bytes_read=log.bytes_read,
            max_bytes=cfg.max_bytes,
            unread_files=plan.unread_files,
            val_fraction=cfg.val_fraction,
            seed=cfg.seed,
            jsonl_field=cfg.jsonl_field,
        )
        manifest.save(tmp)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest.root = out
    if (warning := manifest.split_warning()) is not None:
        print(f"warning: {warning}", file=sys.stderr)
    return manifest


def _check_eos(tok: Tokenizer, cfg: DataConfig) -> None:
    if cfg.append_eos and tok.eos_token_id is None:
        raise TokenizerError(
            f"the tokenizer {cfg.tokenizer!r} has no eos token to put between documents; fix: use one that "
            "has, or pass append_eos=False (--no-append-eos)"
        )


def _train_tokenizer(plan: _Plan, cfg: DataConfig, progress: bool) -> Tokenizer:
    """A byte-level BPE of ``cfg.train_tokenizer`` ids trained on every document (both splits)."""
    assert cfg.train_tokenizer is not None
    log = _Read()
    count = 0

    def texts() -> Iterator[str]:
        nonlocal count
        for items in plan.tasks:
            for text in _read_task(items, cfg.jsonl_field, log):
                count += 1
                yield text

    tok = Tokenizer.train(texts(), vocab_size=cfg.train_tokenizer, kind="bpe", show_progress=progress)
    if count == 0:
        raise DataError(_empty_corpus_message(plan, log))
    return tok


def _merge_logs(logs: Iterable[_Read]) -> _Read:
    merged = _Read()
    for log in logs:
        for s in log.skipped.values():
            key = (s.source, s.reason)
            if key in merged.skipped:
                merged.skipped[key].count += s.count
            else:
                merged.skipped[key] = dataclasses.replace(s)
        merged.invalid_utf8 += [s for s in log.invalid_utf8 if s not in merged.invalid_utf8]
        merged.bytes_read += log.bytes_read
    return merged


def _empty_corpus_message(plan: _Plan, log: _Read) -> str:
    n_files = sum(len(t) for t in plan.tasks)
    if not n_files:
        return "the corpus is empty: no input files (max_bytes reached before the first?)"
    by_reason: dict[str, list[str]] = {}
    for s in log.skipped.values():
        by_reason.setdefault(s.reason, []).append(s.source if s.count == 1 else f"{s.source} x{s.count}")
    what = "; ".join(
        f"{len(names)} {reason} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
        for reason, names in sorted(by_reason.items())
    )
    first = next(iter(log.skipped.values()), None)
    if first is not None and first.detail:  # the first case's own words: which line, which field
        what += f"; {first.source}, {first.detail}"
    return (
        f"the corpus is empty after filtering: no document left in {n_files} input file(s); skipped: "
        f"{what or 'nothing'}; fix: point to text files, or for JSONL choose the field with jsonl_field= "
        "(--jsonl-field)"
    )


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder to ``out``; an existing ``out`` is replaced only after that succeeds."""
    if not out.exists():
        tmp.rename(out)
        return
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    out.rename(old)
    tmp.rename(out)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()
