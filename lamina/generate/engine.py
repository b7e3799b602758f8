"""Batched KV-cache decoding with one ``GenerationConfig`` per sequence.

Prompts of any lengths are left-padded into one batch and prefilled together; then every step runs one
token per live sequence. Each sequence has its own sampler (controls and seed), its own stopping
(``max_new_tokens``, eos / ``stop_token_ids`` unless ``ignore_eos``), and leaves the batch when it
finishes: its KV-cache row is dropped, so the remaining rows stop paying for it.

Stop strings, beams, logprobs and continuous admission of new requests build on this loop (next steps
of the generation issue).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lamina.config import GenerationConfig
from lamina.errors import ConfigError
from lamina.generate.sampling import Sampler, sample_batch
from lamina.model.transformer import Transformer
from lamina.tokenizer import Tokenizer

GREEDY = GenerationConfig(temperature=0.0)


@dataclass
class Sequence_:
    """One generated sequence: its prompt, its new tokens, and why it stopped.

    When a stop string ends it, ``tokens`` keeps the token that completed the stop string and ``text`` is
    the output cut at the stop string.
    """

    prompt_index: int
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (eos / stop token / stop string) or "length"
    text: str | None = None  # the decoded output, set when the config has stop strings
    stop_str: str | None = None  # the stop string that ended it


class _StopStrings:
    """Watches one sequence's decoded text for its stop strings, including across token boundaries."""

    def __init__(self, tokenizer: Tokenizer, prompt: Sequence[int], cfg: GenerationConfig) -> None:
        self.stream = tokenizer.decode_stream(skip_special_tokens=True, prompt_ids=prompt)
        self.stops, self.include = list(cfg.stop), cfg.include_stop_str_in_output
        self.text = ""

    def add(self, token: int) -> str | None:
        """Add a token; the stop string now present in the text (the earliest one), or None."""
        before = len(self.text)
        self.text += self.stream.step(token)
        start = max(0, before - max(len(s) for s in self.stops) + 1)  # only where a new match can begin
        hits = [(i, s) for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return None
        i, s = min(hits)
        self.text = self.text[: i + len(s)] if self.include else self.text[:i]
        return s

    def finish(self) -> str:
        """The text once the sequence ended for another reason."""
        self.text += self.stream.finish()
        return self.text


@torch.inference_mode()
def generate_ids(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    configs: GenerationConfig | Sequence[GenerationConfig] = GREEDY,
    eos_token_ids: Sequence[int] = (),
    on_token: Callable[[int, int], None] | None = None,
    tokenizer: Tokenizer | None = None,
) -> list[Sequence_]:
    """Generate from token-id ``prompts``; ``configs`` is one config for all or one per prompt.

    A config with ``n > 1`` gives n sequences for its prompt (each with its own random stream). The
    result lists every sequence, prompt by prompt. ``eos_token_ids`` (the model's) stop a sequence
    unless its config has ``ignore_eos``; its ``stop_token_ids`` always do. The stop token is not part
    of the output. ``on_token(sequence_index, token)`` sees every token as it is produced.
    Stop strings (``cfg.stop``) need the ``tokenizer``: they are matched on the decoded text, across
    token boundaries, and the sequence's ``text`` ends before them (or after, with
    ``include_stop_str_in_output``).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token (empty prompt given)")
    cfgs = [configs] * len(prompts) if isinstance(configs, GenerationConfig) else list(configs)
    if len(cfgs) != len(prompts):
        raise ConfigError(
            f"{len(cfgs)} generation configs for {len(prompts)} prompts: give one, or one per prompt"
        )
    limit = model.config.max_seq_len
    rows: list[tuple[int, Sampler]] = []  # (prompt index, sampler) per sequence
    for i, (p, c) in enumerate(zip(prompts, cfgs, strict=True)):
        if len(p) >= limit:
            raise ConfigError(
                f"prompt of {len(p)} tokens does not fit the context window max_seq_len={limit}"
            )
        rows += [(i, Sampler(c, p, index=k)) for k in range(c.n)]
    seqs = [Sequence_(i) for i, _ in rows]
    samplers = [s for _, s in rows]
    stops = [
        set(s.cfg.stop_token_ids) | (set() if s.cfg.ignore_eos else set(eos_token_ids)) for s in samplers
    ]
    budgets = [min(s.cfg.max_new_tokens, limit - len(prompts[i])) for i, s in rows]
    argmax_only = [not s.cfg.sampling and _plain(s.cfg) for s in samplers]
    if any(s.cfg.stop for s in samplers) and tokenizer is None:
        raise ConfigError(
            "stop strings are matched on text: pass the tokenizer to generate_ids(tokenizer=...)"
        )
    watch = [
        _StopStrings(tokenizer, prompts[i], s.cfg) if s.cfg.stop and tokenizer is not None else None
        for i, s in rows
    ]

    T = max(len(prompts[i]) for i, _ in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for r, (i, _) in enumerate(rows):
        p = prompts[i]
        ids[r, T - len(p) :], mask[r, T - len(p) :] = torch.tensor(list(p)), 1
    device = model.tok_emb.weight.device
    cache = model.new_cache(len(rows), capacity=T + max(budgets, default=0))
    live = [r for r in range(len(rows)) if budgets[r] > 0]  # sequence index of each cache row
    for r in range(len(rows)):
        if budgets[r] <= 0:
            seqs[r].finish_reason = "length"
    if not live:
        return seqs
    if len(live) < len(rows):
        cache.keep(torch.tensor(live))
        ids, mask = ids[live], mask[live]
    logits = model(ids.to(device), attention_mask=mask.to(device), cache=cache, last_only=True)[:, -1]
    while live:
        greedy = all(argmax_only[r] for r in live)
        if greedy:
            next_ids = logits.float().argmax(-1)
        else:
            next_ids = sample_batch(logits.float(), [samplers[r] for r in live])
        keep: list[int] = []
        for row, (r, tok) in enumerate(zip(live, next_ids.tolist(), strict=True)):
            seq = seqs[r]
            if tok in stops[r]:
                seq.finish_reason = "stop"
                continue
            seq.tokens.append(tok)
            if greedy:
                samplers[r].output_ids.append(tok)
            w = watch[r]
            if w is not None and (hit := w.add(tok)) is not None:  # the token completing a stop string
                seq.finish_reason, seq.stop_str, seq.text = "stop", hit, w.text  # is not streamed
                continue
            if on_token is not None:
                on_token(r, tok)
            if len(seq.tokens) >= budgets[r]:
                seq.finish_reason = "length"
                continue
            keep.append(row)
        if len(keep) < len(live):  # finished sequences leave the batch and free their cache rows
            live = [live[k] for k in keep]
            if not live:
                break
            cache.keep(torch.tensor(keep, device=cache.valid.device))
            next_ids = next_ids[keep]
        logits = model(next_ids[:, None], cache=cache)[:, -1]
    for seq, w in zip(seqs, watch, strict=True):
        if w is not None and seq.text is None:
            seq.text = w.finish()
    return seqs


def _plain(cfg: GenerationConfig) -> bool:
    """True when greedy decoding with this config is a bare argmax (no bias, ban or penalty to apply)."""
    return cfg == GenerationConfig(
        temperature=cfg.temperature,
        do_sample=cfg.do_sample,
        max_new_tokens=cfg.max_new_tokens,
        eos_token_ids=cfg.eos_token_ids,
        stop_token_ids=cfg.stop_token_ids,
        ignore_eos=cfg.ignore_eos,
        seed=cfg.seed,
    )


def greedy_decode(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
    on_token: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Greedy continuations of token-id ``prompts``, each stopping at eos or ``max_new_tokens``."""
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=max_new_tokens)
    return [s.tokens for s in generate_ids(model, prompts, cfg, eos_token_ids, on_token)]
