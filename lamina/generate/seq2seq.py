"""Generation with an encoder-decoder (T5, the 2017 Transformer): the sources run through the encoder
once; the decoder starts every target from ``decoder_start_token_id`` and extends it one token at a time
with its self-attention KV cache and the cross-attention keys cached from the encoder output at the first
step. Tokens are chosen by ``lamina.generate.sampling`` (the same processors in the same order, one
``Sampler`` per sequence with its own seed), so greedy decoding, sampling, penalties, bans,
``min_new_tokens`` and ``n`` behave as they do for decoder models. Beam search (``num_beams`` > 1) runs
``lamina.generate.beam.BeamGroup`` (``transformers``' semantics) per source, its rows reordered in the
decoder's cache after each step.

Not here yet (the engine's part): stop strings, logprobs and constrained decoding.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from lamina.config import GenerationConfig
from lamina.errors import ConfigError
from lamina.generate.beam import BeamGroup, check_beam_config
from lamina.generate.sampling import NEG_INF, Sampler, greedy_is_argmax, sample_batch
from lamina.model.transformer import Transformer

if TYPE_CHECKING:
    from lamina.model.layers import KVCache
    from lamina.tokenizer import Tokenizer


@dataclass
class Seq2SeqSequence:
    """One generated target: its token ids (the decoder start and a final stop token not included)."""

    token_ids: list[int]
    finish_reason: Literal["stop", "length"]  # stop: eos or a stop token; length: max_new_tokens
    score: float | None = None  # beam search: the length-penalised sum of log-probabilities (HF)


# model -> (weight identity, its lm_head weight transposed): see _decoder_logits
_HEAD_T: weakref.WeakKeyDictionary[Transformer, tuple[tuple[int, int, torch.dtype], Tensor]] = (
    weakref.WeakKeyDictionary()
)


def _head_t(model: Transformer) -> Tensor | None:
    """The LM head's weight transposed and contiguous (d_model, V), for a plain ``nn.Linear`` head on
    CPU; None otherwise. On CPU, ``h @ W.T`` with W.T stored contiguous runs 1.3-1.8x faster than
    ``F.linear(h, W)`` for a few rows against a large vocabulary (memory-bound: t5-small's head is 66 MB
    of fp32 and most of a decoding step). Made once per weight version (an in-place update such as an
    optimizer step makes a new one) and held while the model lives: one more copy of the head."""
    head = model.lm_head
    if type(head) is not torch.nn.Linear or head.weight.device.type != "cpu":
        return None
    w = head.weight
    key = (w.data_ptr(), w._version, w.dtype)
    held = _HEAD_T.get(model)
    if held is None or held[0] != key:
        held = (key, w.detach().t().contiguous())
        _HEAD_T[model] = held
    return held[1]


def _decoder_logits(
    model: Transformer, head_t: Tensor | None, step: Tensor, memory: Tensor | None, mask: Tensor | None,
    cache: KVCache,
) -> Tensor:  # fmt: skip
    """Last-position logits (B, V) of one decoding step: ``model.decode(...)[:, -1]``, with the head as a
    matmul against ``head_t`` (``_head_t``) when there is one."""
    if head_t is None:
        return model.decode(step, memory, mask, cache=cache, last_only=True)[:, -1]
    h = model.hidden_states(step, cache=cache, memory=memory, memory_mask=mask)[:, -1]  # (B, d_model)
    if model.lm_transform is not None:
        h = model.lm_transform(h)
    if model.config.scale_decoder_outputs:  # as Transformer._lm_logits
        h = h * model.config.d_model**-0.5
    logits = h @ head_t
    return logits if model.lm_head.bias is None else logits + model.lm_head.bias  # type: ignore[union-attr]


def _check(model: Transformer, cfg: GenerationConfig) -> None:
    if model.config.arch != "encoder-decoder":
        raise ConfigError(
            f"generate_seq2seq needs an encoder-decoder (arch='encoder-decoder'), got arch="
            f"{model.config.arch!r}: decoder models generate with lamina.generate"
        )
    if cfg.num_beams > 1:
        check_beam_config(cfg)
    unsupported = {
        "stop": bool(cfg.stop), "logprobs": bool(cfg.logprobs),
        "response_format": cfg.response_format != "text", "choices": bool(cfg.choices),
        "prompt_logprobs": cfg.prompt_logprobs is not None,
    }  # fmt: skip
    if names := [k for k, on in unsupported.items() if on]:
        raise ConfigError(
            f"{', '.join(names)} not supported by generate_seq2seq yet; leave them at their defaults"
        )


@torch.no_grad()
def generate_seq2seq(
    model: Transformer,
    sources: Sequence[Sequence[int]],
    config: GenerationConfig | None = None,
    tokenizer: Tokenizer | None = None,
) -> list[list[Seq2SeqSequence]]:
    """``config.n`` targets for each source (token ids, any lengths): a list per source.

    The sources are right-padded into one batch (B, S) and encoded once; sequence j of a source samples
    with seed ``sequence_seed(config.seed, j)``. ``tokenizer`` is needed only for DRY's sequence
    breakers. Generation stops at ``eos_token_ids`` (unless ``ignore_eos``) and ``stop_token_ids``.
    With ``num_beams`` > 1: the ``n`` best beams of each source, best first (``score`` set).

    Raises ConfigError for a model that is not an encoder-decoder, an empty source, or a control this
    function does not support yet (stop strings, logprobs, constraints).
    """
    cfg = config or GenerationConfig()
    _check(model, cfg)
    if not sources or any(len(s) == 0 for s in sources):
        raise ConfigError("every source needs at least one token (an empty source has nothing to encode)")
    device = model.tok_emb.weight.device
    S = max(len(s) for s in sources)
    src = torch.zeros(len(sources), S, dtype=torch.long, device=device)
    mask = torch.zeros_like(src)
    for i, s in enumerate(sources):
        src[i, : len(s)] = torch.tensor(list(s), device=device)
        mask[i, : len(s)] = 1
    memory = model.encode(src, mask)  # (B, S, d_model), once
    if cfg.num_beams > 1:
        return _beam_search(model, memory, mask, cfg)
    rows = [i for i in range(len(sources)) for _ in range(cfg.n)]  # each source's n sequences, in order
    memory, mask = memory[rows], mask[rows]  # (B * n, S, d_model)
    start = model.config.decoder_start_token_id
    # the decoder start is the "prompt" the penalties see, as transformers' decoder_input_ids
    samplers = [Sampler(cfg, [start], index=j % cfg.n, tokenizer=tokenizer) for j in range(len(rows))]
    stops = set(cfg.stop_token_ids) | (set() if cfg.ignore_eos else set(cfg.eos_token_ids))
    out: list[Seq2SeqSequence | None] = [None] * len(rows)
    active = list(range(len(rows)))  # sequences still running, in cache row order
    cache = model.new_cache(len(rows), capacity=cfg.max_new_tokens + 1)
    step = torch.full((len(rows), 1), start, dtype=torch.long, device=device)
    head_t = _head_t(model)
    # plain greedy (nothing but min_new_tokens touches the logits): the argmax of the whole batch at once,
    # eos and stop tokens banned before min_new_tokens as the sampler's processor does; every running
    # row has generated the same number of tokens
    plain = greedy_is_argmax(replace(cfg, min_new_tokens=0))
    V = model.config.vocab_size
    banned = [t for t in [*([] if cfg.ignore_eos else cfg.eos_token_ids), *cfg.stop_token_ids] if t < V]
    for n_generated in range(cfg.max_new_tokens):
        first = cache.length == 0
        logits = _decoder_logits(
            model, head_t, step, memory if first else None, mask if first else None, cache
        ).float()  # (B, V)
        if plain:
            if n_generated < cfg.min_new_tokens and banned:
                logits[:, banned] = NEG_INF
            tokens = logits.argmax(-1).tolist()
            for j, token in zip(active, tokens, strict=True):
                samplers[j].accept(token)
        else:
            tokens = sample_batch(logits, [samplers[j] for j in active]).tolist()
        keep = []
        for r, (j, token) in enumerate(zip(active, tokens, strict=True)):
            if token in stops:
                out[j] = Seq2SeqSequence(samplers[j].output_ids[:-1], "stop")
            elif len(samplers[j].output_ids) >= cfg.max_new_tokens:
                out[j] = Seq2SeqSequence(samplers[j].output_ids, "length")
            else:
                keep.append(r)
        if not keep:
            break
        if len(keep) < len(active):  # finished rows leave the batch (their cross keys too)
            cache.keep(torch.tensor(keep))
        active = [active[r] for r in keep]
        step = torch.tensor([[tokens[r]] for r in keep], dtype=torch.long, device=device)
    for j in active:  # max_new_tokens = 0
        if out[j] is None:
            out[j] = Seq2SeqSequence(samplers[j].output_ids, "length")
    done = [s for s in out if s is not None]
    return [done[i * cfg.n : (i + 1) * cfg.n] for i in range(len(sources))]


def _beam_search(
    model: Transformer, memory: Tensor, mask: Tensor, cfg: GenerationConfig
) -> list[list[Seq2SeqSequence]]:
    """Beam search from encoder outputs ``memory`` (G, S, d_model): ``num_beams`` cache rows per source."""
    G, nb, device = memory.shape[0], cfg.num_beams, memory.device
    start = model.config.decoder_start_token_id
    if cfg.max_new_tokens == 0:
        return [[Seq2SeqSequence([], "length", 0.0) for _ in range(cfg.n)] for _ in range(G)]
    groups = [BeamGroup(cfg, [start], (), cfg.max_new_tokens, device) for _ in range(G)]
    rows = [g for g in range(G) for _ in range(nb)]
    memory, mask = memory[rows], mask[rows]  # (G * nb, S, d_model)
    cache = model.new_cache(G * nb, capacity=cfg.max_new_tokens + 1)
    head_t = _head_t(model)
    step = torch.full((G * nb, 1), start, dtype=torch.long, device=device)
    results: list[list[Seq2SeqSequence]] = [[] for _ in range(G)]
    active = list(range(G))  # groups still running, nb cache rows each, in cache order
    while active:
        first = cache.length == 0
        logits = _decoder_logits(
            model, head_t, step, memory if first else None, mask if first else None, cache
        )
        keep: list[int] = []
        feeds: list[int] = []
        running = []
        for k, g in enumerate(active):
            block = logits[k * nb : (k + 1) * nb]  # (nb, V): all beams are the same row at the first step
            src_rows = groups[g].advance(block[:1] if first else block)
            if src_rows is None:
                best = groups[g].best()
                results[g] = [Seq2SeqSequence(b.tokens, b.finish_reason, b.score) for b in best]  # type: ignore[arg-type]
            else:
                keep += (k * nb + src_rows).tolist()
                feeds += groups[g].feeds
                running.append(g)
        if not running:
            break
        cache.keep(torch.tensor(keep))  # row j of each group now holds beam j's history
        active = running
        step = torch.tensor(feeds, dtype=torch.long, device=device)[:, None]
    return results
