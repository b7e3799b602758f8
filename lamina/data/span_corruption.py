"""T5 span corruption: the encoder-decoder pretraining objective of Raffel et al. 2020 ("Exploring the Limits
of Transfer Learning with a Unified Text-to-Text Transformer", section 3.1.4), over the token shards of any
folder ``lamina data prepare`` writes.

A window of ``tokens_length`` corpus tokens is split into alternating non-noise and noise spans (starting
with non-noise). Each noise span is replaced in the input by one sentinel token; the target lists each
sentinel followed by the tokens it hid; both end with eos::

    tokens:  The cat sat on the mat and purred loudly
    input:   The cat <extra_id_0> the mat and <extra_id_1> loudly </s>
    target:  <extra_id_0> sat on <extra_id_1> purred </s>

The mask follows the reference exactly: T5's ``random_spans_noise_mask`` (t5/data/preprocessors.py), as
ported to NumPy in transformers' ``examples/flax/language-modeling/run_t5_mlm_flax.py``:
``num_noise_tokens = round(length * noise_density)`` clipped to [1, length - 1],
``num_noise_spans = max(1, round(num_noise_tokens / mean_noise_span_length))``, and the noise and non-noise
tokens are each split into that many non-empty spans uniformly at random. So every window has exactly the
same noise count and span count, and inputs and targets have fixed lengths (``input_and_target_lengths``,
T5's ``random_spans_helper``): no padding. With the defaults (0.15, 3.0) an ``input_length`` of 512 reads
568 corpus tokens per window and gives targets of 114 tokens.

Sentinels. The k-th noise span of a window (k = 0, 1, ...) becomes ``sentinels[k]``: the tokenizer's
``<extra_id_k>`` tokens when it has them (T5's tokenizers: ``<extra_id_0>`` is the last id, 32099),
else the last ids of the vocabulary counting down (``vocab_size - 1 - k``, T5's layout again). Those last
ids are ordinary tokens of a lamina-trained tokenizer, which the corpus then also contains: give such a
tokenizer real sentinel tokens with ``with_sentinel_tokens`` (then train the model on the larger
vocabulary), or build the model with a ``vocab_size`` above the tokenizer's and pass it here, so the
sentinels are ids the tokenizer never produces.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import AddedToken

from lamina.data.batches import TokenShards
from lamina.errors import ConfigError, DataError
from lamina.tokenizer import Tokenizer

__all__ = [
    "SpanCorruptionBatches",
    "SpanCorruptionConfig",
    "corrupt_spans",
    "input_and_target_lengths",
    "num_noise_spans",
    "random_spans_noise_mask",
    "sentinel_ids",
    "with_sentinel_tokens",
]

SENTINEL = "<extra_id_{}>"  # T5's sentinel spelling


@dataclass
class SpanCorruptionConfig:
    """The span-corruption objective's knobs (T5's names and defaults)."""

    noise_density: float = 0.15  # share of each window's tokens hidden, in (0, 1) (T5: 0.15)
    mean_noise_span_length: float = 3.0  # mean tokens per hidden span, >= 1 (T5: 3)
    input_length: int = 512  # encoder tokens per example, sentinels and eos included (T5: 512)

    def __post_init__(self) -> None:
        if not 0.0 < self.noise_density < 1.0:
            raise ConfigError(f"noise_density={self.noise_density} must be in (0, 1) (T5 uses 0.15)")
        if not self.mean_noise_span_length >= 1.0:
            raise ConfigError(
                f"mean_noise_span_length={self.mean_noise_span_length} must be >= 1 (T5 uses 3.0)"
            )
        if not isinstance(self.input_length, int) or self.input_length < 4:
            raise ConfigError(f"input_length={self.input_length!r} must be an integer >= 4")


def random_spans_noise_mask(
    length: int,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    rng: np.random.Generator | np.random.RandomState | None = None,
) -> np.ndarray:
    """(length,) bool: True at the tokens to hide, in alternating spans that start with non-noise.

    The reference algorithm (module docstring) step by step; ``rng`` supplies the two shuffles (a NumPy
    ``Generator``, or a ``RandomState`` to reproduce the reference's ``np.random.shuffle`` draws).
    Raises ``ConfigError`` for ``length`` < 2.
    """
    if length < 2:
        raise ConfigError(f"length={length}: span corruption needs at least 2 tokens")
    rng = np.random.default_rng() if rng is None else rng
    num_noise_tokens = int(np.round(length * noise_density))
    num_noise_tokens = min(max(num_noise_tokens, 1), length - 1)  # some noise and some non-noise
    num_noise_spans = max(int(np.round(num_noise_tokens / mean_noise_span_length)), 1)
    num_nonnoise_tokens = length - num_noise_tokens
    if num_noise_spans > num_nonnoise_tokens:  # a short window: every noise span needs a non-noise one
        num_noise_spans = num_nonnoise_tokens

    def segmentation(num_items: int, num_segments: int) -> np.ndarray:
        """Lengths of ``num_segments`` non-empty segments summing to ``num_items``, uniformly at random."""
        first_in_segment = np.arange(num_items - 1) < (num_segments - 1)
        rng.shuffle(first_in_segment)
        first_in_segment = np.pad(first_in_segment, [[1, 0]])
        segment_id = np.cumsum(first_in_segment)
        return np.bincount(segment_id, minlength=num_segments)

    noise_span_lengths = segmentation(num_noise_tokens, num_noise_spans)
    nonnoise_span_lengths = segmentation(num_nonnoise_tokens, num_noise_spans)
    interleaved = np.stack([nonnoise_span_lengths, noise_span_lengths], axis=1).reshape(-1)
    span_starts = np.cumsum(interleaved)[:-1]
    span_start_indicator = np.zeros(length, dtype=np.int8)
    span_start_indicator[span_starts] = 1
    span_num = np.cumsum(span_start_indicator)
    return np.equal(span_num % 2, 1)


def num_noise_spans(length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0) -> int:
    """How many noise spans (so sentinels) ``random_spans_noise_mask`` makes in ``length`` tokens."""
    noise = min(max(int(np.round(length * noise_density)), 1), length - 1)
    return min(max(int(np.round(noise / mean_noise_span_length)), 1), length - noise)


def input_and_target_lengths(
    input_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> tuple[int, int]:
    """(tokens_length, target_length): the most corpus tokens whose corrupted input (non-noise tokens, one
    sentinel per noise span, eos) fits ``input_length``, and the length of its target (noise tokens, one
    sentinel per span, eos). T5's ``random_spans_helper`` (``compute_input_and_target_lengths`` in
    transformers' run_t5_mlm_flax.py), including its ``noise_density == 0.5`` adjustment."""

    def lengths(tokens_length: int) -> tuple[int, int]:
        noise = round(tokens_length * noise_density)
        spans = round(noise / mean_noise_span_length)
        return tokens_length - noise + spans + 1, noise + spans + 1

    tokens_length = input_length
    while lengths(tokens_length + 1)[0] <= input_length:
        tokens_length += 1
    inputs, targets = lengths(tokens_length)
    if noise_density == 0.5 and targets > inputs:
        tokens_length -= 1
        targets -= 1
    return tokens_length, targets


def sentinel_ids(tokenizer: Tokenizer, n: int, vocab_size: int | None = None) -> list[int]:
    """The ids of the first ``n`` sentinels: ``<extra_id_0>`` ... of the tokenizer when it has them, else
    ``vocab_size - 1``, ``vocab_size - 2``, ... (``vocab_size``: the model's, default the tokenizer's).

    Raises ``DataError`` when the tokenizer has fewer than ``n`` ``<extra_id_k>`` tokens or ``n`` exceeds
    the vocabulary.
    """
    if tokenizer.token_to_id(SENTINEL.format(0)) is not None:
        ids = [tokenizer.token_to_id(SENTINEL.format(k)) for k in range(n)]
        if None in ids:
            have = ids.index(None)
            raise DataError(
                f"the tokenizer has {have} sentinel tokens (<extra_id_0> ...) but windows need {n}; fix: lower "
                "input_length or noise_density, or add sentinels with with_sentinel_tokens"
            )
        return [int(i) for i in ids if i is not None]
    size = vocab_size if vocab_size is not None else len(tokenizer)
    if n >= size:
        raise DataError(f"{n} sentinels do not fit a vocabulary of {size} ids")
    return [size - 1 - k for k in range(n)]


def with_sentinel_tokens(tokenizer: Tokenizer, n: int = 100) -> Tokenizer:
    """A copy of ``tokenizer`` with ``n`` special tokens ``<extra_id_0>`` ... ``<extra_id_{n-1}>`` added as
    T5 lays them out: ``<extra_id_0>`` gets the last id, ``<extra_id_{n-1}>`` the first new one. The
    tokenizer itself when it has ``<extra_id_0>`` already."""
    if tokenizer.token_to_id(SENTINEL.format(0)) is not None:
        return tokenizer
    backend = type(tokenizer.backend).from_str(tokenizer.backend.to_str())
    backend.add_special_tokens([AddedToken(SENTINEL.format(k), special=True) for k in reversed(range(n))])
    t = tokenizer
    return Tokenizer(
        backend, bos_token=t.bos_token, eos_token=t.eos_token, unk_token=t.unk_token,
        pad_token=t.pad_token, mask_token=t.mask_token, chat_template=t.chat_template,
    )  # fmt: skip


def corrupt_spans(
    tokens: np.ndarray, noise_mask: np.ndarray, sentinels: Sequence[int], eos_token_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of ``tokens`` (B, L) under ``noise_mask`` (B, L) bool, both int64 (B, ·).

    Inputs: each noise span replaced by its sentinel, then eos. Targets: each non-noise span replaced by
    a sentinel, i.e. sentinel k followed by noise span k's tokens, then eos (``create_sentinel_ids`` and
    ``filter_input_ids`` of the reference). Masks from ``random_spans_noise_mask`` end with a noise span, so
    inputs and targets hold the same sentinels; a mask that ends with non-noise gives the target one more
    sentinel at its end, as the reference does. Every row must have as many spans as every other (the
    reference's masks do, for equal lengths). Raises ``DataError`` when ``sentinels`` are too few.
    """
    sentinel_table = np.asarray(sentinels, dtype=np.int64)
    tokens = np.asarray(tokens, dtype=np.int64)

    def fuse(hide: np.ndarray) -> np.ndarray:
        start = hide & ~np.roll(hide, 1, axis=-1)
        start[:, 0] = hide[:, 0]
        span = np.cumsum(start, axis=-1) - 1  # the index of the hidden span at each position
        if span.max(initial=-1) >= len(sentinel_table):
            raise DataError(f"a window has {span.max() + 1} spans but only {len(sentinel_table)} sentinels")
        full = np.where(start, sentinel_table[np.clip(span, 0, None)], tokens)
        keep = ~hide | start  # a hidden span keeps only its first position, now its sentinel
        rows = [full[b][keep[b]] for b in range(len(tokens))]
        if len({len(r) for r in rows}) > 1:
            raise DataError("span corruption rows differ in length; every row needs the same span counts")
        out = np.stack(rows) if rows else np.empty((0, 0), dtype=np.int64)
        return np.concatenate([out, np.full((len(out), 1), eos_token_id, dtype=np.int64)], axis=-1)

    mask = np.asarray(noise_mask, dtype=bool)
    return fuse(mask), fuse(~mask)


class SpanCorruptionBatches:
    """Span-corruption batches from token shards: ``{"input_ids", "attention_mask", "decoder_input_ids",
    "labels"}``, LongTensors (B, input_length) for the first two and (B, target_length) for the others.

    Windows are consecutive, non-overlapping runs of ``tokens_length`` tokens of the stream (documents
    packed, their eos ids kept; the tail that fills no window is unused). ``batch(i)`` is a pure function of
    ``i``: epoch ``i // steps_per_epoch`` visits the windows in the order
    ``np.random.default_rng([seed, epoch]).permutation(n_windows)`` and batch ``i``'s masks come from
    ``np.random.default_rng([seed, i])``, so a resumed run sees the same batches. ``eval_batches()`` gives
    every window once, in order, with masks seeded by (seed, window): the same at every evaluation.
    ``attention_mask`` is all ones and labels hold no -100 (lengths are fixed); ``decoder_input_ids`` is
    ``decoder_start_token_id`` then the labels shifted right by one.
    """

    def __init__(
        self,
        tokens: TokenShards,
        tokenizer: Tokenizer,
        batch_size: int,
        config: SpanCorruptionConfig | None = None,
        *,
        vocab_size: int | None = None,
        decoder_start_token_id: int | None = None,
        seed: int = 0,
    ) -> None:
        cfg = config or SpanCorruptionConfig()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be a positive integer")
        if tokenizer.eos_token_id is None:
            raise DataError(
                "span corruption ends inputs and targets with eos; the tokenizer has no eos token"
            )
        self.tokens, self.batch_size, self.seed, self.config = tokens, batch_size, seed, cfg
        self.eos_token_id = tokenizer.eos_token_id
        self.tokens_length, self.target_length = input_and_target_lengths(
            cfg.input_length, cfg.noise_density, cfg.mean_noise_span_length
        )
        self.input_length = cfg.input_length
        if decoder_start_token_id is None:
            choices = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
            decoder_start_token_id = next(i for i in choices if i is not None)
        self.decoder_start_token_id = decoder_start_token_id
        self.n_windows = len(tokens) // self.tokens_length
        if self.n_windows < 1:
            raise DataError(
                f"the split has {len(tokens):,} tokens, fewer than one window of {self.tokens_length} "
                f"(input_length {cfg.input_length} with noise_density {cfg.noise_density}); fix: lower "
                "input_length or add data"
            )
        self.steps_per_epoch = max(1, self.n_windows // batch_size)
        self.sentinels = sentinel_ids(
            tokenizer, num_noise_spans(self.tokens_length, cfg.noise_density, cfg.mean_noise_span_length),
            vocab_size,
        )  # fmt: skip

    @classmethod
    def open(
        cls, folder: str | os.PathLike[str], split: str, batch_size: int, config: SpanCorruptionConfig | None = None,
        **kwargs: object,
    ) -> SpanCorruptionBatches:  # fmt: skip
        """Batches of the ``split`` ("train" or "val") of a folder written by ``lamina data prepare``, with
        the folder's own tokenizer; ``kwargs`` as for the constructor."""
        from lamina.data.corpus import Manifest

        manifest = Manifest.load(folder)
        tokens = TokenShards(manifest.shard_paths(split), manifest.dtype)
        return cls(tokens, manifest.load_tokenizer(), batch_size, config, **kwargs)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _collate(
        self, windows: Sequence[int], rngs: Sequence[np.random.Generator]
    ) -> dict[str, torch.Tensor]:
        L, cfg = self.tokens_length, self.config
        rows = np.stack([np.asarray(self.tokens[w * L : (w + 1) * L], dtype=np.int64) for w in windows])
        mask = np.stack(
            [random_spans_noise_mask(L, cfg.noise_density, cfg.mean_noise_span_length, r) for r in rngs]
        )
        inputs, labels = corrupt_spans(rows, mask, self.sentinels, self.eos_token_id)
        labels_t = torch.from_numpy(labels)
        decoder_input_ids = torch.full_like(labels_t, self.decoder_start_token_id)
        decoder_input_ids[:, 1:] = labels_t[:, :-1]
        input_ids = torch.from_numpy(inputs)
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "decoder_input_ids": decoder_input_ids,
            "labels": labels_t,
        }

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """Training batch ``index`` (see the class docstring)."""
        if index < 0:
            raise ConfigError(f"batch index {index} must be >= 0")
        epoch, k = divmod(index, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
        windows = order[k * self.batch_size : (k + 1) * self.batch_size].tolist()
        rng = np.random.default_rng([self.seed, index])
        return self._collate(windows, [rng] * len(windows))

    def eval_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Every window once, in order, masked the same way at every call."""
        for start in range(0, self.n_windows, self.batch_size):
            windows = list(range(start, min(start + self.batch_size, self.n_windows)))
            yield self._collate(windows, [np.random.default_rng([self.seed, 1 << 20, w]) for w in windows])
