"""Losses, one per training objective. Each takes the model and a batch dict and returns
(mean loss, number of targets it averaged over); the trainer knows nothing else about them.

The count is what the trainer weights by: a step's loss is the sum of ``loss x count`` over its
micro-batches (and processes) divided by the step's total count, so every scored token (or, for
per-sequence objectives, every sequence) weighs the same however the targets fall into micro-batches.
A batch with no scored target returns (0.0, 0), finite with zero gradients."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lamina.errors import ConfigError

Batch = dict[str, Tensor]
Objective = Callable[[nn.Module, Batch], tuple[Tensor, int]]


def token_cross_entropy(
    logits: Tensor, targets: Tensor, ignore_index: int = -100, label_smoothing: float = 0.0
) -> tuple[Tensor, int]:
    """Mean cross-entropy of ``logits`` (B, T, V) against ``targets`` (B, T) over the scored tokens (those
    not ``ignore_index``), and their count: the trainer weights micro-batches by it."""
    n = int((targets != ignore_index).sum())
    total = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index,
                            label_smoothing=label_smoothing, reduction="sum")  # fmt: skip
    return total / max(n, 1), n


def causal_lm(label_smoothing: float = 0.0, ignore_index: int = -100) -> Objective:
    """Next-token cross-entropy on ``batch["input_ids"]`` -> ``batch["targets"]`` (ignore_index skipped)."""

    def loss(model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
        logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
        return token_cross_entropy(logits, batch["targets"], ignore_index, label_smoothing)

    return loss


@torch.no_grad()
def unigram_baseline_loss(train_tokens: Tensor, val_tokens: Tensor, vocab_size: int) -> float:
    """Cross-entropy of the validation tokens under the training unigram frequencies (add-one smoothed):
    the loss of a model that ignores context, which a language model must beat."""
    counts = torch.bincount(train_tokens.long(), minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[val_tokens.long()].mean())


def masked_lm(ignore_index: int = -100) -> Objective:
    """Cross-entropy of ``batch["labels"]`` at the masked positions only (the others hold ignore_index);
    the model sees ``batch["input_ids"]`` with the masks in (see ``lamina.data.masking``)."""

    def loss(model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
        logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
        return token_cross_entropy(logits, batch["labels"], ignore_index)

    return loss


def sft(label_smoothing: float = 0.0, ignore_index: int = -100) -> Objective:
    """Next-token cross-entropy of supervised fine-tuning: ``batch["targets"]`` (B, T) holds the next
    token where it carries loss (an answer's tokens and end-of-turn) and ``ignore_index`` elsewhere (see
    ``lamina.data.chat``). ``position_ids`` and ``segment_ids`` (B, T), when the batch has them, reach the
    model, so packed conversations keep their own positions (and, where the model takes ``segment_ids``,
    attend only within themselves)."""

    def loss(model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
        extra = {"segment_ids": batch["segment_ids"]} if "segment_ids" in batch else {}
        logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                       position_ids=batch.get("position_ids"), **extra)  # fmt: skip
        return token_cross_entropy(logits, batch["targets"], ignore_index, label_smoothing)

    return loss


def seq2seq(label_smoothing: float = 0.0, ignore_index: int = -100) -> Objective:
    """Teacher-forced cross-entropy of an encoder-decoder (``arch="encoder-decoder"``): the logits of
    ``batch["decoder_input_ids"]`` (B, T) given the source ``batch["input_ids"]`` (B, S) and its
    ``attention_mask``, against ``batch["labels"]`` (B, T; ignore_index skipped), with label smoothing
    (Szegedy et al. 2016; 0.1 in "Attention Is All You Need"). Batches: ``lamina.data.pairs.PairBatches``
    or ``lamina.data.span_corruption.SpanCorruptionBatches``. A model of another arch raises ConfigError."""

    def loss(model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
        arch = getattr(getattr(getattr(model, "module", model), "config", None), "arch", "encoder-decoder")
        if arch != "encoder-decoder":
            raise ConfigError(
                f"the seq2seq objective needs an encoder-decoder model (arch='encoder-decoder', e.g. preset "
                f"t5-small), got arch={arch!r}"
            )
        logits = model(
            batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            decoder_input_ids=batch["decoder_input_ids"],
        )
        return token_cross_entropy(logits, batch["labels"], ignore_index, label_smoothing)

    return loss
