"""The embedded default store: one SQLite file holding documents, chunks, metadata, an FTS5 index for BM25
and the vectors (float32 blobs).

    store = SqliteStore("docs.lamina.sqlite", embedding_model="minilm", dim=384)
    store.put(doc, chunks, vectors)             # one transaction per document
    store.search_dense(query_vector, k=5)       # exact cosine (torch matmul), or HNSW past ann_threshold
    store.search_text("read csv header", k=5)   # FTS5 BM25 (porter stemming)

- Crash safety: the database is in WAL mode and every :meth:`put`/:meth:`delete` is one transaction, so a
  process killed at any moment leaves the last committed documents, each with all of its chunks.
- Dense search: the vectors are read once into an (N, dim) float32 matrix and cached; a write by this
  object, or a commit by any other connection (``PRAGMA data_version``), invalidates the cache. Past
  ``ann_threshold`` chunks an approximate HNSW index (`usearch <https://github.com/unum-cloud/usearch>`_,
  cosine) answers unfiltered queries; it is built once, kept up to date by this object's writes (added and
  removed keys), and saved next to the database (``<file>.usearch``) with the write generation it matches,
  so a later open loads it instead of rebuilding; a stale file (another writer, a crash) is rebuilt.
  Filtered dense queries are exact over the chunks that pass the filters.
- The store records ``embedding_model`` and ``dim`` when created; opening it with another model raises
  ``ConfigError`` naming both.
- Filters: see :func:`lamina.rag.types.matches` (done in SQL with ``json_extract`` on the metadata).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lamina.errors import ConfigError, DataError
from lamina.rag.types import Chunk, Document, Hit

__all__ = ["SCHEMA_VERSION", "SqliteStore", "check_model", "fts_query"]

SCHEMA_VERSION = "1"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    doc_id TEXT PRIMARY KEY, content_hash TEXT NOT NULL, metadata TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY, chunk_id TEXT NOT NULL UNIQUE, doc_id TEXT NOT NULL, text TEXT NOT NULL,
    start INTEGER NOT NULL, "end" INTEGER NOT NULL, metadata TEXT NOT NULL, kind TEXT NOT NULL,
    vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks (doc_id);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5 (text, tokenize = 'porter unicode61');
"""
_WORD = re.compile(r"\w+", re.UNICODE)


def fts_query(text: str) -> str:
    """A full-text query that cannot be a syntax error: each word of ``text`` quoted, joined by OR
    (BM25 ranks chunks that hold more and rarer words first)."""
    return " OR ".join(f'"{w}"' for w in dict.fromkeys(_WORD.findall(text.lower())))


def check_model(where: str, stored: str, stored_dim: int, model: str | None, dim: int | None) -> None:
    """Refuse a store built with another embedding model (or vector size), naming both."""
    if model is not None and model != stored:
        raise ConfigError(
            f"the index {where} was built with embedding model {stored!r}, not {model!r}: query it with "
            f"--embedding-model {stored}, or rebuild it with {model!r} into another store"
        )
    if dim is not None and dim != stored_dim:
        raise ConfigError(f"the index {where} holds {stored_dim}-dim vectors, not {dim}; rebuild it")


class SqliteStore:
    """A :class:`~lamina.rag.types.Store` in one SQLite file (created when missing).

    Raises ``ConfigError`` when the file was built with another ``embedding_model``/``dim``, or when a new
    file is created without them; ``DataError`` when the file is not a lamina index.

    Args:
        path: the database file
        embedding_model: the name of the model that makes the vectors (None: the stored one)
        dim: the vector size (None: the stored one)
        ann_threshold: chunks from which unfiltered dense search uses the approximate (HNSW) index
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        embedding_model: str | None = None,
        dim: int | None = None,
        ann_threshold: int = 50_000,
    ) -> None:
        self.path = Path(path)
        self.ann_threshold = ann_threshold
        exists = self.path.exists() and self.path.stat().st_size > 0
        try:
            self.db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as e:
            raise DataError(
                f"{self.path} is not a lamina index (SQLite says: {e}); pass another --store"
            ) from None
        if exists and "meta" not in tables:
            raise DataError(f"{self.path} is an SQLite file but not a lamina index; pass another --store")
        self.db.executescript(_SCHEMA)
        meta = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        if "embedding_model" in meta:
            check_model(str(self.path), meta["embedding_model"], int(meta["dim"]), embedding_model, dim)
            self.embedding_model, self.dim = meta["embedding_model"], int(meta["dim"])
        else:
            if embedding_model is None or dim is None:
                raise ConfigError(f"{self.path} is a new index: name its embedding_model and dim")
            self.embedding_model, self.dim = embedding_model, dim
            with self._transaction():
                self.db.executemany(
                    "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                    [
                        ("embedding_model", embedding_model),
                        ("dim", str(dim)),
                        ("schema_version", SCHEMA_VERSION),
                        ("generation", "0"),
                    ],
                )
        self._matrix: Tensor | None = None  # (N, dim) float32, rows in id order
        self._ids: Tensor | None = None  # (N,) int64 chunk row ids, ascending
        self._seen_version: int | None = None
        self._ann: Any = None  # usearch.index.Index over row ids, when built
        self._ann_dirty = False

    # ------------------------------------------------------------------ writes
    def _transaction(self) -> _Tx:
        return _Tx(self.db)

    def documents(self) -> dict[str, str]:
        """doc_id -> content_hash of every indexed document."""
        return dict(self.db.execute("SELECT doc_id, content_hash FROM documents").fetchall())

    def put(self, doc: Document, chunks: list[Chunk], vectors: Tensor) -> None:
        """Replace ``doc``'s entries by ``chunks`` and their ``vectors`` (N, dim) in one transaction.

        Raises ``ConfigError`` when the vectors do not match the chunks or the store's ``dim``."""
        if (
            vectors.ndim != 2
            or vectors.shape[0] != len(chunks)
            or (len(chunks) and vectors.shape[1] != self.dim)
        ):
            raise ConfigError(
                f"{len(chunks)} chunks need vectors of shape ({len(chunks)}, {self.dim}), got {tuple(vectors.shape)}"
            )
        blobs = vectors.detach().to(torch.float32).cpu().contiguous().numpy()
        with self._transaction():
            removed = self._delete(doc.doc_id)
            self.db.execute(
                "INSERT INTO documents VALUES (?, ?, ?)",
                (doc.doc_id, doc.content_hash, json.dumps(doc.metadata, sort_keys=True)),
            )
            added = []
            for c, v in zip(chunks, blobs, strict=True):
                cur = self.db.execute(
                    'INSERT INTO chunks (chunk_id, doc_id, text, start, "end", metadata, kind, vector) '
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        c.chunk_id,
                        c.doc_id,
                        c.text,
                        c.start,
                        c.end,
                        json.dumps(c.metadata),
                        c.kind,
                        v.tobytes(),
                    ),
                )
                rowid = int(cur.lastrowid or 0)
                if c.kind != "lead":  # its words are in the chunk that holds it: BM25 counts them once
                    self.db.execute("INSERT INTO chunks_fts (rowid, text) VALUES (?, ?)", (rowid, c.text))
                added.append(rowid)
            self._bump()
        self._update_ann(removed, added, blobs)

    def delete(self, doc_id: str) -> None:
        """Remove a document and its chunks (no error when absent), in one transaction."""
        with self._transaction():
            removed = self._delete(doc_id)
            self._bump()
        self._update_ann(removed, [], None)

    def _delete(self, doc_id: str) -> list[int]:
        rows = [r[0] for r in self.db.execute("SELECT id FROM chunks WHERE doc_id = ?", (doc_id,))]
        self.db.executemany("DELETE FROM chunks_fts WHERE rowid = ?", [(r,) for r in rows])
        self.db.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
        self.db.execute("DELETE FROM documents WHERE doc_id = ?", (doc_id,))
        return rows

    def _bump(self) -> None:
        self.db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
        self._matrix = None

    def _generation(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row[0]) if row else 0

    # ------------------------------------------------------------------ reads
    def count(self) -> int:
        """Number of chunks (summaries included)."""
        return int(self.db.execute("SELECT count(*) FROM chunks").fetchone()[0])

    def get(self, chunk_ids: list[str]) -> list[Chunk]:
        """The chunks with these ids, in this order. Raises ``KeyError`` for an id not in the store."""
        found: dict[str, Chunk] = {}
        for start in range(0, len(chunk_ids), 500):
            part = chunk_ids[start : start + 500]
            marks = ",".join("?" * len(part))
            for row in self.db.execute(f"SELECT {_COLS} FROM chunks WHERE chunk_id IN ({marks})", part):
                found[row[0]] = _chunk(row)
        missing = [c for c in chunk_ids if c not in found]
        if missing:
            raise KeyError(f"chunks not in the index: {missing[:5]}")
        return [found[c] for c in chunk_ids]

    def _by_rowid(self, rowids: list[int]) -> dict[int, Chunk]:
        out: dict[int, Chunk] = {}
        for start in range(0, len(rowids), 500):
            part = rowids[start : start + 500]
            marks = ",".join("?" * len(part))
            for row in self.db.execute(f"SELECT {_COLS}, id FROM chunks WHERE id IN ({marks})", part):
                out[row[-1]] = _chunk(row)
        return out

    def search_text(self, query: str, k: int, filters: dict[str, Any] | None = None) -> list[Hit]:
        """The ``k`` best chunks for ``query`` by FTS5's BM25 (score: -bm25, higher is better); ``lead``
        entries are not in the full-text index (their words are in the chunk that holds them)."""
        match = fts_query(query)
        if not match or k < 1:
            return []
        where, params = _where(filters)
        rows = self.db.execute(
            "SELECT c.id, -bm25(chunks_fts) AS score FROM chunks_fts JOIN chunks c ON c.id = chunks_fts.rowid "
            f"WHERE chunks_fts MATCH ? {'AND ' + where if where else ''} ORDER BY score DESC, c.id LIMIT ?",
            [match, *params, k],
        ).fetchall()
        chunks = self._by_rowid([r[0] for r in rows])
        return [Hit(chunks[r[0]], float(r[1]), i + 1) for i, r in enumerate(rows)]

    def search_dense(self, query: Tensor, k: int, filters: dict[str, Any] | None = None) -> list[Hit]:
        """The ``k`` chunks nearest ``query`` (dim,) by cosine similarity, best first: exact (a matmul over
        the cached matrix), or the HNSW index for unfiltered queries past ``ann_threshold`` chunks."""
        q = query.detach().to(torch.float32).reshape(-1).cpu()
        if q.shape[0] != self.dim:
            raise ConfigError(
                f"the query vector has {q.shape[0]} dims; this index holds {self.dim}-dim vectors"
            )
        matrix, ids = self._vectors()
        if k < 1 or len(ids) == 0:
            return []
        if filters:
            where, params = _where(filters)
            keep = torch.tensor(
                [r[0] for r in self.db.execute(f"SELECT id FROM chunks c WHERE {where}", params)]
            )
            if len(keep) == 0:
                return []
            rows = torch.searchsorted(ids, keep)
            scores = matrix[rows] @ q
            top = torch.topk(scores, min(k, len(rows)))
            picked = [(int(keep[i]), float(s)) for s, i in zip(top.values, top.indices, strict=True)]
        elif len(ids) >= self.ann_threshold:
            picked = self._ann_search(q, k)
        else:
            top = torch.topk(matrix @ q, min(k, len(ids)))
            picked = [(int(ids[i]), float(s)) for s, i in zip(top.values, top.indices, strict=True)]
        chunks = self._by_rowid([p[0] for p in picked])
        return [Hit(chunks[r], s, i + 1) for i, (r, s) in enumerate(picked) if r in chunks]

    def _vectors(self) -> tuple[Tensor, Tensor]:
        """The cached (N, dim) matrix and its row ids, reloaded when the database changed."""
        version = int(self.db.execute("PRAGMA data_version").fetchone()[0])
        if self._matrix is None or self._ids is None or version != self._seen_version:
            ids, blobs = [], []
            for rowid, blob in self.db.execute("SELECT id, vector FROM chunks ORDER BY id"):
                ids.append(rowid)
                blobs.append(blob)
            data = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(ids), self.dim)
            self._matrix = torch.from_numpy(data.copy())
            self._ids = torch.tensor(ids, dtype=torch.long)
            if self._seen_version is not None and version != self._seen_version:
                self._ann = None  # another connection wrote: the in-memory HNSW index may be stale
            self._seen_version = version
        return self._matrix, self._ids

    # ------------------------------------------------------------------ approximate index
    def optimize(self) -> None:
        """Build (or load) the HNSW index now when the store is past ``ann_threshold`` and save it, so the
        first query after indexing does not pay for it. Nothing to do below the threshold."""
        if self.count() >= self.ann_threshold:
            if self._ann is None:
                self._ann = self._load_or_build_ann()
            self._save_ann()

    def _ann_file(self) -> Path:
        return self.path.with_name(self.path.name + ".usearch")

    def _ann_search(self, q: Tensor, k: int) -> list[tuple[int, float]]:
        if self._ann is None:
            self._ann = self._load_or_build_ann()
        found = self._ann.search(q.numpy(), k)
        return [(int(key), 1.0 - float(d)) for key, d in zip(found.keys, found.distances, strict=True)]

    def _load_or_build_ann(self) -> Any:
        try:
            from usearch.index import Index
        except ImportError:
            raise ConfigError(
                f"this index has {self.count()} chunks, past ann_threshold={self.ann_threshold}: approximate "
                "search needs usearch (pip install 'lamina[rag]'), or raise ann_threshold to search exactly"
            ) from None
        index = Index(
            ndim=self.dim, metric="cos", dtype="f32", connectivity=16, expansion_add=128, expansion_search=96
        )
        stamp = self._ann_file().with_suffix(".usearch.json")
        generation = self._generation()
        if self._ann_file().exists() and stamp.exists():
            try:
                if json.loads(stamp.read_text()).get("generation") == generation:
                    index.load(str(self._ann_file()))
                    return index
            except (OSError, ValueError, RuntimeError):
                pass  # unreadable: rebuild
        matrix, ids = self._vectors()
        index.add(ids.numpy(), matrix.numpy())
        self._ann_dirty = True
        return index

    def _update_ann(self, removed: list[int], added: list[int], vectors: np.ndarray | None) -> None:
        if self._ann is None:
            return
        for r in removed:
            self._ann.remove(r)
        if added and vectors is not None:
            self._ann.add(np.array(added, dtype=np.int64), vectors)
        self._ann_dirty = True

    def close(self) -> None:
        """Save the HNSW index when this object built or changed it, then close the database."""
        self._save_ann()
        self.db.close()

    def _save_ann(self) -> None:
        if self._ann is not None and self._ann_dirty:
            stamp = self._ann_file().with_suffix(".usearch.json")
            tmp = self._ann_file().with_name(self._ann_file().name + ".tmp")
            self._ann.save(str(tmp))
            os.replace(tmp, self._ann_file())
            stamp.write_text(json.dumps({"generation": self._generation()}))
            self._ann_dirty = False

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_COLS = 'chunk_id, doc_id, text, start, "end", metadata, kind'


def _chunk(row: tuple[Any, ...]) -> Chunk:
    return Chunk(row[0], row[1], row[2], int(row[3]), int(row[4]), json.loads(row[5]), row[6])


def _where(filters: dict[str, Any] | None) -> tuple[str, list[Any]]:
    """SQL conditions on the ``chunks c`` table for ``filters`` (:func:`lamina.rag.types.matches`)."""
    parts: list[str] = []
    params: list[Any] = []
    for key, want in (filters or {}).items():
        if key == "doc_id_prefix":
            parts.append("substr(c.doc_id, 1, ?) = ?")
            params += [len(str(want)), str(want)]
            continue
        values = list(want) if isinstance(want, (list, tuple, set)) else [want]
        if not values:
            parts.append("0")
            continue
        if key in ("doc_id", "kind"):
            column = f"c.{key}"
        else:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
                raise ConfigError(f"filter key {key!r}: use letters, digits, _ . - only")
            column = f"json_extract(c.metadata, '$.\"{key}\"')"
        parts.append(f"{column} IN ({','.join('?' * len(values))})")
        params += [int(v) if isinstance(v, bool) else v for v in values]
    return " AND ".join(parts), params


class _Tx:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on an error."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
