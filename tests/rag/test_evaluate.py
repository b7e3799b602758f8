"""Retrieval metrics on hand-computed rankings, the labeled-set reader, and evaluate() over a store."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from rag_fakes import MemoryStore

from lamina.errors import DataError
from lamina.rag.evaluate import (
    Qrel,
    evaluate,
    ndcg_at_k,
    ranked_documents,
    read_qrels,
    recall_at_k,
    reciprocal_rank,
)
from lamina.rag.types import Chunk, Document


def test_metrics_match_hand_computed_values() -> None:
    ranked, relevant = ["a", "b", "c", "d"], ["c", "x"]
    assert recall_at_k(ranked, relevant, 1) == 0.0
    assert recall_at_k(ranked, relevant, 3) == 0.5  # c found, x never
    assert reciprocal_rank(ranked, relevant) == pytest.approx(1 / 3)
    # DCG@3 = 1/log2(4) = 0.5; IDCG@3 (two relevant) = 1 + 1/log2(3)
    assert ndcg_at_k(ranked, relevant, 3) == pytest.approx(0.5 / (1 + 1 / math.log2(3)))
    assert ndcg_at_k(ranked, relevant, 2) == 0.0
    assert ndcg_at_k(["x", "c"], relevant, 2) == pytest.approx(1.0)
    assert ndcg_at_k(["c", "q", "x"], relevant, 3) == pytest.approx((1 + 0.5) / (1 + 1 / math.log2(3)))
    assert recall_at_k([], relevant, 5) == reciprocal_rank([], relevant) == ndcg_at_k([], relevant, 5) == 0.0


def test_documents_keep_their_best_position() -> None:
    assert ranked_documents(["a", "b", "a", "c", "b"]) == ["a", "b", "c"]


def test_read_qrels_names_the_bad_line(tmp_path: Path) -> None:
    good = tmp_path / "q.jsonl"
    good.write_text('{"question": "why?", "relevant": ["a"]}\n\n{"question": "how?", "relevant": "b"}\n')
    assert read_qrels(good) == [Qrel("why?", ["a"]), Qrel("how?", ["b"])]
    for body, msg in [
        ('{"question": "q", "relevant": ["a"]}\nnot json\n', ":2: not JSON"),
        ('{"relevant": ["a"]}\n', '"question"'),
        ('{"question": "q", "relevant": []}\n', '"relevant"'),
    ]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(body)
        with pytest.raises(DataError, match=msg):
            read_qrels(bad)
    with pytest.raises(DataError, match="cannot read"):
        read_qrels(tmp_path / "absent.jsonl")


def test_evaluate_scores_each_mode_on_the_same_questions() -> None:
    store = MemoryStore("m", 2)
    texts = {"cat": "cats purr and sleep", "dog": "dogs bark loudly", "fish": "fish swim in water"}
    for i, (doc_id, text) in enumerate(texts.items()):
        chunks = [
            Chunk(f"{doc_id}#0", doc_id, text, 0, len(text)),
            Chunk(f"{doc_id}#1", doc_id, text + "!", 0, 5),
        ]
        store.put(Document(doc_id, text, str(i)), chunks, torch.eye(2)[[i % 2, i % 2]])
    qrels = [
        Qrel("which animal will bark", ["dog"]),
        Qrel("what does swim", ["fish"]),
        Qrel("zebra", ["cat"]),
    ]
    report = evaluate(store, qrels, modes=["bm25"], ks=[1, 2])
    r = report.results["bm25"]
    assert r.ranked == [["dog"], ["fish"], []]  # two chunks of a document count once
    assert r.recall == {1: pytest.approx(2 / 3), 2: pytest.approx(2 / 3)}
    assert r.mrr == pytest.approx(2 / 3)
    assert [q.question for q, _ in report.misses("bm25", 2)] == ["zebra"]
    table = report.table()
    assert "recall@1" in table and "MRR@2" in table and "bm25" in table and "0.667" in table
