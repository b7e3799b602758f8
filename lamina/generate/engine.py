"""Batched KV-cache decoding: greedy, or each row sampled with its own ``Sampler`` (config and seed).

Stop strings, beams, streaming objects and continuous batching arrive with the rest of the generation
issue; this loop is what they build on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lamina.errors import ConfigError
from lamina.generate.sampling import Sampler, sample_batch
from lamina.model.transformer import Transformer


def greedy_decode(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
    on_token: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Greedy continuations of token-id ``prompts`` (see ``decode``)."""
    return decode(model, prompts, max_new_tokens, eos_token_ids, on_token=on_token)


@torch.inference_mode()
def decode(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
    samplers: Sequence[Sampler] | None = None,
    on_token: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Continuations of token-id ``prompts`` (any lengths: left-padded into one batch).

    ``samplers`` (one per row, e.g. ``Sampler(GenerationConfig(temperature=0.8, top_k=40, seed=1), p)``)
    pick each row's next token; None is greedy. Each row stops at its first eos token (not included in
    the output) or after ``max_new_tokens``. ``on_token(row, token_id)`` sees every token as it comes.
    """
    if samplers is not None and len(samplers) != len(prompts):
        raise ConfigError(f"{len(samplers)} samplers for {len(prompts)} prompts: give one per prompt")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token (empty prompt given)")
    B, T = len(prompts), max(len(p) for p in prompts)
    limit = model.config.max_seq_len
    if T >= limit:
        raise ConfigError(f"prompt of {T} tokens does not fit the context window max_seq_len={limit}")
    max_new_tokens = min(max_new_tokens, limit - T)
    device = model.tok_emb.weight.device
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(list(p))
        mask[i, T - len(p) :] = 1
    cache = model.new_cache(B, capacity=T + max_new_tokens)
    logits = model(ids.to(device), attention_mask=mask.to(device), cache=cache, last_only=True)
    eos = set(eos_token_ids)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    for step in range(max_new_tokens):
        last = logits[:, -1].float()
        next_ids = last.argmax(-1) if samplers is None else sample_batch(last, samplers)
        for i, tok in enumerate(next_ids.tolist()):
            if done[i]:
                continue
            if tok in eos:
                done[i] = True
                continue
            out[i].append(tok)
            if on_token is not None:
                on_token(i, tok)
        if all(done) or step == max_new_tokens - 1:
            break
        logits = model(next_ids[:, None], cache=cache)
    return out
