"""Beam search with the semantics of ``transformers`` 5.x ``generate(num_beams=..., do_sample=False)``.

Every prompt keeps ``num_beams`` running hypotheses; all of them, for all prompts, decode together in
one KV-cache batch (the cache rows are reordered with ``cache.keep`` as beams are picked). Each step:

1. log-softmax of the logits, then the logits processors that make sense for beams (``process_logits``:
   logit_bias, bad_words_ids, allowed_token_ids, no_repeat_ngram_size, min_new_tokens, the penalties)
   on those log-probabilities, as HF does;
2. add each beam's running score and take the best ``K = max(2, 1 + number of eos ids) * num_beams``
   continuations over all beams of the prompt (at the first step only beam 0 counts: the others start at
   -1e9);
3. a continuation ending in eos, or reaching ``max_new_tokens``, is finished: among the first
   ``num_beams`` of the K it joins the prompt's finished hypotheses with score
   ``sum of log-probs / n_generated ** length_penalty`` (``n_generated`` counts the new tokens, eos
   included, not the prompt: HF 5.x), when it beats the worst of them; the best ``num_beams``
   unfinished continuations run on;
4. a prompt is done when ``early_stopping`` is True and it has ``num_beams`` finished hypotheses, or
   (False) when the best running beam, scored at its current length, cannot beat the worst finished one.
   A done prompt leaves the batch; its finished hypotheses are final.

HF's ``early_stopping="never"`` is not offered (``GenerationConfig.early_stopping`` is a bool).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lamina.config import GenerationConfig
from lamina.errors import ConfigError
from lamina.generate.engine import require_generative
from lamina.generate.sampling import process_logits
from lamina.model.transformer import Transformer

_NEG = -1.0e9  # HF's "never pick this" score offset


@dataclass
class Beam:
    """One finished hypothesis: its new tokens (without the eos that ended it) and its score.

    ``score`` is the length-penalised sum of log-probabilities (HF's ``sequences_scores``);
    ``finish_reason`` is "stop" (eos or a stop token) or "length".
    """

    tokens: list[int]
    score: float
    finish_reason: str


def _check(model: Transformer, prompts: Sequence[Sequence[int]], cfg: GenerationConfig) -> None:
    require_generative(model.config)
    cfg.check_token_ids(model.config.vocab_size)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token (empty prompt given)")
    if cfg.n > cfg.num_beams:
        raise ConfigError(
            f"n={cfg.n} must be <= num_beams={cfg.num_beams} (beam search returns the n best beams)"
        )
    if cfg.sampling:
        raise ConfigError(
            f"beam search picks the best continuations; it does not sample (do_sample={cfg.do_sample}): "
            "set do_sample=False"
        )
    for name in ("stop", "choices"):
        if getattr(cfg, name):
            raise ConfigError(f"{name}={getattr(cfg, name)!r} is not supported with beam search")
    if cfg.response_format != "text":
        raise ConfigError(f"response_format={cfg.response_format!r} is not supported with beam search")
    if cfg.logprobs or cfg.prompt_logprobs is not None:
        raise ConfigError(
            "logprobs / prompt_logprobs are not reported by beam search (a beam's score is its summed "
            "logprob): use num_beams=1 for per-token logprobs"
        )
    limit = model.config.max_seq_len
    for p in prompts:
        if len(p) >= limit:
            raise ConfigError(
                f"prompt of {len(p)} tokens does not fit the context window max_seq_len={limit}"
            )


@torch.inference_mode()
def beam_search(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    eos_token_ids: Sequence[int] = (),
) -> list[list[Beam]]:
    """The ``config.n`` best finished hypotheses of each prompt, best first, by beam search.

    ``config``: ``num_beams``, ``length_penalty``, ``early_stopping``, ``n`` (HF's
    ``num_return_sequences``), ``max_new_tokens`` / ``min_new_tokens``, and the logits processors (see
    the module docstring). ``eos_token_ids`` (the model's, with ``config.eos_token_ids``) end a hypothesis
    unless ``config.ignore_eos``; ``config.stop_token_ids`` always do. ``num_beams=1`` is greedy decoding
    (with penalties applied to log-probabilities, as HF's beam search does, not to logits).
    Left-padding aside (lamina's processors never see pad tokens, HF's do), tokens and scores equal
    ``transformers``'.
    """
    cfg = config
    _check(model, prompts, cfg)
    nb, lp, V = cfg.num_beams, cfg.length_penalty, model.config.vocab_size
    eos = set() if cfg.ignore_eos else {*eos_token_ids, *cfg.eos_token_ids}
    stops = sorted(eos | set(cfg.stop_token_ids))
    proc_cfg = dataclasses.replace(cfg, eos_token_ids=sorted(eos))  # min_new_tokens bans them all
    k_top = max(2, 1 + len(stops)) * nb  # HF: enough candidates that num_beams survive all-eos picks
    device = model.tok_emb.weight.device
    stop_ids = torch.tensor(stops, dtype=torch.long, device=device)
    top_mask = torch.arange(k_top, device=device) < nb  # only the first num_beams may finish

    P = len(prompts)
    limit = model.config.max_seq_len
    budget = torch.tensor([min(cfg.max_new_tokens, limit - len(p)) for p in prompts], device=device)
    width = max(int(budget.max()), 1)
    results: list[list[Beam]] = [[Beam([], 0.0, "length") for _ in range(cfg.n)] for _ in prompts]
    live = [b for b in range(P) if budget[b] > 0]  # prompt index of each live prompt
    if not live:
        return results

    # -- prefill one row per live prompt (left-padded); the first step expands each to num_beams rows
    T = max(len(prompts[b]) for b in live)
    ids = torch.zeros(len(live), T, dtype=torch.long)
    mask = torch.zeros(len(live), T, dtype=torch.long)
    for r, b in enumerate(live):
        ids[r, T - len(prompts[b]) :], mask[r, T - len(prompts[b]) :] = torch.tensor(list(prompts[b])), 1
    cache = model.new_cache(len(live) * nb, capacity=T + width)  # room for every beam's row;
    cache.keep(torch.arange(len(live), device=cache.valid.device))  # the prefill: one row per prompt
    logits = model(ids.to(device), attention_mask=mask.to(device), cache=cache, last_only=True)[:, -1]
    rows_per_prompt = 1

    L = len(live)
    budget = budget[live]
    run_seq = torch.full((L, nb, width), -1, dtype=torch.long, device=device)  # generated tokens
    run_scores = torch.zeros(L, nb, device=device)
    run_scores[:, 1:] = _NEG  # identical beams at first: only beam 0's continuations count
    fin_seq = run_seq.clone()
    fin_len = torch.zeros(L, nb, dtype=torch.long, device=device)
    fin_scores = torch.full((L, nb), _NEG, device=device)
    fin_done = torch.zeros(L, nb, dtype=torch.bool, device=device)
    improvable = torch.ones(L, 1, dtype=torch.bool, device=device)  # HF: is_early_stop_heuristic_unsatisfied
    ar = torch.arange(L, device=device)

    for step in range(width):  # `step` tokens generated so far
        # 1. processed log-probabilities (L * nb, V)
        logp = torch.log_softmax(logits.float(), dim=-1)
        if rows_per_prompt == 1:
            logp = logp.repeat_interleave(nb, dim=0)
        history = run_seq[:, :, :step].reshape(L * nb, step).tolist()
        logp = process_logits(
            logp, proc_cfg, prompt_ids=[prompts[b] for b in live for _ in range(nb)], output_ids=history
        )
        # 2. the best k_top continuations over all beams of each prompt
        scores = (logp.view(L, nb, V) + run_scores[:, :, None]).view(L, nb * V)
        top_lp, top_idx = torch.topk(scores, k=k_top)
        src, tok = top_idx // V, top_idx % V  # (L, k_top): source beam, token
        cand = torch.take_along_dim(run_seq, src[:, :, None], dim=1)
        cand[:, :, step] = tok
        hits = torch.isin(tok, stop_ids) | (step + 1 >= budget)[:, None]
        # 3a. the best unfinished ones run on
        run_lp = top_lp + hits.float() * _NEG
        nxt = torch.topk(run_lp, k=nb).indices
        run_seq = torch.take_along_dim(cand, nxt[:, :, None], dim=1)
        run_scores = torch.take_along_dim(run_lp, nxt, dim=1)
        run_src = torch.take_along_dim(src, nxt, dim=1)
        # 3b. finished ones among the first num_beams join the finished hypotheses if good enough
        just = hits & top_mask[None]
        pen = top_lp / ((step + 1) ** lp)
        pen = pen + (fin_done.all(-1, keepdim=True) & cfg.early_stopping).float() * _NEG
        pen = pen + (~improvable).float() * _NEG
        pen = pen + (~just).float() * _NEG
        merged_scores = torch.cat([fin_scores, pen], dim=1)
        best = torch.topk(merged_scores, k=nb).indices
        fin_scores = torch.take_along_dim(merged_scores, best, dim=1)
        fin_seq = torch.take_along_dim(torch.cat([fin_seq, cand], dim=1), best[:, :, None], dim=1)
        new_len = torch.full((L, k_top), step + 1, dtype=torch.long, device=device)
        fin_len = torch.take_along_dim(torch.cat([fin_len, new_len], dim=1), best, dim=1)
        fin_done = torch.take_along_dim(torch.cat([fin_done, just], dim=1), best, dim=1)
        # 4. which prompts are done
        best_running = run_scores[:, :1] / ((step + 1) ** lp)
        worst_finished = torch.where(fin_done, fin_scores.min(dim=1, keepdim=True).values, _NEG)
        improvable = improvable & (best_running > worst_finished).any(dim=-1, keepdim=True)
        done = ~improvable[:, 0] | (fin_done.all(-1) & cfg.early_stopping) | (step + 1 >= budget)
        for i in done.nonzero()[:, 0].tolist():
            results[live[i]] = _finished(fin_seq[i], fin_len[i], fin_scores[i], fin_done[i], stops, cfg.n)
        if bool(done.all()):
            break
        # the cache rows of the beams that run on, for the prompts still going
        go = (~done).nonzero()[:, 0]
        src_rows = ar[:, None] * rows_per_prompt + (run_src if rows_per_prompt > 1 else 0 * run_src)
        cache.keep(src_rows[go].reshape(-1).to(cache.valid.device))
        rows_per_prompt = nb
        live = [live[i] for i in go.tolist()]
        run_seq, run_scores, budget, improvable = run_seq[go], run_scores[go], budget[go], improvable[go]
        fin_seq, fin_len, fin_scores, fin_done = fin_seq[go], fin_len[go], fin_scores[go], fin_done[go]
        L = len(live)
        ar = torch.arange(L, device=device)
        logits = model(run_seq[:, :, step].reshape(L * nb, 1), cache=cache)[:, -1]
    return results


def _finished(
    seq: Tensor, length: Tensor, scores: Tensor, done: Tensor, stops: Sequence[int], n: int
) -> list[Beam]:
    """The n best finished hypotheses of one prompt (already sorted best first) as ``Beam`` s."""
    beams = []
    for j in range(seq.shape[0]):
        if not bool(done[j]):
            continue
        tokens = seq[j, : int(length[j])].tolist()
        stopped = bool(tokens) and tokens[-1] in stops
        beams.append(
            Beam(tokens[:-1] if stopped else tokens, float(scores[j]), "stop" if stopped else "length")
        )
    return beams[:n]
