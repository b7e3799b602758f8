"""Retrieval: a question -> the passages of a store that answer it, best first.

Three modes over one :class:`~lamina.rag.types.Store`:

- ``dense``: the question embedded with the store's own embedding model (``lamina.embeddings``), the
  chunks nearest it by cosine similarity (``store.search_dense``);
- ``bm25``: full-text search ranked by BM25 (``store.search_text``; Robertson & Zaragoza 2009);
- ``hybrid``: both lists, ``candidates`` deep each, merged by ``fusion``:

  - ``convex`` (the default): a convex combination of the scores (Bruch, Gai & Ingber, "An Analysis of
    Fusion Functions for Hybrid Retrieval", ACM TOIS 2023): ``cosine + text_weight * bm25 / best_bm25``,
    the BM25 score divided by the list's best so that it lies in [0, 1] like a MiniLM cosine; a chunk
    takes its document's best BM25 score (``lead`` entries are not in full-text search, and the chunk
    that matched is often not the one the question is nearest), and a chunk that only BM25 found takes
    the lowest cosine of the dense list (its own is below it). BM25 then only breaks near-ties between
    dense candidates: on the shipped stdlib questions, where the words of the question are not the
    docstring's, rank fusion let BM25's noisy first places push answers out of the top 5 (recall@5
    0.491 with RRF against dense's 0.563) and this fusion does not (0.569; ``text_weight`` 0.1 chosen
    on the even-numbered half, 0.554 on the other half, dense's 0.554 there).
  - ``rrf``: reciprocal rank fusion (Cormack, Clarke & Buettcher, "Reciprocal Rank Fusion outperforms
    Condorcet and individual rank learning methods", SIGIR 2009): a chunk's score is ``sum over lists of
    1 / (rrf_k + rank)`` with ``rrf_k = 60`` as in the paper; ranks, not scores, so no scale to match.

Results hold each chunk once (by ``chunk_id``, and a chunk whose text repeats an earlier hit's is dropped),
ranked 1..k. ``score_threshold`` turns "nothing close enough" into an empty list, which synthesis answers
with "not found in the sources" without calling the model. Optional reranking re-orders the fused
candidates with a chat model: ``rerank="llm"`` by its probability that a passage answers the question,
``rerank="likelihood"`` by the retrieval score plus its mean log-probability of the question given the
passage (:func:`rerank_likelihood`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from lamina.errors import ConfigError
from lamina.rag.types import Hit, Store

if TYPE_CHECKING:
    from lamina.checkpoint.load import LoadedModel

MODES = ("dense", "bm25", "hybrid")
# rerank=likelihood's weight, chosen on the even-numbered stdlib questions with SmolLM2-135M over dense's
# top 30 documents (recall@5 0.667 vs dense 0.571); held out, the odd ones: 0.614 vs dense 0.554 (from
# the scoring harness scripts/rerank_likelihood_eval.py; this code's own full evaluation is owed)
RERANK_WEIGHT = 1.0
FUSIONS = ("convex", "rrf")
RERANKERS = ("none", "llm", "likelihood")


@dataclass
class RetrieveConfig:
    """How a question becomes passages (see the module docstring for the methods and their sources)."""

    # dense (embeddings), bm25 (full text) or hybrid (both, fused as `fusion` says); on the shipped
    # stdlib questions recall@5 dense 0.563, hybrid 0.569, bm25 0.335 (hybrid ties dense on the held-out
    # half): they avoid the docstrings' words, which is where BM25 helps, so dense stays the default
    mode: Literal["dense", "bm25", "hybrid"] = "dense"
    k: int = 5  # passages returned
    # hybrid: convex (cosine + text_weight * BM25 / the best BM25, a chunk scored by its document's best
    # BM25; Bruch et al. 2023) or rrf (reciprocal rank fusion, Cormack et al. 2009)
    fusion: Literal["convex", "rrf"] = "convex"
    text_weight: float = 0.1  # hybrid, fusion=convex: weight of BM25 scaled to [0, 1] (cosine's: 1)
    rrf_k: int = 60  # hybrid, fusion=rrf: score = sum 1 / (rrf_k + rank) (Cormack et al. 2009)
    candidates: int = 50  # depth of each list before fusion and reranking (>= k)
    # dense/hybrid: minimum cosine similarity of a passage to the question (hybrid: when no passage
    # reaches it, nothing is returned); bm25: minimum BM25 score; None: no minimum
    score_threshold: float | None = None
    # metadata filters: {key: value} or {key: [any of these]}; doc_id, doc_id_prefix and kind match the
    # chunk's own fields (lamina.rag.types.FILTERS_HELP)
    filters: dict[str, Any] | None = None
    # llm: re-order the candidates by a chat model's P(Yes) that the passage answers the question;
    # likelihood: by retrieval score + rerank_weight * the chat model's mean log p(question | passage)
    # (query likelihood, Sachan et al. 2022), over the first rerank_depth documents; bm25 and rrf
    # scores are first min-max scaled to [0, 1] over those documents (cosine-like; dense and convex
    # hybrid scores are used as they are)
    rerank: Literal["none", "llm", "likelihood"] = "none"
    rerank_depth: int = 30  # rerank=likelihood: documents re-scored (one passage each)
    # rerank=likelihood: weight of the mean log-probability against the retrieval score (chosen with
    # dense cosines; not measured for bm25 or rrf, whose scaled scores spread wider than cosines)
    rerank_weight: float = RERANK_WEIGHT

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r} must be one of {', '.join(MODES)}")
        if self.fusion not in FUSIONS:
            raise ConfigError(f"fusion={self.fusion!r} must be one of {', '.join(FUSIONS)}")
        if not (math.isfinite(self.text_weight) and self.text_weight >= 0):
            raise ConfigError(
                f"text_weight={self.text_weight} must be a finite number >= 0 (0.1: the default)"
            )
        if self.rerank not in RERANKERS:
            raise ConfigError(f"rerank={self.rerank!r} must be one of {', '.join(RERANKERS)}")
        if self.k < 1:
            raise ConfigError(f"k={self.k} must be >= 1 (passages returned)")
        if self.rerank_depth < 1:
            raise ConfigError(f"rerank_depth={self.rerank_depth} must be >= 1 (documents re-scored)")
        if not (math.isfinite(self.rerank_weight) and self.rerank_weight >= 0):
            raise ConfigError(f"rerank_weight={self.rerank_weight} must be a finite number >= 0")
        if self.rrf_k < 0:
            raise ConfigError(f"rrf_k={self.rrf_k} must be >= 0 (60 in Cormack et al. 2009)")
        if self.candidates < self.k:
            raise ConfigError(f"candidates={self.candidates} must be >= k={self.k} (each list's depth)")


def retrieve(
    store: Store,
    query: str,
    cfg: RetrieveConfig | None = None,
    embedder: LoadedModel | None = None,
    reranker: LoadedModel | None = None,
) -> list[Hit]:
    """The ``cfg.k`` passages of ``store`` that best answer ``query``, best first, ranks 1..k.

    ``embedder`` is the store's embedding model, loaded (``lamina.load(store.embedding_model)`` when None
    and the mode needs it: dense, hybrid). Scores: cosine similarity (dense), BM25 (bm25), the convex or
    reciprocal rank fusion score (hybrid), P(Yes) after ``rerank="llm"`` with ``reranker`` (a chat
    model), or the fused score of :func:`rerank_likelihood` after ``rerank="likelihood"``. Raises
    ``ConfigError`` for an empty query, for an embedder that is not the model the store was built with
    (naming both), and for a rerank without a reranker.
    """
    cfg = cfg or RetrieveConfig()
    if not query.strip():
        raise ConfigError("the question is empty: ask something")
    depth = cfg.candidates  # deeper than k: dedup, fusion and reranking choose the k from these
    dense: list[Hit] = []
    text: list[Hit] = []
    if cfg.mode in ("dense", "hybrid"):
        vector = embed_query(store, query, embedder)
        dense = store.search_dense(vector, depth, cfg.filters)
        if cfg.score_threshold is not None:
            dense = [h for h in dense if h.score >= cfg.score_threshold]
            if not dense:  # nothing in the index is close enough: no BM25 vote rescues a miss
                return []
    if cfg.mode in ("bm25", "hybrid"):
        text = store.search_text(query, depth, cfg.filters)
        if cfg.mode == "bm25" and cfg.score_threshold is not None:
            text = [h for h in text if h.score >= cfg.score_threshold]
    if cfg.mode == "dense":
        hits = dedupe(dense)
    elif cfg.mode == "bm25":
        hits = dedupe(text)
    elif cfg.fusion == "rrf":
        hits = reciprocal_rank_fusion([dense, text], cfg.rrf_k)
    else:
        hits = convex_fusion(dense, text, cfg.text_weight)
    if cfg.rerank != "none":
        if reranker is None:
            raise ConfigError(
                f"rerank={cfg.rerank!r} needs a chat model: pass reranker=lamina.load('smollm2') (or --model)"
            )
        if cfg.rerank == "llm":
            hits = rerank_llm(reranker, query, hits)
        else:
            # BM25 (5-30) and RRF (~0.016-0.033) are not on the cosine scale the weight was chosen on
            scaled = cfg.mode == "bm25" or (cfg.mode == "hybrid" and cfg.fusion == "rrf")
            hits = rerank_likelihood(
                reranker, query, hits, cfg.rerank_weight, cfg.rerank_depth, normalize=scaled
            )
    return [replace(h, rank=i + 1) for i, h in enumerate(hits[: cfg.k])]


def embed_query(store: Store, query: str, embedder: LoadedModel | None = None) -> Any:
    """``query`` as a (dim,) unit vector from the store's embedding model (cut to the model's length).

    Raises ``ConfigError`` naming both models when ``embedder`` is another model than the store's, or
    when its vectors have another size than the store's.
    """
    from lamina.checkpoint.load import load
    from lamina.embeddings import embed

    if embedder is None:
        embedder = load(store.embedding_model)
    elif not same_model(embedder, store.embedding_model):
        raise ConfigError(
            f"the index was built with embedding model {store.embedding_model!r}, not "
            f"{embedder.entry.name!r}: query it with {store.embedding_model!r} (or re-index with the other)"
        )
    vector = embed(embedder, [query], truncate=True)[0]
    if vector.shape[0] != store.dim:
        raise ConfigError(
            f"embedding model {embedder.entry.name!r} makes {vector.shape[0]}-dim vectors, the index holds "
            f"{store.dim}-dim ones from {store.embedding_model!r}: query it with {store.embedding_model!r}"
        )
    return vector


def same_model(lm: LoadedModel, name: str) -> bool:
    """Whether ``lm`` is the model a store names: the same short name, or the same folder/file once the
    name is resolved as ``lamina.load`` resolves it (a path, a models-directory name, a packaged name)."""
    from lamina.checkpoint.registry import resolve
    from lamina.errors import LaminaError

    if name == lm.entry.name:
        return True
    try:
        return resolve(name).path.resolve() == lm.entry.path.resolve()
    except (LaminaError, OSError):
        return False


def reciprocal_rank_fusion(lists: list[list[Hit]], rrf_k: int = 60) -> list[Hit]:
    """Fuse ranked lists: each chunk scores ``sum 1 / (rrf_k + rank)`` over the lists it appears in (its
    rank in each list, 1-based, after that list's duplicates are dropped), best first; ties keep the order
    of first appearance (list by list). Cormack, Clarke & Buettcher, SIGIR 2009."""
    scores: dict[str, float] = {}
    chunks: dict[str, Hit] = {}
    for hits in lists:
        for rank, hit in enumerate(dedupe(hits), start=1):
            cid = hit.chunk.chunk_id
            scores[cid] = scores.get(cid, 0.0) + 1.0 / (rrf_k + rank)
            chunks.setdefault(cid, hit)
    order = sorted(scores, key=lambda cid: -scores[cid])  # stable: first appearance breaks ties
    fused = [Hit(chunks[cid].chunk, scores[cid], i + 1) for i, cid in enumerate(order)]
    return dedupe(fused)


def convex_fusion(dense: list[Hit], text: list[Hit], text_weight: float = 0.1) -> list[Hit]:
    """Fuse a dense and a BM25 list by score: each chunk of either scores ``cosine + text_weight * bm25 /
    max_bm25`` (Bruch, Gai & Ingber, ACM TOIS 2023, a convex combination up to scale), best first, where
    ``bm25`` is the best BM25 score of the chunk's document in ``text`` (0 when absent) and ``cosine`` its
    score in ``dense``, or the lowest score of ``dense`` for a chunk it lacks (its own is at most that).
    Ties keep the order of first appearance (dense first)."""
    dense, text = dedupe(dense), dedupe(text)
    best: dict[str, float] = {}
    for h in text:
        best[h.chunk.doc_id] = max(best.get(h.chunk.doc_id, h.score), h.score)
    top = max(best.values(), default=0.0)
    scale = text_weight / top if top > 0 else 0.0
    floor = min((h.score for h in dense), default=0.0)
    cosine = {h.chunk.chunk_id: h.score for h in dense}
    scores: dict[str, float] = {}
    chunks: dict[str, Hit] = {}
    for h in dense + text:
        cid = h.chunk.chunk_id
        if cid not in scores:
            scores[cid] = cosine.get(cid, floor) + scale * best.get(h.chunk.doc_id, 0.0)
            chunks[cid] = h
    order = sorted(scores, key=lambda cid: -scores[cid])  # stable: first appearance breaks ties
    return dedupe([Hit(chunks[cid].chunk, scores[cid], i + 1) for i, cid in enumerate(order)])


def dedupe(hits: list[Hit]) -> list[Hit]:
    """``hits`` without repeats, in order: a chunk id seen before, the same text of the same document
    seen before (a document indexed twice), or a passage whose span lies inside an earlier passage of
    the same document (a ``lead`` entry after the chunk that holds it) is dropped; ranks renumbered 1..n."""
    seen_ids: set[str] = set()
    seen_text: set[tuple[str, str]] = set()
    spans: dict[str, list[tuple[int, int]]] = {}
    out: list[Hit] = []
    for h in hits:
        c = h.chunk
        key = (c.doc_id, c.text)
        inside = c.kind != "summary" and any(a <= c.start and c.end <= b for a, b in spans.get(c.doc_id, ()))
        if c.chunk_id in seen_ids or key in seen_text or inside:
            continue
        if c.kind != "summary":  # a summary's span is the whole document: it holds every passage
            spans.setdefault(c.doc_id, []).append((c.start, c.end))
        seen_ids.add(h.chunk.chunk_id)
        seen_text.add(key)
        out.append(Hit(h.chunk, h.score, len(out) + 1))
    return out


def rerank_llm(lm: LoadedModel, query: str, hits: list[Hit], max_passage_chars: int = 800) -> list[Hit]:
    """Re-order ``hits`` by the chat model's probability that the passage answers the question: the prompt
    asks "Does the passage answer the question? Answer Yes or No." and the score is P("Yes") /
    (P("Yes") + P("No")) of the first answer token (the pointwise relevance-generation of Liang et al.,
    HELM 2022, and of Nogueira et al.'s monoT5, 2020). One forward pass per passage, on the model's device."""
    import torch

    from lamina.generate.text import build_prompt_ids

    tok = lm.tokenizer
    if tok is None:
        raise ConfigError(f"reranker {lm.entry.name!r} has no tokenizer")
    yes = _first_token(lm, ["Yes", " Yes"])
    no = _first_token(lm, ["No", " No"])
    device = lm.model.tok_emb.weight.device
    scored: list[tuple[float, int, Hit]] = []
    for i, h in enumerate(hits):
        prompt = (
            f"Passage:\n{h.chunk.text[:max_passage_chars]}\n\nQuestion: {query}\n\n"
            "Does the passage answer the question? Answer Yes or No."
        )
        ids = build_prompt_ids(lm, prompt)
        with torch.inference_mode():
            last = lm.model(torch.tensor([ids], device=device), last_only=True)[0, -1].float()  # (V,)
        pair = torch.log_softmax(torch.stack([last[yes], last[no]]), dim=0)
        scored.append((math.exp(float(pair[0])), i, h))
    scored.sort(key=lambda t: (-t[0], t[1]))
    return [Hit(h.chunk, p, r + 1) for r, (p, _, h) in enumerate(scored)]


UPR_PROMPT = "Passage: {passage}\nPlease write a question based on this passage.\nQuestion:"


def rerank_documents(hits: list[Hit], depth: int) -> tuple[dict[str, Hit], dict[str, Hit]]:
    """The first ``depth`` documents of ``hits`` (in order) as {doc_id: its first (best) hit} and {doc_id:
    the hit it is re-scored through}: its first ``chunk`` entry (the passage with its title line), else its
    first hit."""
    first: dict[str, Hit] = {}
    passage: dict[str, Hit] = {}
    for h in hits:
        d = h.chunk.doc_id
        if d not in first:
            if len(first) == depth:
                continue
            first[d] = passage[d] = h
        elif h.chunk.kind == "chunk" and passage[d].chunk.kind != "chunk":
            passage[d] = h
    return first, passage


def rerank_likelihood(
    lm: LoadedModel,
    query: str,
    hits: list[Hit],
    weight: float = RetrieveConfig.rerank_weight,
    depth: int = RetrieveConfig.rerank_depth,
    max_passage_chars: int = 600,
    normalize: bool = False,
) -> list[Hit]:
    """Re-order the first ``depth`` documents of ``hits`` by ``score + weight * mean log p(query |
    passage)`` under the chat model ``lm`` (query likelihood: Sachan et al., "Improving Passage Retrieval
    with Zero-Shot Question Generation", EMNLP 2022, with their prompt ``UPR_PROMPT``): one passage per
    document (its other passages are dropped), then the hits of later documents in their order.

    Each document is re-scored once, through one passage: its first ``chunk`` entry among ``hits`` (the
    passage with its title line), else its first hit; ``score`` is the document's first (best) retrieval
    score and the passage's first ``max_passage_chars`` characters are shown. The log-probability is the
    mean over the question's tokens (natural log, so the weight means the same for short and long
    questions). ``normalize``: min-max scale the re-scored documents' scores to [0, 1] first (all equal:
    0), for first stages whose scores are not cosine-like (BM25, reciprocal rank fusion); ``weight``'s
    default was chosen with dense cosines. One batched scoring pass
    (``lamina.eval.multiple_choice.score_continuations``: the passages run once into a KV cache, the
    question after each). The returned hits carry the fused score.
    Raises ``ConfigError`` for a model without a tokenizer.
    """
    from lamina.eval.multiple_choice import score_continuations

    tok = lm.tokenizer
    if tok is None:
        raise ConfigError(f"reranker {lm.entry.name!r} has no tokenizer")
    first, passage = rerank_documents(hits, depth)
    if not first:
        return hits
    q_ids = tok.encode(" " + query.strip(), add_special_tokens=False)
    docs = list(first)
    requests = [
        (
            tok.encode(
                UPR_PROMPT.format(passage=passage[d].chunk.text[:max_passage_chars]), add_special_tokens=False
            ),
            [q_ids],
        )
        for d in docs
    ]
    logp = score_continuations(lm.model, requests)
    base = {d: first[d].score for d in docs}
    if normalize:
        low, high = min(base.values()), max(base.values())
        base = {d: (s - low) / (high - low) if high > low else 0.0 for d, s in base.items()}
    fused = [
        (base[d] + weight * lp[0][0] / len(q_ids), i, passage[d])
        for i, (d, lp) in enumerate(zip(docs, logp, strict=True))
    ]
    fused.sort(key=lambda t: (-t[0], t[1]))
    rest = [h for h in hits if h.chunk.doc_id not in first]
    out = [Hit(h.chunk, s, 0) for s, _, h in fused] + rest
    return [replace(h, rank=i + 1) for i, h in enumerate(out)]


def _first_token(lm: LoadedModel, spellings: list[str]) -> int:
    assert lm.tokenizer is not None
    for s in spellings:
        ids = lm.tokenizer.encode(s, add_special_tokens=False)
        if len(ids) == 1:
            return ids[0]
    return lm.tokenizer.encode(spellings[0], add_special_tokens=False)[0]
