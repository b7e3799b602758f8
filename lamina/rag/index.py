"""Indexing: sources -> documents -> chunks -> vectors in a store, incrementally and crash-safe.

    summary = lamina.rag.index.update(["docs/"], config=IndexConfig(store="docs.sqlite"))
    summary = lamina.rag.index.update(builtin="stdlib-docs", modules=["csv", "json"])
    print(summary.line())

The store mirrors the sources named in the run: a new document is added, one whose content hash changed is
re-chunked and re-embedded, one no longer among the sources is deleted, and an unchanged one costs no
embedding (llama_index's "re-index everything when one file changes" pain). Chunks are embedded in groups
of about ``commit_chunks``, sorted by length inside a group (little padding), and each document of a group
is written in its own transaction as soon as the group is embedded (a store with ``put_many``, PostgreSQL:
the group's documents in one transaction, one ``COPY``): a process killed at any moment
(SIGKILL included) leaves an index that opens and answers queries with every document written so far, and
running the same command again finishes the job without duplicates (a document is replaced whole).
:func:`build` is :func:`update` (a first run adds everything).

With ``summaries=MODEL`` a chat model writes a short summary of each new or changed document (greedy, the
documents of a group decoded together by one batched engine, :func:`lamina.generate.batch.generate_batch`),
indexed as its own entry: ``chunk_id`` ``"<doc_id>#summary"``, ``kind`` ``"summary"``, the span of the whole
document (``start`` 0, ``end`` its length) and the summary as its text, so a hit on it cites the document.
Unchanged documents keep what they have: adding ``--summaries`` to an existing index summarises only the
documents that change afterwards (index into a new store to summarise everything).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamina.errors import ConfigError
from lamina.rag.chunk import ChunkConfig, Chunker
from lamina.rag.ingest import read_documents
from lamina.rag.types import Chunk, Document, Store

if TYPE_CHECKING:
    from lamina.checkpoint.load import LoadedModel

__all__ = ["BUILTINS", "IndexConfig", "IndexSummary", "build", "default_index", "update"]

log = logging.getLogger("lamina")

BUILTINS = ("stdlib-docs",)  # built-in corpora: --builtin NAME


def default_index() -> Path:
    """Where ``lamina index`` writes and ``lamina ask`` reads when no store is named:
    ``$LAMINA_HOME/index.sqlite`` (``~/.cache/lamina/index.sqlite``)."""
    from lamina.checkpoint.registry import lamina_home

    return lamina_home() / "index.sqlite"


def __getattr__(name: str) -> Any:
    if name == "DEFAULT_INDEX":  # computed when asked, so $LAMINA_HOME set later is honoured
        return default_index()
    raise AttributeError(name)


@dataclass
class IndexConfig:
    """Where an index lives and how documents become vectors."""

    store: str = ""  # SQLite file or postgresql:// URL of the index ("": $LAMINA_HOME/index.sqlite)
    embedding_model: str = "minilm"  # the encoder that embeds chunks (queries must use the same)
    chunk_size: int = ChunkConfig.chunk_size  # most tokens an embedded chunk takes, metadata prefix included
    chunk_overlap: int = ChunkConfig.chunk_overlap  # tokens a chunk repeats from the end of the one before
    batch_size: int = 32  # chunks per embedding forward pass
    commit_chunks: int = 512  # chunks embedded between writes (a crash loses at most this much work)
    text_field: str = "text"  # the JSONL field holding a record's text
    ann_threshold: int = 50_000  # SQLite store: chunks from which dense search uses the HNSW index
    # chat model that writes a summary of each new or changed document, indexed too ("": none)
    summaries: str = ""
    summary_max_new_tokens: int = 96  # most tokens of one summary
    summary_input_tokens: int = 1024  # tokens of a document's start shown to the summary model
    progress: bool = True  # show a progress bar on a terminal

    def __post_init__(self) -> None:
        ChunkConfig(self.chunk_size, self.chunk_overlap)
        if self.batch_size < 1 or self.commit_chunks < 1:
            raise ConfigError(
                f"batch_size={self.batch_size} and commit_chunks={self.commit_chunks} must be >= 1"
            )

    def location(self) -> str:
        """The store's location (the default index when ``store`` is empty)."""
        return self.store or str(default_index())


@dataclass
class IndexSummary:
    """What a run did: documents added/updated/removed/unchanged, chunks embedded (and in the index after
    the run), files skipped by kind, seconds."""

    store: str
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    chunks_embedded: int = 0
    chunks_total: int = 0
    truncated: int = 0
    summaries: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def line(self) -> str:
        """One line for the terminal."""
        docs = self.added + self.updated + self.unchanged
        skipped = ", ".join(f"{n} {kind}" for kind, n in sorted(self.skipped.items())) or "none"
        return (
            f"indexed {docs:,} documents into {self.store}: {self.added:,} added, {self.updated:,} updated, "
            f"{self.removed:,} removed, {self.unchanged:,} unchanged; {self.chunks_embedded:,} chunks embedded "
            f"({self.chunks_total:,} in the index"
            + (f", {self.summaries:,} summaries written" if self.summaries else "")
            + f"); skipped: {skipped}; {self.seconds:.1f} s"
        )


def sources(
    paths: Sequence[str | os.PathLike[str]] = (),
    builtin: str | None = None,
    modules: Sequence[str] | None = None,
    text_field: str = "text",
) -> tuple[list[Document], Counter[str]]:
    """The documents of ``paths`` and of the ``builtin`` corpus (``modules``: a subset of stdlib-docs),
    and the files skipped by kind. Raises ``ConfigError`` for an unknown builtin or no source at all."""
    if not paths and builtin is None:
        raise ConfigError("name what to index: folders, files or globs, or --builtin stdlib-docs")
    if builtin is not None and builtin not in BUILTINS:
        raise ConfigError(
            f"--builtin {builtin!r} is not a built-in corpus; choose one of {', '.join(BUILTINS)}"
        )
    if modules and builtin is None:
        raise ConfigError("--modules picks modules of a built-in corpus: add --builtin stdlib-docs")
    docs: list[Document] = []
    skipped: Counter[str] = Counter()
    if paths:
        found = read_documents(paths, text_field=text_field)
        docs, skipped = found.documents, found.skipped
    if builtin == "stdlib-docs":
        from lamina.rag.stdlib_docs import stdlib_documents

        docs += stdlib_documents(modules)
    ids = Counter(d.doc_id for d in docs)
    clash = [i for i, n in ids.items() if n > 1]
    if clash:
        raise ConfigError(f"two sources give the document id {clash[0]!r}; index them into separate stores")
    return docs, skipped


def update(
    paths: Sequence[str | os.PathLike[str]] = (),
    *,
    builtin: str | None = None,
    modules: Sequence[str] | None = None,
    documents: Sequence[Document] = (),
    config: IndexConfig | None = None,
    embedder: LoadedModel | None = None,
    store: Store | None = None,
    summarizer: LoadedModel | None = None,
) -> IndexSummary:
    """Bring the index up to date with ``paths``, the ``builtin`` corpus and ``documents`` (made in
    Python); returns what it did.

    ``embedder``: the loaded embedding model (None: ``lamina.load(config.embedding_model)``); ``store``: an
    open store (None: ``config.location()``, created when new); ``summarizer``: the loaded chat model that
    writes document summaries (None: ``config.summaries`` loaded when set, else no summaries). Raises ``ConfigError`` when the store was
    built with another embedding model (naming both), ``DataError`` for a path that matches nothing.
    """
    config = config or IndexConfig()
    started = time.perf_counter()
    docs, skipped = (
        sources(paths, builtin, modules, config.text_field) if paths or builtin else ([], Counter())
    )
    docs = [*docs, *documents]
    if not docs and not documents and not paths and builtin is None:
        raise ConfigError("name what to index: folders, files or globs, or --builtin stdlib-docs")
    if len({d.doc_id for d in docs}) < len(docs):
        raise ConfigError("two documents have the same doc_id; give each its own")
    if embedder is None:
        from lamina.checkpoint.load import load

        embedder = load(config.embedding_model)
    from lamina.embeddings import embedding_config

    emb_config = embedding_config(embedder)
    max_len = min(
        emb_config.max_seq_len or embedder.model.config.max_seq_len, embedder.model.config.max_seq_len
    )
    if embedder.tokenizer is None:
        raise ConfigError(f"embedding model {config.embedding_model!r} has no tokenizer")
    chunker = Chunker(embedder.tokenizer, config.chunk_size, config.chunk_overlap, max_seq_len=max_len)
    if summarizer is None and config.summaries:
        from lamina.checkpoint.load import load as load_model

        summarizer = load_model(config.summaries)
    owned = store is None
    if store is None:
        from lamina.rag.store import is_postgres, open_store

        location = config.location()
        if not is_postgres(location):
            Path(location).parent.mkdir(parents=True, exist_ok=True)
        options = {} if is_postgres(location) else {"ann_threshold": config.ann_threshold}
        store = open_store(
            location,
            config.embedding_model,
            embedder.model.config.d_model * len(emb_config.pooling),
            **options,
        )
    summary = IndexSummary(config.location() if owned else getattr(store, "path", "store"), skipped=skipped)
    try:
        _apply(store, docs, chunker, embedder, emb_config, config, summary, summarizer)
        optimize = getattr(store, "optimize", None)
        if optimize is not None:
            optimize()
        summary.chunks_total = store.count()
    finally:
        if owned:
            store.close()
    summary.seconds = time.perf_counter() - started
    return summary


build = update


def _apply(
    store: Store,
    docs: list[Document],
    chunker: Chunker,
    embedder: LoadedModel,
    emb_config: Any,
    config: IndexConfig,
    summary: IndexSummary,
    summarizer: LoadedModel | None = None,
) -> None:
    from lamina.embeddings import embed_texts

    have = store.documents()
    wanted = {d.doc_id for d in docs}
    for doc_id in sorted(set(have) - wanted):
        store.delete(doc_id)
        summary.removed += 1
    todo: list[tuple[Document, list[Chunk]]] = []
    for d in docs:
        if have.get(d.doc_id) == d.content_hash:
            summary.unchanged += 1
            continue
        todo.append((d, chunker.chunk(d)))
    total = sum(len(c) for _, c in todo)
    bar = _progress(total, config.progress)
    try:
        group: list[tuple[Document, list[Chunk]]] = []
        size = 0
        for item in [*todo, None]:
            if item is not None:
                group.append(item)
                size += len(item[1])
                if size < config.commit_chunks:
                    continue
            if not group:
                break
            if summarizer is not None:
                group = _summarized(summarizer, group, config)
                summary.summaries += sum(1 for _, chunks in group if chunks and chunks[-1].kind == "summary")
            texts = [chunker.embedded_text(c) for _, chunks in group for c in chunks]
            result = embed_texts(
                embedder, texts, batch_size=config.batch_size, config=emb_config, truncate=True
            )
            summary.truncated += len(result.truncated)
            summary.chunks_embedded += len(texts)
            at, items = 0, []
            for doc, chunks in group:
                items.append((doc, chunks, result.vectors[at : at + len(chunks)]))
                at += len(chunks)
            put_many = getattr(store, "put_many", None)  # PostgreSQL: the group in one transaction and COPY
            if put_many is not None:
                put_many(items)
            else:
                for doc, chunks, vectors in items:
                    store.put(doc, chunks, vectors)
            for doc, _ in group:
                if doc.doc_id in have:
                    summary.updated += 1
                else:
                    summary.added += 1
            if bar is not None:
                bar.update(len(texts))
            group, size = [], 0
    finally:
        if bar is not None:
            bar.close()
    if summary.truncated:
        log.warning("%d chunks were cut to the embedding model's max_seq_len", summary.truncated)


SUMMARY_PROMPT = (
    "Summarize the following document in two or three sentences: what it is about and what a reader can "
    "find in it.\n\nTitle: {title}\n\n{text}"
)


def _summarized(
    lm: LoadedModel, group: list[tuple[Document, list[Chunk]]], config: IndexConfig
) -> list[tuple[Document, list[Chunk]]]:
    """The group with a summary entry added to each document (one batched, greedy generation run)."""
    from lamina.generate.batch import generate_batch

    if lm.tokenizer is None:
        raise ConfigError(f"summary model {config.summaries!r} has no tokenizer")
    requests = []
    for doc, _ in group:
        enc = lm.tokenizer.backend.encode(doc.text, add_special_tokens=False)
        cut = (
            len(doc.text)
            if len(enc.ids) <= config.summary_input_tokens
            else enc.offsets[config.summary_input_tokens - 1][1]
        )
        prompt = SUMMARY_PROMPT.format(title=doc.metadata.get("title", doc.doc_id), text=doc.text[:cut])
        requests.append({"messages": [{"role": "user", "content": prompt}]})
    rows = generate_batch(
        lm, requests, chat=True, max_new_tokens=config.summary_max_new_tokens, temperature=0.0,
        labels=[d.doc_id for d, _ in group],
    )  # fmt: skip
    out = []
    for (doc, chunks), row in zip(group, rows, strict=True):
        text = str(row["text"]).strip()
        if text:
            meta = {
                "path": doc.metadata.get("path", doc.doc_id),
                "title": doc.metadata.get("title", doc.doc_id),
            }
            chunks = [
                *chunks,
                Chunk(f"{doc.doc_id}#summary", doc.doc_id, text, 0, len(doc.text), meta, "summary"),
            ]
        out.append((doc, chunks))
    return out


def _progress(total: int, enabled: bool) -> Any:
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total, unit="chunk", desc="embedding", file=sys.stderr, disable=None, dynamic_ncols=True
    )
