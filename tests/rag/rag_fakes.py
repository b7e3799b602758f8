"""An in-memory store for retrieval and synthesis tests (the :class:`lamina.rag.types.Store` protocol):
exact cosine search over the vectors given to ``put``, and a plain term-overlap "BM25" (tf-idf with BM25's
saturation) so the tests need no database. Import as ``from rag_fakes import MemoryStore``."""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from typing import Any

import torch
from torch import Tensor

from lamina.rag.types import Chunk, Document, Hit, matches

_WORD = re.compile(r"\w+")


class MemoryStore:
    def __init__(self, embedding_model: str = "minilm", dim: int = 384) -> None:
        self.embedding_model, self.dim = embedding_model, dim
        self.chunks: dict[str, Chunk] = {}
        self.vectors: dict[str, Tensor] = {}
        self.hashes: dict[str, str] = {}
        self.dense_calls: list[int] = []
        self.text_calls: list[int] = []

    def documents(self) -> dict[str, str]:
        return dict(self.hashes)

    def put(self, doc: Document, chunks: list[Chunk], vectors: Tensor) -> None:
        self.delete(doc.doc_id)
        self.hashes[doc.doc_id] = doc.content_hash
        for c, v in zip(chunks, vectors, strict=True):
            self.chunks[c.chunk_id], self.vectors[c.chunk_id] = c, v

    def delete(self, doc_id: str) -> None:
        self.hashes.pop(doc_id, None)
        for cid in [c for c, ch in self.chunks.items() if ch.doc_id == doc_id]:
            del self.chunks[cid], self.vectors[cid]

    def search_dense(self, query: Tensor, k: int, filters: dict[str, Any] | None = None) -> list[Hit]:
        self.dense_calls.append(k)
        ids = [c for c in self.chunks if matches(self.chunks[c], filters)]
        scores = [float(self.vectors[c] @ query) for c in ids]
        order = sorted(range(len(ids)), key=lambda i: -scores[i])[:k]
        return [Hit(self.chunks[ids[i]], scores[i], r + 1) for r, i in enumerate(order)]

    def search_text(self, query: str, k: int, filters: dict[str, Any] | None = None) -> list[Hit]:
        self.text_calls.append(k)
        terms = set(_WORD.findall(query.lower()))
        docs = {
            c: Counter(_WORD.findall(ch.text.lower()))
            for c, ch in self.chunks.items()
            if matches(ch, filters) and ch.kind != "lead"  # as the stores: leads are for dense search
        }
        n = len(docs) or 1
        scored = []
        for c, tf in docs.items():
            s = 0.0
            for t in terms & tf.keys():
                df = sum(1 for d in docs.values() if t in d)
                s += math.log(1 + (n - df + 0.5) / (df + 0.5)) * tf[t] * 2.2 / (tf[t] + 1.2)
            if s > 0:
                scored.append((s, c))
        scored.sort(key=lambda t: -t[0])
        return [Hit(self.chunks[c], s, r + 1) for r, (s, c) in enumerate(scored[:k])]

    def get(self, chunk_ids: list[str]) -> list[Chunk]:
        return [self.chunks[c] for c in chunk_ids]

    def count(self) -> int:
        return len(self.chunks)

    def close(self) -> None:
        pass


def memory_store(lm: Any, texts: dict[str, str], name: str = "minilm") -> MemoryStore:
    """A store holding one chunk per document ``doc_id -> text``, embedded with ``lm``."""
    from lamina.embeddings import embed

    store = MemoryStore(name, lm.model.config.d_model)
    ids = list(texts)
    vectors = embed(lm, [texts[i] for i in ids], truncate=True)
    for i, doc_id in enumerate(ids):
        text = texts[doc_id]
        doc = Document(doc_id, text, str(hash(text)), {"path": doc_id, "title": doc_id})
        chunk = Chunk(f"{doc_id}#0", doc_id, text, 0, len(text), {"path": doc_id, "title": doc_id})
        store.put(doc, [chunk], vectors[i : i + 1])
    return store


def hit(chunk_id: str, score: float = 1.0, rank: int = 1, text: str | None = None) -> Hit:
    """A hit on chunk ``doc#i`` (text defaults to the id)."""
    doc_id = chunk_id.split("#")[0]
    body = chunk_id if text is None else text
    return Hit(Chunk(chunk_id, doc_id, body, 0, len(body), {"title": doc_id}), score, rank)


def unit(v: list[float]) -> Tensor:
    t = torch.tensor(v, dtype=torch.float32)
    return t / t.norm()


SUBSET = ("csv", "json", "heapq", "textwrap")  # the stdlib-docs modules the small test indexes hold


@functools.cache
def stdlib_corpus() -> dict[str, Document]:
    """doc_id -> document of the whole stdlib-docs corpus (built once per test process, a few seconds)."""
    from lamina.rag.stdlib_docs import stdlib_documents

    return {d.doc_id: d for d in stdlib_documents()}


def stdlib_subset() -> dict[str, str]:
    """doc_id -> text of the stdlib-docs documents of the modules in :data:`SUBSET`."""
    return {
        i: d.text for i, d in stdlib_corpus().items() if str(d.metadata.get("module")).split(".")[0] in SUBSET
    }


def build_sqlite_index(lm: Any, path: Any, texts: dict[str, str] | None = None) -> None:
    """A SQLite index at ``path`` of ``texts`` (default: :func:`stdlib_subset`) chunked and embedded as
    ``lamina index`` does it (Chunker, MiniLM, SqliteStore), recorded under the model name ``minilm``."""
    from lamina.embeddings import embed
    from lamina.rag.chunk import Chunker
    from lamina.rag.store_sqlite import SqliteStore

    texts = stdlib_subset() if texts is None else texts
    chunker = Chunker(lm.tokenizer, max_seq_len=lm.model.config.max_seq_len)
    docs = [Document(i, t, str(hash(t)), {"path": i, "title": i}) for i, t in texts.items()]
    chunks = [chunker.chunk(d) for d in docs]
    vectors = embed(lm, [chunker.embedded_text(c) for cs in chunks for c in cs], batch_size=64)
    store = SqliteStore(path, "minilm", lm.model.config.d_model)
    try:
        at = 0
        for doc, cs in zip(docs, chunks, strict=True):
            if cs:
                store.put(doc, cs, vectors[at : at + len(cs)])
                at += len(cs)
    finally:
        store.close()
