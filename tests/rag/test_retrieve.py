"""Retrieval: reciprocal rank fusion and dedup on hand-computed lists; dense / BM25 / hybrid over an
in-memory store of real stdlib docs embedded with MiniLM; thresholds, filters, the embedding-model check."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from rag_fakes import MemoryStore, hit, memory_store, stdlib_subset
from tiny_chat import tiny_lm

from lamina.errors import ConfigError
from lamina.rag.retrieve import RetrieveConfig, convex_fusion, dedupe, reciprocal_rank_fusion, retrieve


def test_rrf_matches_the_hand_computed_scores() -> None:
    dense = [hit("a#0"), hit("b#0"), hit("c#0")]
    text = [hit("c#0"), hit("a#0"), hit("d#0")]
    fused = reciprocal_rank_fusion([dense, text], rrf_k=60)
    assert [h.chunk.chunk_id for h in fused] == ["a#0", "c#0", "b#0", "d#0"]
    expected = [1 / 61 + 1 / 62, 1 / 63 + 1 / 61, 1 / 62, 1 / 63]
    assert [h.score for h in fused] == pytest.approx(expected)
    assert [h.rank for h in fused] == [1, 2, 3, 4]


def test_rrf_k_changes_the_order_when_ranks_disagree() -> None:
    # x is first in one list only; y is second and third: a small rrf_k favours the single first place,
    # rrf_k = 60 favours agreement between the lists
    one = [hit("x#0"), hit("y#0")]
    two = [hit("z#0"), hit("w#0"), hit("y#0")]
    assert reciprocal_rank_fusion([one, two], rrf_k=0)[0].chunk.chunk_id == "x#0"  # 1 > 1/2 + 1/3
    assert reciprocal_rank_fusion([one, two], rrf_k=60)[0].chunk.chunk_id == "y#0"  # 1/62 + 1/63 > 1/61


def test_dedupe_drops_repeated_ids_and_repeated_text_of_a_document() -> None:
    hits = [hit("a#0", text="same"), hit("a#0"), hit("a#1", text="same"), hit("b#0", text="same"), hit("c#0")]
    out = dedupe(hits)
    assert [h.chunk.chunk_id for h in out] == ["a#0", "b#0", "c#0"]
    assert [h.rank for h in out] == [1, 2, 3]


def test_dedupe_drops_a_passage_inside_an_earlier_one_of_its_document() -> None:
    whole = hit("a#0", text="sig\n\nlead text\n\nmore")
    lead = hit("a#lead", text="lead text")
    lead.chunk.start, lead.chunk.end, lead.chunk.kind = 5, 14, "lead"
    whole.chunk.start, whole.chunk.end = 0, 20
    assert [h.chunk.chunk_id for h in dedupe([whole, lead, hit("b#0")])] == ["a#0", "b#0"]
    # the lead first: the longer chunk after it still adds text, so both stay
    assert [h.chunk.chunk_id for h in dedupe([lead, whole])] == ["a#lead", "a#0"]


def test_rrf_counts_a_chunk_once_per_list() -> None:
    fused = reciprocal_rank_fusion([[hit("a#0"), hit("a#0"), hit("b#0")]], rrf_k=60)
    assert [h.score for h in fused] == pytest.approx([1 / 61, 1 / 62])


def test_convex_fusion_matches_the_hand_computed_scores() -> None:
    dense = [hit("a#0", 0.9), hit("b#0", 0.5), hit("c#0", 0.45)]
    text = [hit("c#0", 10.0), hit("d#0", 2.0)]  # d: found by BM25 alone, takes dense's lowest cosine
    fused = convex_fusion(dense, text, text_weight=0.1)
    assert [h.chunk.chunk_id for h in fused] == ["a#0", "c#0", "b#0", "d#0"]
    assert [h.score for h in fused] == pytest.approx([0.9, 0.45 + 0.1, 0.5, 0.45 + 0.1 * 2 / 10])
    assert [h.rank for h in fused] == [1, 2, 3, 4]
    assert [h.chunk.chunk_id for h in convex_fusion(dense, text, 0.0)][:3] == ["a#0", "b#0", "c#0"]


def test_convex_fusion_scores_a_chunk_by_its_documents_best_bm25() -> None:
    # BM25 matched a's long chunk; its lead entry (not in full-text search) was dense's second
    lead, body = hit("a#lead", 0.58), hit("a#0", 0.30, text="signature, lead and details")
    lead.chunk.start, lead.chunk.end = 40, 46
    body.chunk.start, body.chunk.end = 100, 127
    fused = convex_fusion([hit("x#0", 0.6), lead, body], [body], text_weight=0.1)
    assert [h.chunk.chunk_id for h in fused] == ["a#lead", "x#0", "a#0"]
    assert fused[0].score == pytest.approx(0.68)


@pytest.fixture(scope="module")
def store(lamina_minilm: Any) -> MemoryStore:
    return memory_store(lamina_minilm, stdlib_subset())


@pytest.mark.parametrize("mode", ["dense", "bm25", "hybrid"])
def test_each_mode_finds_the_documented_function(store: MemoryStore, lamina_minilm: Any, mode: str) -> None:
    cfg = RetrieveConfig(mode=mode, k=5)  # type: ignore[arg-type]
    hits = retrieve(store, "How do I read a CSV file with a header row?", cfg, lamina_minilm)
    docs = [h.chunk.doc_id for h in hits]
    assert len(hits) == 5 and [h.rank for h in hits] == [1, 2, 3, 4, 5]
    assert len({h.chunk.chunk_id for h in hits}) == 5
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert any(d.startswith("csv.") for d in docs), docs
    if mode == "dense":
        assert "csv.DictReader" in docs, docs


def test_hybrid_fuses_two_lists_of_candidate_depth(store: MemoryStore, lamina_minilm: Any) -> None:
    store.dense_calls.clear()
    store.text_calls.clear()
    cfg = RetrieveConfig(mode="hybrid", k=3, candidates=20, fusion="rrf")
    hits = retrieve(store, "largest items of a list", cfg, lamina_minilm)
    assert store.dense_calls == [20] and store.text_calls == [20]
    assert len(hits) == 3 and all(h.score <= 2 / 61 for h in hits)  # fused scores, not cosines
    assert "heapq.nlargest" in [h.chunk.doc_id for h in hits]
    q = "largest items of a list"
    convex = retrieve(store, q, replace(cfg, fusion="convex"), lamina_minilm)
    cosine = {
        h.chunk.chunk_id: h.score for h in retrieve(store, q, replace(cfg, mode="dense", k=20), lamina_minilm)
    }
    # a chunk dense found scores its cosine plus at most text_weight (0.1)
    assert any(h.chunk.chunk_id in cosine for h in convex)
    for h in convex:
        if h.chunk.chunk_id in cosine:
            assert cosine[h.chunk.chunk_id] - 1e-6 <= h.score <= cosine[h.chunk.chunk_id] + 0.1 + 1e-6
    assert "heapq.nlargest" in [h.chunk.doc_id for h in convex]


def test_score_threshold_turns_a_miss_into_no_passages(store: MemoryStore, lamina_minilm: Any) -> None:
    q = "What is the boiling point of water on Mars?"
    assert retrieve(store, q, RetrieveConfig(mode="dense", score_threshold=0.9), lamina_minilm) == []
    assert retrieve(store, q, RetrieveConfig(mode="hybrid", score_threshold=0.9), lamina_minilm) == []
    kept = retrieve(
        store, q, RetrieveConfig(mode="dense", k=50, candidates=50, score_threshold=0.05), lamina_minilm
    )
    assert kept and all(h.score >= 0.05 for h in kept)


def test_filters_reach_the_store(store: MemoryStore, lamina_minilm: Any) -> None:
    cfg = RetrieveConfig(k=3, filters={"title": "json.dumps"})
    hits = retrieve(store, "read a CSV file", cfg, lamina_minilm)
    assert [h.chunk.doc_id for h in hits] == ["json.dumps"]


def test_a_query_with_another_embedding_model_is_refused_naming_both(store: MemoryStore) -> None:
    with pytest.raises(ConfigError, match=r"'minilm'.*'tiny'"):
        retrieve(store, "read a CSV file", RetrieveConfig(mode="dense"), tiny_lm())


def test_bm25_needs_no_embedder(store: MemoryStore) -> None:
    hits = retrieve(store, "heap", RetrieveConfig(mode="bm25", k=2), embedder=None)
    assert all(h.chunk.doc_id.startswith("heapq") for h in hits)


@pytest.mark.parametrize(
    "bad",
    [
        {"mode": "sparse"},
        {"k": 0},
        {"candidates": 2, "k": 5},
        {"rerank": "magic"},
        {"rrf_k": -1},
        {"fusion": "max"},
        {"text_weight": -0.1},
        {"text_weight": float("nan")},
        {"rerank_depth": 0},
        {"rerank_weight": -1.0},
    ],
)
def test_config_is_checked(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        RetrieveConfig(**bad)


def test_empty_question_is_refused(store: MemoryStore) -> None:
    with pytest.raises(ConfigError, match="empty"):
        retrieve(store, "  ", RetrieveConfig(mode="bm25"))


@pytest.mark.slow
def test_llm_rerank_reorders_by_yes_probability(
    store: MemoryStore, lamina_minilm: Any, lamina_smollm2: Any
) -> None:
    cfg = RetrieveConfig(k=2, candidates=3, rerank="llm")
    hits = retrieve(
        store, "How do I indent every line of a text?", cfg, lamina_minilm, reranker=lamina_smollm2
    )
    assert len(hits) == 2 and all(0.0 < h.score < 1.0 for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    with pytest.raises(ConfigError, match="reranker"):
        retrieve(store, "indent", cfg, lamina_minilm)


def test_likelihood_rerank_adds_the_mean_log_probability_of_the_question() -> None:
    """rerank=likelihood: score + weight * mean log p(question | UPR prompt with the passage), one
    passage per document (its first 'chunk' entry), the later documents after in their order; checked
    against a plain forward pass of the tiny model over prompt + question."""
    import torch

    from lamina.rag.retrieve import UPR_PROMPT, rerank_likelihood

    lm = tiny_lm()
    tok = lm.tokenizer
    lead = hit("a#lead", 0.9, text="the cat sat")
    lead.chunk.kind = "lead"
    hits = [lead, hit("b#0", 0.8, text="a dog ran"), hit("a#0", 0.7, text="the cat sat on the mat"),
            hit("c#0", 0.6, text="blue green red"), hit("d#0", 0.5, text="hello world")]  # fmt: skip
    question = "the cat sat on a mat"

    def mean_logp(text: str) -> float:
        ctx = tok.encode(UPR_PROMPT.format(passage=text), add_special_tokens=False)
        q = tok.encode(" " + question, add_special_tokens=False)
        with torch.inference_mode():
            lg = lm.model(torch.tensor([ctx + q])).float().log_softmax(-1)[0]
        return float(sum(lg[len(ctx) + i - 1, t] for i, t in enumerate(q)) / len(q))

    out = rerank_likelihood(lm, question, hits, weight=1.0, depth=3)
    expected = {d: s + mean_logp(t) for d, s, t in [("a", 0.9, "the cat sat on the mat"),
                ("b", 0.8, "a dog ran"), ("c", 0.6, "blue green red")]}  # fmt: skip
    top = sorted(expected, key=lambda d: -expected[d])
    assert [h.chunk.doc_id for h in out] == [*top, "d"]  # a: once, through its chunk, not its lead
    assert out[top.index("a")].chunk.chunk_id == "a#0"
    assert [h.score for h in out[:3]] == pytest.approx([expected[d] for d in top], abs=1e-4)
    assert [h.rank for h in out] == [1, 2, 3, 4]
    assert [h.chunk.doc_id for h in rerank_likelihood(lm, question, hits, 0.0, 3)] == ["a", "b", "c", "d"]


def test_likelihood_rerank_scales_bm25_scores_to_count_against_the_likelihood() -> None:
    """mode=bm25: the re-scored documents' BM25 scores are min-max scaled to [0, 1] before the weighted
    mean log-probability is added, so the likelihood can re-order them (raw BM25, 10-30, would swamp a
    weight chosen on cosines); dense scores are added as they are."""
    from lamina.rag.retrieve import rerank_likelihood

    lm = tiny_lm()
    question = "the cat sat on a mat"
    texts = {"a": "the cat sat on the mat", "b": "a dog ran", "c": "blue green red"}
    flat = rerank_likelihood(lm, question, [hit(f"{d}#0", 0.0, text=t) for d, t in texts.items()], 1.0, 3)
    lp = {h.chunk.doc_id: h.score for h in flat}  # mean log p(question | passage) of each document
    low, high = sorted(lp, key=lambda d: lp[d]), max(lp.values()) - min(lp.values())
    weight = 2.0 / high  # the likeliest document gains 2 over the least likely: more than scaled BM25's 1
    bm25 = dict(zip(low, (30.0, 20.0, 10.0), strict=True))  # BM25 prefers the least likely documents

    class TextStore:
        embedding_model, dim = "minilm", 384

        def search_text(self, query: str, k: int, filters: Any = None) -> list[Any]:
            return [hit(f"{d}#0", bm25[d], text=texts[d]) for d in low]

    cfg = RetrieveConfig(mode="bm25", k=3, candidates=3, rerank="likelihood", rerank_weight=weight)
    out = retrieve(TextStore(), question, cfg, reranker=lm)  # type: ignore[arg-type]
    scaled = {d: (bm25[d] - 10.0) / 20.0 + weight * lp[d] for d in texts}
    assert [h.chunk.doc_id for h in out] == sorted(scaled, key=lambda d: -scaled[d])
    assert [h.chunk.doc_id for h in out] != low  # not BM25's order
    assert [h.score for h in out] == pytest.approx(sorted(scaled.values(), reverse=True), abs=1e-4)
    # unscaled (as for dense's cosines), the same weight leaves BM25's order as it was
    hits = TextStore().search_text(question, 3)
    assert [h.chunk.doc_id for h in rerank_likelihood(lm, question, hits, weight, 3)] == low
