"""Retrieval evaluation on a labeled set: recall@k, MRR and nDCG@k for dense, BM25 and hybrid side by side.

A labeled set ("qrels") is a JSONL file, one question per line with the ids of the documents that answer
it: ``{"question": "How do I ...?", "relevant": ["csv.DictReader"]}``. lamina ships one for the built-in
``stdlib-docs`` corpus (:data:`STDLIB_QRELS`): questions written by hand that say what an object does in
other words than its docstring and without its name.

Evaluation is at the document level: a question's retrieved chunks become the list of their documents,
each kept at its first (best) position. With relevance binary (a document is relevant or not), for a
question with relevant set R and ranked documents d_1, d_2, ...:

- recall@k = |R ∩ {d_1..d_k}| / |R|
- reciprocal rank = 1 / (position of the first relevant document), 0 when none is retrieved within the
  evaluated depth; MRR is its mean (Voorhees, TREC-8 QA track, 1999)
- nDCG@k = DCG@k / IDCG@k with DCG@k = sum_{i<=k, d_i in R} 1 / log2(i + 1) and IDCG@k the DCG of a ranking
  with every relevant document first (Järvelin & Kekäläinen, 2002)

Each metric is the mean over questions.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from lamina.data.rows import iter_jsonl
from lamina.errors import ConfigError, DataError
from lamina.rag.retrieve import MODES, RetrieveConfig, retrieve
from lamina.rag.types import Store

if TYPE_CHECKING:
    from lamina.checkpoint.load import LoadedModel

STDLIB_QRELS = Path(__file__).parent / "data" / "stdlib_qrels.jsonl"
QRELS_ALIASES = {"stdlib-docs": STDLIB_QRELS}  # --qrels stdlib-docs: the labeled set shipped with lamina


@dataclass
class Qrel:
    """One labeled question: the documents in ``relevant`` answer it."""

    question: str
    relevant: list[str]


def read_qrels(path: str | os.PathLike[str]) -> list[Qrel]:
    """The labeled questions of a JSONL file (``stdlib-docs``: the set lamina ships). Raises ``DataError``
    naming the line for a line that is not JSON or lacks ``question`` / a non-empty ``relevant`` list."""
    path = QRELS_ALIASES.get(str(path), Path(path))
    try:
        rows = list(iter_jsonl(path, lambda n, e: DataError(f"{path}:{n}: not JSON ({e.msg})")))
    except OSError as e:
        raise DataError(f"cannot read the labeled set {path}: {e.strerror or e}") from None
    out = []
    for n, row in rows:
        q, rel = (row.get("question"), row.get("relevant")) if isinstance(row, dict) else (None, None)
        if not isinstance(q, str) or not q.strip():
            raise DataError(f'{path}:{n}: needs "question": a non-empty string')
        if isinstance(rel, str):
            rel = [rel]
        if not isinstance(rel, list) or not rel or not all(isinstance(r, str) for r in rel):
            raise DataError(f'{path}:{n}: needs "relevant": a non-empty list of document ids')
        out.append(Qrel(q, rel))
    if not out:
        raise DataError(f"{path} holds no questions")
    return out


def recall_at_k(ranked: Sequence[str], relevant: Sequence[str], k: int) -> float:
    """|relevant ∩ ranked[:k]| / |relevant|."""
    rel = set(relevant)
    return len(rel & set(ranked[:k])) / len(rel) if rel else 0.0


def reciprocal_rank(ranked: Sequence[str], relevant: Sequence[str]) -> float:
    """1 / the 1-based position of the first relevant id in ``ranked``; 0 when there is none."""
    rel = set(relevant)
    return next((1.0 / (i + 1) for i, d in enumerate(ranked) if d in rel), 0.0)


def ndcg_at_k(ranked: Sequence[str], relevant: Sequence[str], k: int) -> float:
    """Binary-relevance nDCG@k: sum_{i<=k, ranked[i] relevant} 1/log2(i+1) over the same sum for the ideal
    ranking (min(|relevant|, k) relevant documents first)."""
    rel = set(relevant)
    dcg = sum(1.0 / math.log2(i + 2) for i, d in enumerate(ranked[:k]) if d in rel)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(len(rel), k)))
    return dcg / ideal if ideal else 0.0


def ranked_documents(doc_ids: Sequence[str]) -> list[str]:
    """Document ids in order of first appearance (a document's best chunk gives its position)."""
    return list(dict.fromkeys(doc_ids))


@dataclass
class ModeResult:
    """One retrieval mode's metrics (means over the questions) and each question's ranked documents."""

    mode: str
    recall: dict[int, float]
    mrr: float
    ndcg: dict[int, float]
    ranked: list[list[str]] = field(default_factory=list)


@dataclass
class EvalReport:
    """Every mode's results on the same questions, with the cutoffs ``ks`` and the evaluated ``depth``."""

    qrels: list[Qrel]
    results: dict[str, ModeResult]
    ks: tuple[int, ...]
    depth: int

    def table(self) -> str:
        """The metrics as a text table, one row per mode."""
        heads = [f"recall@{k}" for k in self.ks] + [f"MRR@{self.depth}"] + [f"nDCG@{k}" for k in self.ks]
        lines = [f"{'mode':8}" + "".join(f"{h:>11}" for h in heads)]
        for r in self.results.values():
            cells = [r.recall[k] for k in self.ks] + [r.mrr] + [r.ndcg[k] for k in self.ks]
            lines.append(f"{r.mode:8}" + "".join(f"{c:11.3f}" for c in cells))
        return "\n".join(lines)

    def misses(self, mode: str, k: int) -> list[tuple[Qrel, list[str]]]:
        """The questions whose relevant documents are all outside ``mode``'s top ``k``, with that top k."""
        r = self.results[mode]
        return [
            (q, d[:k]) for q, d in zip(self.qrels, r.ranked, strict=True) if not set(q.relevant) & set(d[:k])
        ]


def evaluate(
    store: Store,
    qrels: list[Qrel],
    modes: Sequence[str] = MODES,
    ks: Sequence[int] = (1, 5, 10),
    config: RetrieveConfig | None = None,
    embedder: LoadedModel | None = None,
    reranker: LoadedModel | None = None,
) -> EvalReport:
    """Retrieve every question of ``qrels`` from ``store`` in each of ``modes`` and score the rankings.

    ``config`` gives the other retrieval settings (``rrf_k``, ``candidates``, ``filters``); each question
    retrieves ``candidates`` chunks, ranked as documents, evaluated to depth ``max(ks)`` (MRR too).
    ``embedder``: the store's embedding model, loaded (None: loaded once from the name the store holds).
    ``reranker``: the chat model that reranks every mode when ``config.rerank`` is set.
    Raises ``ConfigError`` for an unknown mode and as :func:`~lamina.rag.retrieve.retrieve` does.
    """
    from lamina.checkpoint.load import load

    base = config or RetrieveConfig()
    ks = tuple(sorted(set(ks)))
    depth = max(ks)
    chunks = max(base.candidates, depth)
    if embedder is None and any(m != "bm25" for m in modes):
        embedder = load(store.embedding_model)
    results = {}
    for mode in modes:
        cfg = replace(base, mode=mode, k=chunks, candidates=chunks)  # type: ignore[arg-type]
        ranked = [
            ranked_documents([h.chunk.doc_id for h in retrieve(store, q.question, cfg, embedder, reranker)])[
                :depth
            ]
            for q in qrels
        ]
        n = len(qrels)
        results[mode] = ModeResult(
            mode,
            {
                k: sum(recall_at_k(d, q.relevant, k) for d, q in zip(ranked, qrels, strict=True)) / n
                for k in ks
            },
            sum(reciprocal_rank(d, q.relevant) for d, q in zip(ranked, qrels, strict=True)) / n,
            {k: sum(ndcg_at_k(d, q.relevant, k) for d, q in zip(ranked, qrels, strict=True)) / n for k in ks},
            ranked,
        )
    return EvalReport(qrels, results, ks, depth)


def main(args: argparse.Namespace) -> int:
    """``lamina index eval [--qrels FILE] [--store FILE]``: the metrics table of dense, BM25 and hybrid on
    the labeled questions (``--qrels``: default the stdlib-docs set lamina ships), then how many questions
    each mode misses in its top 5. ``args`` are the ``index`` verb's (``lamina.cli.index``)."""
    from lamina.cli.flags import values
    from lamina.fields import build
    from lamina.rag.ask import _open
    from lamina.rag.index import IndexConfig

    if len(args.paths) > 1:
        raise ConfigError(
            f"`lamina index eval` takes no PATH (got {' '.join(args.paths[1:])}); name the index with --store"
        )
    config = build(IndexConfig, values(args, IndexConfig))
    qrels = read_qrels(args.qrels or "stdlib-docs")
    store, _ = _open(config.store or None)
    try:
        report = evaluate(store, qrels)
        chunks = store.count()
    finally:
        store.close()
    print(
        f"{len(qrels)} questions, {chunks:,} chunks in {config.location()}; documents ranked to depth {report.depth}"
    )
    print(report.table())
    k = 5 if 5 in report.ks else report.depth
    print(
        "missed in the top "
        + str(k)
        + ": "
        + ", ".join(f"{m} {len(report.misses(m, k))}" for m in report.results)
    )
    return 0
