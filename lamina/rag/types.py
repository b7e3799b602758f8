"""The nouns of retrieval, shared by ingestion, stores, retrieval and synthesis.

Data flows one way: files -> :class:`Document` -> :class:`Chunk` (+ its vector) -> a :class:`Store` ->
:class:`Hit` lists (dense, BM25, fused) -> an answer citing hits. Stores implement :class:`Store`; the
embedded default is one SQLite file, the scale-out one PostgreSQL with pgvector. Retrieval and synthesis
see only this interface, so both stores pass the same tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor


@dataclass
class Document:
    """One source document: ``doc_id`` is stable across runs (a path relative to the indexed root, or a
    qualified name such as ``csv.DictReader`` for the built-in stdlib docs); ``content_hash`` (sha256 of
    the text) decides re-embedding; ``metadata`` holds ``path``, ``title`` and kind-specific keys
    (``pages``: list of (start_char, page_number) for PDFs)."""

    doc_id: str
    text: str
    content_hash: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Chunk:
    """A passage of a document: ``text`` is ``document.text[start:end]`` (character offsets, so a
    citation maps back to its span), ``chunk_id`` is ``f"{doc_id}#{index}"``; ``metadata`` holds the
    document's ``path``/``title`` and the chunk's ``headings`` (Markdown) and ``page`` (PDF), where known.
    ``kind`` is ``"chunk"``, ``"summary"`` (an LLM-written document summary indexed as its own entry) or
    ``"lead"`` (a document's summary paragraph indexed again on its own, :meth:`lamina.rag.chunk.Chunker.chunk`)."""

    chunk_id: str
    doc_id: str
    text: str
    start: int
    end: int
    metadata: dict[str, Any] = field(default_factory=dict)
    kind: str = "chunk"


@dataclass
class Hit:
    """A retrieved chunk with its score (cosine similarity for dense, BM25 for text, the reciprocal rank
    fusion score for hybrid: higher is better in all three) and its 1-based rank in its list."""

    chunk: Chunk
    score: float
    rank: int


FILTERS_HELP = (
    "metadata filters: {key: value} keeps chunks whose metadata[key] equals value, {key: [v1, v2]} any of "
    "them; the keys doc_id (exact id or list of ids), doc_id_prefix (ids starting with it) and kind "
    "(chunk, summary or lead) match the chunk's own fields; several keys must all match"
)


def matches(chunk: Chunk, filters: dict[str, Any] | None) -> bool:
    """Whether ``chunk`` passes ``filters`` (the meaning every store implements, see :data:`FILTERS_HELP`):
    ``{"path": "a.md"}`` equality on a metadata key, ``{"path": ["a.md", "b.md"]}`` any of the values,
    ``doc_id`` (exact, or a list), ``doc_id_prefix`` (``"csv."``) and ``kind`` on the chunk's fields."""
    for key, want in (filters or {}).items():
        if key == "doc_id_prefix":
            if not chunk.doc_id.startswith(str(want)):
                return False
            continue
        have = chunk.doc_id if key == "doc_id" else chunk.kind if key == "kind" else chunk.metadata.get(key)
        if have not in (want if isinstance(want, (list, tuple, set)) else [want]):
            return False
    return True


class Store(Protocol):
    """What every index store does. Writes are transactional: a document's chunks and vectors are
    replaced in one transaction, so a crash leaves the last committed state. ``filters`` in the searches
    mean what :func:`matches` says (:data:`FILTERS_HELP`). Stores are opened with
    ``lamina.rag.store.open_store(path_or_url, embedding_model)``."""

    embedding_model: str  # the name of the model that made the vectors; queries must use the same
    dim: int  # vector size

    def documents(self) -> dict[str, str]:
        """doc_id -> content_hash of every indexed document."""
        ...

    def put(self, doc: Document, chunks: list[Chunk], vectors: Tensor) -> None:
        """Replace ``doc``'s entries by ``chunks`` with their ``vectors`` (N, dim) float32 unit length."""
        ...

    def delete(self, doc_id: str) -> None:
        """Remove a document and its chunks (no error when absent)."""
        ...

    def search_dense(self, query: Tensor, k: int, filters: dict[str, Any] | None = None) -> list[Hit]:
        """The ``k`` chunks nearest ``query`` (dim,) by cosine similarity, best first."""
        ...

    def search_text(self, query: str, k: int, filters: dict[str, Any] | None = None) -> list[Hit]:
        """The ``k`` best chunks for ``query`` by BM25 full-text search, best first."""
        ...

    def get(self, chunk_ids: list[str]) -> list[Chunk]:
        """The chunks with these ids, in this order."""
        ...

    def count(self) -> int:
        """Number of chunks (summaries included)."""
        ...

    def close(self) -> None: ...
