"""Generation with an encoder-decoder (T5, the 2017 Transformer) as a function of token ids.

``generate_seq2seq`` runs its sources on an engine of their own (``lamina.generate.engine.Engine``, which
takes an encoder-decoder's source as the prompt): each source runs through the encoder once, and the
decoder starts every target from ``decoder_start_token_id``, extending it one token at a time with its
self-attention KV cache and the cross-attention keys cached from the encoder output. Every control of
``GenerationConfig`` behaves as for decoder models (sampling with one seeded stream per sequence,
penalties, bans, ``min_new_tokens``, ``n``, logprobs; stop strings and constrained output with a
tokenizer), and beam search (``num_beams`` > 1) is the engine's (``transformers``' semantics).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from lamina.config import GenerationConfig
from lamina.errors import ConfigError
from lamina.generate.engine import generate_ids
from lamina.generate.sequences import TokenLogprob
from lamina.model.transformer import Transformer

if TYPE_CHECKING:
    from lamina.tokenizer import Tokenizer


@dataclass
class Seq2SeqSequence:
    """One generated target: its token ids (the decoder start and a final stop token not included)."""

    token_ids: list[int]
    finish_reason: Literal["stop", "length"]  # stop: eos, a stop token or string; length: max_new_tokens
    score: float | None = None  # beam search: the length-penalised sum of log-probabilities (HF)
    text: str | None = None  # its text, when a tokenizer was given
    logprobs: list[TokenLogprob] | None = None  # per generated token, with config.logprobs


def generate_seq2seq(
    model: Transformer,
    sources: Sequence[Sequence[int]],
    config: GenerationConfig | None = None,
    tokenizer: Tokenizer | None = None,
) -> list[list[Seq2SeqSequence]]:
    """``config.n`` targets for each source (token ids, any lengths): a list per source.

    Sequence j of a source samples with seed ``sequence_seed(config.seed, j)``, whatever else runs in
    the batch. ``tokenizer`` sets each target's ``text`` and is needed for stop strings, constrained
    output and DRY's sequence breakers. Generation stops at ``config.eos_token_ids`` (unless
    ``ignore_eos``) and ``stop_token_ids``. With ``num_beams`` > 1: the ``n`` best beams of each source,
    best first (``score`` set).

    Raises ConfigError for a model that is not an encoder-decoder, an empty source, a control the engine
    refuses (``Engine.submit``), and when a step fails (e.g. every token banned).
    """
    cfg = config or GenerationConfig()
    if model.config.arch != "encoder-decoder":
        raise ConfigError(
            f"generate_seq2seq needs an encoder-decoder (arch='encoder-decoder'), got arch="
            f"{model.config.arch!r}: decoder models generate with lamina.generate"
        )
    if not sources or any(len(s) == 0 for s in sources):
        raise ConfigError("every source needs at least one token (an empty source has nothing to encode)")
    seqs = generate_ids(model, sources, cfg, cfg.eos_token_ids, tokenizer=tokenizer)
    if failed := next((s for s in seqs if s.finish_reason == "error"), None):
        raise ConfigError(f"generation stopped at token {len(failed.tokens)}: {failed.error}")
    out: list[list[Seq2SeqSequence]] = [[] for _ in sources]
    for s in seqs:
        reason: Literal["stop", "length"] = "stop" if s.finish_reason == "stop" else "length"
        out[s.prompt_index].append(Seq2SeqSequence(s.tokens, reason, s.score, s.text, s.logprobs))
    return out
