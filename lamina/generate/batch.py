"""A file of prompts as one batch: JSONL requests in, one result row per choice out.

    requests, lines = read_requests("prompts.jsonl")
    rows = generate_batch(lm, requests, labels=[f"prompts.jsonl:{n}" for n in lines], temperature=0.7)

Each request is ``{"prompt": "..."}`` or ``{"messages": [...]}`` with an optional ``"id"`` and any
``GenerationConfig`` field of its own (``"temperature": 0.7``, ``"n": 2``, ``"logprobs": true``); the
keyword controls apply to every request, a request's own fields on top. Every request (sampled, greedy,
beam search) decodes together on one engine (continuous batching); with a draft the greedy ones decode
speculatively.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamina.checkpoint.load import LoadedModel
from lamina.data.rows import iter_jsonl
from lamina.errors import ConfigError
from lamina.generate.engine import Engine, Sequence_, TokenLogprob
from lamina.generate.speculative import DraftStats, SpeculativeOptions
from lamina.generate.text import build_prompt_ids, generation_config, resolve_draft
from lamina.model.transformer import Transformer
from lamina.tokenizer import Tokenizer

if TYPE_CHECKING:
    from lamina.config import GenerationConfig

MAX_BATCH_SIZE = 16  # sequences decoded together by default


def read_requests(path: str | Path) -> tuple[list[dict[str, Any]], list[int]]:
    """The requests of a JSONL file (each an object with a "prompt" string or a "messages" list) and the
    line number of each. Blank lines are skipped. Raises ``ConfigError`` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--input {path}: no such file")
    requests, lines = [], []
    for i, req in iter_jsonl(path, lambda n, e: ConfigError(f"{path}:{n}: not valid JSON ({e.msg})")):
        if not isinstance(req, dict) or not (isinstance(req.get("prompt"), str) or "messages" in req):
            raise ConfigError(
                f'{path}:{i}: each line must be an object with "prompt" (a string) or "messages"'
            )
        requests.append(req)
        lines.append(i)
    if not requests:
        raise ConfigError(f"--input {path}: no requests in the file")
    return requests, lines


def generate_batch(
    lm: LoadedModel,
    requests: Sequence[Mapping[str, Any]],
    *,
    chat: bool | None = None,
    system: str | None = None,
    max_batch_size: int = MAX_BATCH_SIZE,
    labels: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    draft: str | LoadedModel | Transformer | None = None,
    speculative_layers: int | None = None,
    num_draft_tokens: int = SpeculativeOptions.num_draft_tokens,
    stats: dict[str, DraftStats] | None = None,
    config: GenerationConfig | None = None,
    **controls: Any,
) -> list[dict[str, Any]]:
    """Run every request through one engine; one result row per choice, in request order.

    A row: ``index`` (the request's position), ``id`` (the request's "id", else its index), ``text``,
    ``n`` (which choice, only when the request has several), ``finish_reason``, ``prompt_tokens``,
    ``completion_tokens``; with ``logprobs`` also ``tokens`` (each generated token's text) and
    ``logprobs`` (their log-probabilities), with ``top_logprobs`` > 0 ``top_logprobs`` (per token, the
    most likely alternatives as ``{"token", "id", "logprob"}``), with ``prompt_logprobs`` set
    ``prompt_logprobs`` (per prompt token, None for the first). Every request starts from ``config``
    exactly as given (its None fields too), else from the model's defaults (``generation_config``);
    ``controls`` (``GenerationConfig`` fields) apply on top to every request, each request's own fields on
    top of those; ``chat`` / ``system`` as for
    ``lamina.generate``. ``labels[i]`` names request i in errors (default "request i");
    ``progress(finished, total)`` is called as sequences finish. ``draft`` / ``speculative_layers`` /
    ``num_draft_tokens`` decode the greedy requests speculatively (``lamina.generate``); ``stats``, when
    given, receives the draft's counts under "draft". Raises ``ConfigError`` before any decoding when a
    request is invalid.
    """
    prepared = []
    for i, req in enumerate(requests):  # every request is checked before any decoding
        own = {k: v for k, v in req.items() if k not in ("prompt", "messages", "id")}
        try:
            cfg = generation_config(lm, config, **{**controls, **own})
            if "messages" not in req and not isinstance(req.get("prompt"), str):
                raise ConfigError('a request needs "prompt" (a string) or "messages"')
            prompt = req["messages"] if "messages" in req else req["prompt"]
            prepared.append((req, build_prompt_ids(lm, prompt, chat=chat, system=system), cfg))
        except ConfigError as e:
            raise ConfigError(f"{labels[i] if labels else f'request {i}'}: {e}") from None
    total, finished = sum(cfg.n for _, _, cfg in prepared), 0
    engine = Engine(
        lm.model, lm.tokenizer, lm.generation.eos_token_ids, max_batch_size=max_batch_size,
        draft=resolve_draft(lm, draft, speculative_layers), num_draft_tokens=num_draft_tokens,
    )  # fmt: skip
    results: dict[int, list[Sequence_]] = {}
    for i, (_, ids, cfg) in enumerate(prepared):
        try:
            results[i] = engine.submit(ids, cfg)
        except ConfigError as e:
            raise ConfigError(f"{labels[i] if labels else f'request {i}'}: {e}") from None
    while engine.has_work():
        done = len({id(d.seq) for d in engine.step() if d.finished})  # a step may hold 2 deltas of one
        finished += done
        if progress is not None and done:
            progress(finished, total)
    if stats is not None and engine.draft_stats is not None:
        stats["draft"] = engine.draft_stats
    rows = []
    for i, (req, _, _) in enumerate(prepared):
        seqs = results[i]
        for seq in seqs:
            row: dict[str, Any] = {"index": i, "id": req.get("id", i), "text": seq.text}
            if len(seqs) > 1:
                row["n"] = seq.index
            row |= {
                "finish_reason": seq.finish_reason,
                "prompt_tokens": seq.prompt_tokens,
                "completion_tokens": len(seq.tokens),
            }
            if seq.error is not None:
                row["error"] = seq.error
            rows.append(row | logprob_fields(seq, lm.tokenizer))
    return rows


def logprob_fields(seq: Sequence_, tokenizer: Tokenizer | None) -> dict[str, Any]:
    """A sequence's log-probabilities as JSON-ready fields (empty when none were asked for):
    ``tokens``, ``logprobs``, ``top_logprobs`` (when alternatives were asked for), ``prompt_logprobs``."""
    out: dict[str, Any] = {}
    if seq.logprobs is not None:
        out["tokens"] = [token_text(tokenizer, lp.token) for lp in seq.logprobs]
        out["logprobs"] = [lp.logprob for lp in seq.logprobs]
        if any(lp.top for lp in seq.logprobs):
            out["top_logprobs"] = [_alternatives(tokenizer, lp) for lp in seq.logprobs]
    if seq.prompt_logprobs is not None:
        out["prompt_logprobs"] = [
            None if lp is None else {**_entry(tokenizer, lp.token, lp.logprob), "rank": lp.rank,
                                     "top": _alternatives(tokenizer, lp)}
            for lp in seq.prompt_logprobs
        ]  # fmt: skip
    return out


def token_text(tokenizer: Tokenizer | None, token: int) -> str:
    """One token's text (special tokens spelled out), or ``"token_id:N"`` without a tokenizer."""
    return (
        tokenizer.decode([token], skip_special_tokens=False) if tokenizer is not None else f"token_id:{token}"
    )


def _entry(tokenizer: Tokenizer | None, token: int, logprob: float) -> dict[str, Any]:
    return {"token": token_text(tokenizer, token), "id": token, "logprob": logprob}


def _alternatives(tokenizer: Tokenizer | None, lp: TokenLogprob) -> list[dict[str, Any]]:
    return [_entry(tokenizer, t, v) for t, v in lp.top]
