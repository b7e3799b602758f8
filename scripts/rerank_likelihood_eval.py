"""Recall of ``rerank="likelihood"`` (query likelihood, UPR: Sachan et al. 2022) on the shipped stdlib
questions: the scoring harness behind benchmarks/RESULTS.md's "Reranking by query likelihood" table, the
shipped-code evaluation that table still owes, and the check that the two agree.

    lamina index --builtin stdlib-docs --store /tmp/sd.sqlite        # once: the index (~2 min quiet)
    PYTHONPATH=. python3 scripts/rerank_likelihood_eval.py harness --store /tmp/sd.sqlite --scores s.json
    PYTHONPATH=. python3 scripts/rerank_likelihood_eval.py library --store /tmp/sd.sqlite
    PYTHONPATH=. python3 scripts/rerank_likelihood_eval.py check --store /tmp/sd.sqlite --questions 0,2,14,23

``harness`` (the table's figures): per question, dense's top 50 chunks (``store.search_dense``, deduped
as ``retrieve`` does), their first 30 documents, each through one passage (its first ``chunk`` entry, 600
characters at most), scored by SmolLM2-135M in bf16 as the mean log p(question | ``UPR_PROMPT``) in
right-padded batches of 8 (one forward pass each, no KV cache); then recall@5 over all questions, the
even-numbered ones (where the weight 1.0 was chosen) and the odd ones (held out), for dense, the
likelihood alone and cosine + w x mean log p at several w, and recall@1/@10/MRR@10 for w = 1.0.
``--scores FILE`` keeps the per-question scores (JSON): a second run only re-ranks.

``library``: the code users run, ``evaluate(store, qrels, modes=("dense",),
config=RetrieveConfig(rerank="likelihood"), reranker=lm)`` (``score_continuations``, with a KV cache),
next to dense without the rerank, with recall@5 per half. ``check``: both on ``--questions`` (their
top 5 documents side by side).

Each costs about 6 s of CPU a question (bf16, one thread): ~17 CPU-minutes for the 167 questions.
``--limit N``: the first N questions only (a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

DEPTH = 30  # documents re-scored (RetrieveConfig.rerank_depth's default)
CHUNKS = 50  # dense chunks fetched (RetrieveConfig.candidates' default)
MAX_CHARS = 600  # passage characters shown (rerank_likelihood's max_passage_chars)
WEIGHTS = (0.3, 0.5, 1.0, 1.5)


def candidates(store: Any, emb: Any, question: str) -> tuple[list[str], list[float], list[str]]:
    """Dense's first DEPTH documents: ids, each one's best cosine, and the passage each is scored through."""
    from lamina.rag.retrieve import dedupe, embed_query, rerank_documents

    hits = dedupe(store.search_dense(embed_query(store, question, emb), CHUNKS, None))
    first, passage = rerank_documents(hits, DEPTH)
    docs = list(first)
    return docs, [first[d].score for d in docs], [passage[d].chunk.text[:MAX_CHARS] for d in docs]


def mean_logp(lm: Any, question: str, passages: list[str], batch: int = 8) -> list[float]:
    """Mean log p(question | UPR prompt with each passage): right-padded batches, one forward each."""
    from lamina.rag.retrieve import UPR_PROMPT

    tok = lm.tokenizer
    q = tok.encode(" " + question.strip(), add_special_tokens=False)
    rows = [tok.encode(UPR_PROMPT.format(passage=p), add_special_tokens=False) + q for p in passages]
    out = [0.0] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    with torch.inference_mode():
        for at in range(0, len(order), batch):
            group = order[at : at + batch]
            ids = torch.zeros(len(group), max(len(rows[i]) for i in group), dtype=torch.long)
            for j, i in enumerate(group):
                ids[j, : len(rows[i])] = torch.tensor(rows[i])
            h = lm.model.hidden_states(ids)  # causal: right padding leaves earlier positions as they are
            for j, i in enumerate(group):
                a = len(rows[i]) - len(q)
                logits = lm.model._lm_logits(h[j, a - 1 : len(rows[i]) - 1][None])[0].float()
                lp = logits.log_softmax(-1)[torch.arange(len(q)), torch.tensor(q)]
                out[i] = float(lp.mean())
    return out


def ranked(docs: list[str], scores: list[float]) -> list[str]:
    """``docs`` by ``scores``, best first; ties keep the dense order."""
    return [docs[j] for j in sorted(range(len(docs)), key=lambda j: -scores[j])]


def harness(args: argparse.Namespace, store: Any, qrels: list[Any]) -> None:
    from lamina.checkpoint.load import load
    from lamina.rag.evaluate import recall_at_k, reciprocal_rank

    path = Path(args.scores) if args.scores else None
    rows: list[dict[str, Any]] = json.loads(path.read_text()) if path and path.exists() else []
    rows = rows[: len(qrels)]
    if len(rows) < len(qrels):
        emb, lm = load(store.embedding_model), load("smollm2", weights="bf16")
        cpu = time.process_time()
        for i in range(len(rows), len(qrels)):
            docs, cos, passages = candidates(store, emb, qrels[i].question)
            rows.append({"docs": docs, "cos": cos, "logp": mean_logp(lm, qrels[i].question, passages)})
            if path and (i % 10 == 0 or i == len(qrels) - 1):
                path.write_text(json.dumps(rows))
            print(f"{i + 1}/{len(qrels)} questions, {time.process_time() - cpu:.0f} s of CPU", flush=True)
    halves = {
        "all": range(len(rows)),
        "even (chosen)": range(0, len(rows), 2),
        "odd (held out)": range(1, len(rows), 2),
    }

    def report(name: str, rank: Any) -> list[list[str]]:
        lists = [rank(r) for r in rows]
        cells = [
            sum(recall_at_k(lists[i], qrels[i].relevant, 5) for i in idx) / max(len(idx), 1)
            for idx in halves.values()
        ]
        print(f"{name:44s}" + "".join(f"{c:16.3f}" for c in cells))
        return lists

    print(f"recall@5 over {len(rows)} questions{'':12s}" + "".join(f"{h:>16s}" for h in halves))
    dense = report("dense (cosine)", lambda r: r["docs"])
    report("query likelihood alone", lambda r: ranked(r["docs"], r["logp"]))
    fused: dict[float, list[list[str]]] = {}
    for w in WEIGHTS:
        fused[w] = report(
            f"cosine + {w} x mean log p",
            lambda r, w=w: ranked(r["docs"], [c + w * lp for c, lp in zip(r["cos"], r["logp"], strict=True)]),
        )
    for depth in (10, 20):
        report(
            f"cosine + 1.0 x mean log p, top {depth} re-scored",
            lambda r, n=depth: (
                ranked(r["docs"][:n], [c + lp for c, lp in zip(r["cos"][:n], r["logp"][:n], strict=True)])
                + r["docs"][n:]
            ),
        )

    def rrf(r: dict[str, Any], k: int = 10) -> list[str]:
        by_lp = sorted(range(len(r["docs"])), key=lambda j: -r["logp"][j])
        lp_rank = {j: n for n, j in enumerate(by_lp)}
        return ranked(r["docs"], [1 / (k + j + 1) + 1 / (k + lp_rank[j] + 1) for j in range(len(r["docs"]))])

    report("reciprocal rank fusion of the two, k = 10", rrf)
    for name, lists in (("dense", dense), ("cosine + 1.0 x mean log p", fused[1.0])):
        n = len(rows)
        r1, r10 = (sum(recall_at_k(lists[i], qrels[i].relevant, k) for i in range(n)) / n for k in (1, 10))
        mrr = sum(reciprocal_rank(lists[i][:10], qrels[i].relevant) for i in range(n)) / n
        print(f"{name}: recall@1 {r1:.3f}, recall@10 {r10:.3f}, MRR@10 {mrr:.3f}")
    ceiling = sum(recall_at_k(r["docs"], q.relevant, DEPTH) for r, q in zip(rows, qrels, strict=True))
    print(f"answers in dense's top {DEPTH} documents: {ceiling / len(rows):.3f}")


def library(args: argparse.Namespace, store: Any, qrels: list[Any]) -> None:
    from lamina.checkpoint.load import load
    from lamina.rag.evaluate import evaluate, recall_at_k
    from lamina.rag.retrieve import RetrieveConfig

    emb, lm = load(store.embedding_model), load("smollm2", weights="bf16")
    for name, config in (
        ("dense", RetrieveConfig()),
        ("dense + rerank=likelihood", RetrieveConfig(rerank="likelihood")),
    ):
        wall, cpu = time.perf_counter(), time.process_time()
        report = evaluate(store, qrels, modes=("dense",), config=config, embedder=emb, reranker=lm)
        lists = report.results["dense"].ranked
        halves = [
            sum(recall_at_k(lists[i], qrels[i].relevant, 5) for i in idx) / max(len(idx), 1)
            for idx in (range(0, len(qrels), 2), range(1, len(qrels), 2))
        ]
        print(f"{name}: {len(qrels)} questions, {time.perf_counter() - wall:.0f} s wall, "
              f"{time.process_time() - cpu:.0f} s of CPU, load {os.getloadavg()[0]:.1f}")  # fmt: skip
        print(report.table())
        print(f"recall@5 even (chosen) {halves[0]:.3f}, odd (held out) {halves[1]:.3f}", flush=True)


def check(args: argparse.Namespace, store: Any, qrels: list[Any]) -> None:
    from lamina.checkpoint.load import load
    from lamina.rag.retrieve import RetrieveConfig, retrieve

    emb, lm = load(store.embedding_model), load("smollm2", weights="bf16")
    cfg = RetrieveConfig(k=5, rerank="likelihood")
    same = 0
    for i in args.questions:
        docs, cos, passages = candidates(store, emb, qrels[i].question)
        lp = mean_logp(lm, qrels[i].question, passages)
        want = ranked(docs, [c + cfg.rerank_weight * x for c, x in zip(cos, lp, strict=True)])[:5]
        cpu = time.process_time()
        got = [h.chunk.doc_id for h in retrieve(store, qrels[i].question, cfg, emb, lm)]
        same += got == want
        print(f"question {i}: library {time.process_time() - cpu:.1f} s of CPU, same top 5: {got == want}")
        print(f"  library {got}\n  harness {want}", flush=True)
    print(f"same top 5 (documents and order) on {same} of {len(args.questions)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("harness", "library", "check"))
    p.add_argument("--store", required=True, help="a full `lamina index --builtin stdlib-docs` index")
    p.add_argument("--scores", help="harness: JSON file of the per-question scores (kept, reused)")
    p.add_argument("--limit", type=int, help="the first N questions only")
    p.add_argument("--questions", default="0,2,14,23", help="check: question numbers (qrels order)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args()
    args.questions = [int(x) for x in args.questions.split(",")]
    torch.set_num_threads(args.threads)
    from lamina.rag.evaluate import read_qrels
    from lamina.rag.store import open_store

    qrels = read_qrels("stdlib-docs")[: args.limit]
    store = open_store(args.store)
    try:
        {"harness": harness, "library": library, "check": check}[args.what](args, store, qrels)
    finally:
        store.close()


if __name__ == "__main__":
    main()
