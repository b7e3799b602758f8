"""The scale-out store: PostgreSQL with the pgvector extension, for indexes that outgrow one machine or
are shared by several servers (``lamina index ... --store postgresql://user@host/db``).

Tables ``<table>_meta``, ``<table>_documents`` and ``<table>_chunks`` (``table`` defaults to ``lamina``,
so several indexes can share a database). Chunks hold their ``vector(dim)`` with an HNSW index
(``vector_cosine_ops``) and a generated ``tsvector`` (English configuration, GIN index) for full-text
search ranked by ``ts_rank`` (term frequency with length normalisation; PostgreSQL has no BM25, so text
scores are on another scale than SQLite's and only their order means the same). Every :meth:`put` and
:meth:`delete` is one transaction (:meth:`put_many`: one for several documents). The GIN and HNSW indexes are
built by :meth:`optimize` when missing (``lamina index`` calls it at the end of every run), so a new index
is loaded first and indexed once; later updates maintain them row by row. Unfiltered dense queries use the
HNSW index (approximate, ``ef_search``) once it exists; filtered ones scan exactly, as in the SQLite store. Filters: :func:`lamina.rag.types.matches`, on
``jsonb`` metadata. Needs ``psycopg`` 3 (the ``rag`` extra) and a server where ``CREATE EXTENSION vector``
works (pgvector installed).
"""

from __future__ import annotations

import json
import re
import struct
from typing import Any

import torch
from torch import Tensor

from lamina.errors import ConfigError, DataError
from lamina.rag.store_sqlite import check_model
from lamina.rag.types import Chunk, Document, Hit

__all__ = ["PgStore"]

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_COLS = 'chunk_id, doc_id, text, start, "end", metadata, kind'


def _connect(url: str) -> Any:
    try:
        import psycopg
    except ImportError:
        raise ConfigError("a postgresql:// store needs psycopg 3: pip install 'lamina[rag]'") from None
    try:
        return psycopg.connect(url, autocommit=True)
    except psycopg.OperationalError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot connect to the PostgreSQL store {_safe(url)}: {first}") from None


def _safe(url: str) -> str:
    """The URL without its password."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


class PgStore:
    """A :class:`~lamina.rag.types.Store` in PostgreSQL + pgvector (tables created when missing).

    Raises ``ConfigError`` when the index was built with another ``embedding_model``/``dim`` (naming
    both), or a new one is created without them; ``DataError`` when the server cannot be reached.

    Args:
        url: ``postgresql://user[:password]@host[:port]/database``
        embedding_model: the name of the model that makes the vectors (None: the stored one)
        dim: the vector size (None: the stored one)
        table: the prefix of the index's tables
        ef_search: HNSW candidates per query (pgvector's ``hnsw.ef_search``; higher: better recall, slower)
    """

    def __init__(
        self,
        url: str,
        embedding_model: str | None = None,
        dim: int | None = None,
        table: str = "lamina",
        ef_search: int = 100,
    ) -> None:
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,40}", table):
            raise ConfigError(f"table={table!r}: use lowercase letters, digits and _ (a SQL name)")
        self.url, self.t, self.ef_search = url, table, ef_search
        self.db = _connect(url)
        self.db.execute("CREATE EXTENSION IF NOT EXISTS vector")
        self.db.execute(
            f"CREATE TABLE IF NOT EXISTS {table}_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
        )
        meta = dict(self.db.execute(f"SELECT key, value FROM {table}_meta").fetchall())
        where = f"{_safe(url)} (table {table})"
        if "embedding_model" in meta:
            check_model(where, meta["embedding_model"], int(meta["dim"]), embedding_model, dim)
            self.embedding_model, self.dim = meta["embedding_model"], int(meta["dim"])
            return
        if embedding_model is None or dim is None:
            raise ConfigError(f"{where} is a new index: name its embedding_model and dim")
        self.embedding_model, self.dim = embedding_model, dim
        with self.db.transaction():
            self.db.execute(
                f"CREATE TABLE IF NOT EXISTS {table}_documents "
                "(doc_id TEXT PRIMARY KEY, content_hash TEXT NOT NULL, metadata JSONB NOT NULL)"
            )
            self.db.execute(
                f"CREATE TABLE IF NOT EXISTS {table}_chunks (id BIGSERIAL PRIMARY KEY, chunk_id TEXT NOT NULL UNIQUE, "
                'doc_id TEXT NOT NULL, text TEXT NOT NULL, start INTEGER NOT NULL, "end" INTEGER NOT NULL, '
                f"metadata JSONB NOT NULL, kind TEXT NOT NULL, embedding vector({dim}) NOT NULL, "
                "tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED)"
            )
            self.db.execute(f"CREATE INDEX IF NOT EXISTS {table}_chunks_doc ON {table}_chunks (doc_id)")
            self.db.execute(
                f"INSERT INTO {table}_meta VALUES ('embedding_model', %s), ('dim', %s), ('schema_version', '1')",
                (embedding_model, str(dim)),
            )

    @staticmethod
    def drop(url: str, table: str = "lamina") -> None:
        """Delete the index ``table`` from the database (its three tables), if there."""
        db = _connect(url)
        try:
            for suffix in ("chunks", "documents", "meta"):
                db.execute(f"DROP TABLE IF EXISTS {table}_{suffix}")
        finally:
            db.close()

    def documents(self) -> dict[str, str]:
        """doc_id -> content_hash of every indexed document."""
        return dict(self.db.execute(f"SELECT doc_id, content_hash FROM {self.t}_documents").fetchall())

    def put(self, doc: Document, chunks: list[Chunk], vectors: Tensor) -> None:
        """Replace ``doc``'s entries by ``chunks`` and their ``vectors`` (N, dim) in one transaction."""
        self.put_many([(doc, chunks, vectors)])

    def put_many(self, items: list[tuple[Document, list[Chunk], Tensor]]) -> None:
        """:meth:`put` for several documents in one transaction (all of them or none): their old entries
        deleted by one statement, the chunks written by one ``COPY``. Raises ``ConfigError`` for vectors
        of the wrong shape, before anything is written."""
        for doc, chunks, vectors in items:
            if (
                vectors.ndim != 2
                or vectors.shape[0] != len(chunks)
                or (len(chunks) and vectors.shape[1] != self.dim)
            ):
                raise ConfigError(
                    f"{doc.doc_id}: {len(chunks)} chunks need vectors of shape ({len(chunks)}, {self.dim}), "
                    f"got {tuple(vectors.shape)}"
                )
        if not items:
            return
        ids = [doc.doc_id for doc, _, _ in items]
        with self.db.transaction(), self.db.cursor() as cur:
            cur.execute(f"DELETE FROM {self.t}_chunks WHERE doc_id = ANY(%s)", (ids,))
            cur.execute(f"DELETE FROM {self.t}_documents WHERE doc_id = ANY(%s)", (ids,))
            cur.executemany(
                f"INSERT INTO {self.t}_documents VALUES (%s, %s, %s)",
                [(d.doc_id, d.content_hash, json.dumps(d.metadata, sort_keys=True)) for d, _, _ in items],
            )
            # binary COPY: a vector goes as pgvector's own binary form (vector_recv: uint16 dim, uint16 0,
            # dim big-endian float32), sent through psycopg's pass-through bytea dumper; formatting 384
            # floats as text cost ~0.2 ms a row in Python
            with cur.copy(
                f'COPY {self.t}_chunks (chunk_id, doc_id, text, start, "end", metadata, kind, embedding) '
                "FROM STDIN (FORMAT BINARY)"
            ) as copy:
                copy.set_types(["text", "text", "text", "int4", "int4", "jsonb", "text", "bytea"])
                head = struct.pack(">HH", self.dim, 0)
                for _, chunks, vectors in items:
                    rows = vectors.detach().to(torch.float32).cpu().numpy().astype(">f4")
                    for c, v in zip(chunks, rows, strict=True):
                        copy.write_row(
                            (
                                c.chunk_id,
                                c.doc_id,
                                c.text,
                                c.start,
                                c.end,
                                c.metadata,
                                c.kind,
                                head + v.tobytes(),
                            )
                        )

    def delete(self, doc_id: str) -> None:
        """Remove a document and its chunks (no error when absent), in one transaction."""
        with self.db.transaction(), self.db.cursor() as cur:
            self._delete(cur, doc_id)

    def _delete(self, cur: Any, doc_id: str) -> None:
        cur.execute(f"DELETE FROM {self.t}_chunks WHERE doc_id = %s", (doc_id,))
        cur.execute(f"DELETE FROM {self.t}_documents WHERE doc_id = %s", (doc_id,))

    def count(self) -> int:
        """Number of chunks (summaries included)."""
        return int(self.db.execute(f"SELECT count(*) FROM {self.t}_chunks").fetchone()[0])

    def get(self, chunk_ids: list[str]) -> list[Chunk]:
        """The chunks with these ids, in this order. Raises ``KeyError`` for an id not in the store."""
        rows = self.db.execute(f"SELECT {_COLS} FROM {self.t}_chunks WHERE chunk_id = ANY(%s)", (chunk_ids,))
        found = {r[0]: _chunk(r) for r in rows}
        missing = [c for c in chunk_ids if c not in found]
        if missing:
            raise KeyError(f"chunks not in the index: {missing[:5]}")
        return [found[c] for c in chunk_ids]

    def search_dense(self, query: Tensor, k: int, filters: dict[str, Any] | None = None) -> list[Hit]:
        """The ``k`` chunks nearest ``query`` (dim,) by cosine similarity, best first (HNSW when
        unfiltered, an exact scan when filtered)."""
        q = query.detach().to(torch.float32).reshape(-1).cpu()
        if q.shape[0] != self.dim:
            raise ConfigError(
                f"the query vector has {q.shape[0]} dims; this index holds {self.dim}-dim vectors"
            )
        if k < 1:
            return []
        where, params = _where(filters)
        vec = _vector(q.tolist())
        with self.db.transaction(), self.db.cursor() as cur:
            cur.execute(f"SET LOCAL hnsw.ef_search = {max(int(self.ef_search), k)}")
            if filters:
                cur.execute("SET LOCAL enable_indexscan = off")  # exact over the chunks that pass
            cur.execute(
                f"SELECT {_COLS}, 1 - (embedding <=> %s::vector) FROM {self.t}_chunks c "
                f"{'WHERE ' + where if where else ''} ORDER BY embedding <=> %s::vector LIMIT %s",
                [vec, *params, vec, k],
            )
            rows = cur.fetchall()
        return [Hit(_chunk(r), float(r[-1]), i + 1) for i, r in enumerate(rows)]

    def search_text(self, query: str, k: int, filters: dict[str, Any] | None = None) -> list[Hit]:
        """The ``k`` best chunks for ``query`` by PostgreSQL full-text search (any of its words, English
        stemming and stop words), ranked by ``ts_rank`` (higher is better); ``lead`` entries are left out
        (their words are in the chunk that holds them)."""
        words = list(dict.fromkeys(_WORD.findall(query.lower())))
        if not words or k < 1:
            return []
        where, params = _where(filters)
        rows = self.db.execute(
            f"WITH q AS (SELECT to_tsquery('english', %s) AS q) SELECT {_COLS}, ts_rank(tsv, q.q, 1) AS score "
            f"FROM {self.t}_chunks c, q WHERE tsv @@ q.q AND kind <> 'lead' {'AND ' + where if where else ''} "
            "ORDER BY score DESC, c.id LIMIT %s",
            [" | ".join(words), *params, k],
        ).fetchall()
        return [Hit(_chunk(r), float(r[-1]), i + 1) for i, r in enumerate(rows)]

    def optimize(self) -> None:
        """Build the full-text (GIN) and vector (HNSW, ``vector_cosine_ops``) indexes when missing, then
        refresh the planner's statistics (``ANALYZE``). A new index gets them here, after its first load
        (``lamina index`` calls this at the end of every run): pgvector builds an HNSW graph over loaded
        rows far faster than it inserts rows one at a time into an existing graph (pgvector's README:
        "faster to create an index after loading your initial data"), in ``maintenance_work_mem``, raised
        to 512 MB for the build when the server's is lower (about 2 KB per 384-dim vector: 250k vectors).
        Until then, and after a crash mid-load, searches scan exactly (the same results, slower)."""
        t = self.t
        with self.db.transaction():
            memory = self.db.execute(
                "SELECT setting::bigint FROM pg_settings WHERE name = 'maintenance_work_mem'"
            )
            if int(memory.fetchone()[0]) < 512 * 1024:  # in kB
                self.db.execute("SET LOCAL maintenance_work_mem = '512MB'")
            self.db.execute(f"CREATE INDEX IF NOT EXISTS {t}_chunks_tsv ON {t}_chunks USING gin (tsv)")
            self.db.execute(
                f"CREATE INDEX IF NOT EXISTS {t}_chunks_hnsw ON {t}_chunks USING hnsw (embedding vector_cosine_ops)"
            )
        for suffix in ("chunks", "documents"):
            self.db.execute(f"ANALYZE {t}_{suffix}")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> PgStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _vector(values: list[float]) -> str:
    return "[" + ",".join(f"{x:.8g}" for x in values) + "]"


def _chunk(row: tuple[Any, ...]) -> Chunk:
    meta = row[5] if isinstance(row[5], dict) else json.loads(row[5])
    return Chunk(row[0], row[1], row[2], int(row[3]), int(row[4]), meta, row[6])


def _where(filters: dict[str, Any] | None) -> tuple[str, list[Any]]:
    """SQL conditions on ``chunks c`` for ``filters`` (:func:`lamina.rag.types.matches`)."""
    parts: list[str] = []
    params: list[Any] = []
    for key, want in (filters or {}).items():
        if key == "doc_id_prefix":
            parts.append("left(c.doc_id, %s) = %s")
            params += [len(str(want)), str(want)]
            continue
        values = list(want) if isinstance(want, (list, tuple, set)) else [want]
        if key in ("doc_id", "kind"):
            parts.append(f"c.{key} = ANY(%s)")
            params.append([str(v) for v in values])
        else:  # jsonb equality on the key: 1 matches 1, "en" matches "en", true matches true
            parts.append("(c.metadata -> %s) = ANY(%s::jsonb[])")
            params += [key, [json.dumps(v) for v in values]]
    return " AND ".join(parts), params
