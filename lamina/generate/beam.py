"""Beam search with the semantics of ``transformers`` 5.x ``generate(num_beams=..., do_sample=False)``.

A beam-search request is a mode of the engine (``lamina.generate.engine.Engine``): it occupies
``num_beams`` rows of the running batch (a beam group, ``BeamGroup``) and advances one token per engine
step together with the other running requests; after each step the engine reorders the group's KV-cache
rows (``KVCache.keep``) so that row j holds the history of beam j. Each step of a group:

1. log-softmax of the logits, then the logits processors that make sense for beams (``process_logits``:
   logit_bias, bad_words_ids, allowed_token_ids, no_repeat_ngram_size, min_new_tokens, the penalties)
   on those log-probabilities, as HF does;
2. add each beam's running score and take the best ``K = max(2, 1 + number of eos ids) * num_beams``
   continuations over all beams (at the first step only beam 0 counts: the others start at -1e9);
3. a continuation ending in eos, or reaching ``max_new_tokens``, is finished: among the first
   ``num_beams`` of the K it joins the finished hypotheses with score
   ``sum of log-probs / n_generated ** length_penalty`` (``n_generated`` counts the new tokens, eos
   included, not the prompt: HF 5.x), when it beats the worst of them; the best ``num_beams``
   unfinished continuations run on;
4. the group is done when ``early_stopping`` is True and it has ``num_beams`` finished hypotheses, or
   (False) when the best running beam, scored at its current length, cannot beat the worst finished one.
   A done group leaves the batch; its ``n`` best finished hypotheses are the request's sequences.

HF's ``early_stopping="never"`` is not offered (``GenerationConfig.early_stopping`` is a bool).
``beam_search`` runs prompts to the end on an engine of their own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lamina.config import GenerationConfig
from lamina.errors import ConfigError
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


def check_beam_config(cfg: GenerationConfig) -> None:
    """Raise ``ConfigError`` (one line, naming the control) for what beam search cannot do: sampling,
    ``n`` > ``num_beams``, stop strings, structured output, per-token logprobs."""
    if cfg.n > cfg.num_beams:
        raise ConfigError(
            f"n={cfg.n} must be <= num_beams={cfg.num_beams} (beam search returns the n best beams)"
        )
    if cfg.sampling:
        raise ConfigError(
            f"beam search picks the best continuations; it does not sample (do_sample={cfg.do_sample}): "
            "set do_sample=False"
        )
    for name in ("stop", "choices", "json_schema", "regex", "grammar"):
        if getattr(cfg, name):
            raise ConfigError(f"{name}={getattr(cfg, name)!r} is not supported with beam search")
    if cfg.response_format != "text":
        raise ConfigError(f"response_format={cfg.response_format!r} is not supported with beam search")
    if cfg.logprobs or cfg.top_logprobs or cfg.prompt_logprobs is not None:
        raise ConfigError(
            "logprobs / prompt_logprobs are not reported by beam search (a beam's score is its summed "
            "logprob): use num_beams=1 for per-token logprobs"
        )


class BeamGroup:
    """The beam-search state of one request: ``num_beams`` rows of the engine's batch.

    ``advance`` takes the logits of the group's rows and returns, per new beam, the row it continues
    (the engine reorders the KV cache so), or None once the group is done; ``feeds`` are the tokens the
    rows read at the next step; ``best`` the ``n`` best finished hypotheses when done.
    """

    def __init__(
        self,
        cfg: GenerationConfig,
        prompt: Sequence[int],
        eos_token_ids: Sequence[int],
        budget: int,
        device: torch.device,
    ) -> None:
        self.cfg, self.prompt, self.budget = cfg, list(prompt), budget
        nb = self.rows = cfg.num_beams
        eos = set() if cfg.ignore_eos else {*eos_token_ids, *cfg.eos_token_ids}
        self.stops = sorted(eos | set(cfg.stop_token_ids))
        self.proc_cfg = dataclasses.replace(cfg, eos_token_ids=sorted(eos))  # min_new_tokens bans them all
        self.k_top = max(2, 1 + len(self.stops)) * nb  # HF: enough candidates that num_beams survive all-eos
        self.stop_ids = torch.tensor(self.stops, dtype=torch.long, device=device)
        self.top_mask = torch.arange(self.k_top, device=device) < nb  # only the first num_beams may finish
        width = max(budget, 1)
        self.run_seq = torch.full((nb, width), -1, dtype=torch.long, device=device)  # generated tokens
        self.run_scores = torch.zeros(nb, device=device)
        self.run_scores[1:] = _NEG  # identical beams at first: only beam 0's continuations count
        self.fin_seq = self.run_seq.clone()
        self.fin_len = torch.zeros(nb, dtype=torch.long, device=device)
        self.fin_scores = torch.full((nb,), _NEG, device=device)
        self.fin_done = torch.zeros(nb, dtype=torch.bool, device=device)
        self.improvable = True  # HF: is_early_stop_heuristic_unsatisfied
        self.step = 0  # tokens generated so far
        self.feeds: list[int] = []

    def advance(self, logits: Tensor) -> Tensor | None:
        """One step from ``logits`` (rows, V) (one row at the first step, from the prompt's prefill):
        the source row of each new beam (num_beams,), or None when the group is done."""
        cfg, nb, step, lp = self.cfg, self.rows, self.step, self.cfg.length_penalty
        V = logits.shape[-1]
        # 1. processed log-probabilities (nb, V)
        logp = torch.log_softmax(logits.float(), dim=-1)
        if logp.shape[0] == 1:
            logp = logp.expand(nb, V).contiguous()
        history = self.run_seq[:, :step].tolist()
        logp = process_logits(logp, self.proc_cfg, prompt_ids=[self.prompt] * nb, output_ids=history)
        # 2. the best k_top continuations over all beams
        scores = (logp + self.run_scores[:, None]).view(nb * V)
        top_lp, top_idx = torch.topk(scores, k=self.k_top)
        src, tok = top_idx // V, top_idx % V  # (k_top,): source beam, token
        cand = self.run_seq.index_select(0, src)
        cand[:, step] = tok
        hits = torch.isin(tok, self.stop_ids) | (step + 1 >= self.budget)
        # 3a. the best unfinished ones run on
        run_lp = top_lp + hits.float() * _NEG
        nxt = torch.topk(run_lp, k=nb).indices
        self.run_seq, self.run_scores, run_src = cand[nxt], run_lp[nxt], src[nxt]
        # 3b. finished ones among the first num_beams join the finished hypotheses if good enough
        just = hits & self.top_mask
        pen = top_lp / ((step + 1) ** lp)
        if (cfg.early_stopping and bool(self.fin_done.all())) or not self.improvable:
            pen = pen + _NEG
        pen = pen + (~just).float() * _NEG
        merged = torch.cat([self.fin_scores, pen])
        best = torch.topk(merged, k=nb).indices
        self.fin_scores = merged[best]
        self.fin_seq = torch.cat([self.fin_seq, cand])[best]
        new_len = torch.full((self.k_top,), step + 1, dtype=torch.long, device=cand.device)
        self.fin_len = torch.cat([self.fin_len, new_len])[best]
        self.fin_done = torch.cat([self.fin_done, just])[best]
        # 4. is the group done?
        self.step = step + 1
        best_running = float(self.run_scores[0]) / ((step + 1) ** lp)
        worst_finished = torch.where(self.fin_done, self.fin_scores.min(), _NEG)
        self.improvable = self.improvable and bool((best_running > worst_finished).any())
        full = bool(self.fin_done.all())
        if not self.improvable or (cfg.early_stopping and full) or step + 1 >= self.budget:
            return None
        self.feeds = self.run_seq[:, step].tolist()
        return run_src

    def best(self) -> list[Beam]:
        """The ``n`` best finished hypotheses, best first (empty ones, "length", when the budget is 0)."""
        beams = []
        for j in range(self.rows):
            if not bool(self.fin_done[j]):
                continue
            tokens = self.fin_seq[j, : int(self.fin_len[j])].tolist()
            stopped = bool(tokens) and tokens[-1] in self.stops
            reason = "stop" if stopped else "length"
            beams.append(Beam(tokens[:-1] if stopped else tokens, float(self.fin_scores[j]), reason))
        beams = beams[: self.cfg.n]
        return beams + [Beam([], 0.0, "length") for _ in range(self.cfg.n - len(beams))]


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
    ``transformers``'. All prompts decode together on one ``Engine``. Raises ``ConfigError`` as
    ``check_beam_config`` and ``Engine.submit`` do.
    """
    from lamina.generate.engine import Engine  # the engine runs beam groups: imported when used

    if not prompts:
        raise ConfigError("no prompts given")
    check_beam_config(config)
    cfg = config if config.num_beams > 1 else dataclasses.replace(config, num_beams=1)
    engine = Engine(model, None, eos_token_ids, max_batch_size=len(prompts) * cfg.num_beams)
    seqs = [engine._submit(p, cfg, i, beam=True)[1] for i, p in enumerate(prompts)]
    while engine.has_work():
        engine.step()
    return [[Beam(s.tokens, s.score or 0.0, s.finish_reason or "length") for s in group] for group in seqs]
