"""Losses, one per training objective. Each takes the model and a batch dict and returns
(mean loss, number of targets it averaged over); the trainer knows nothing else about them.

The count is what the trainer weights by: a step's loss is the sum of ``loss x count`` over its
micro-batches (and processes) divided by the step's total count, so every scored token (or, for
per-sequence objectives, every sequence) weighs the same however the targets fall into micro-batches.
A batch with no scored target returns (0.0, 0), finite with zero gradients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
    not ``ignore_index``), and their count: the trainer weights micro-batches by it.

    Logits are scored in fp32. bf16 logits (autocast) that need a gradient go through
    ``_ReducedCrossEntropy``, which upcasts a few rows at a time instead of materialising the (B*T, V)
    fp32 copy, its log-softmax and their gradients (issue 23: 2048 x 50304 logits, 0.3 s of a 1.5 s bf16
    step on 2 cores); fp32 logits take ``F.cross_entropy`` as before, and so do fp16 ones (their
    gradient, stored unscaled in fp16, would underflow where the GradScaler's scale keeps it)."""
    n = int((targets != ignore_index).sum())
    if (
        logits.dtype == torch.bfloat16
        and logits.requires_grad
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    ):
        flat = logits.flatten(0, 1)
        rows = max(1, _CHUNK_ELEMENTS // flat.shape[-1])
        total = _ReducedCrossEntropy.apply(flat, targets.flatten(), ignore_index, label_smoothing, rows)
        return total / max(n, 1), n
    total = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index,
                            label_smoothing=label_smoothing, reduction="sum")  # fmt: skip
    return total / max(n, 1), n


_CHUNK_ELEMENTS = 1 << 20  # fp32 elements upcast at a time (4 MB): a chunk's passes stay in cache


class _ReducedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of bf16 logits (N, V) against targets (N,), computed in fp32 ``rows``
    rows at a time; the gradient (softmax - smoothed one-hot, zero on ignored rows) is made in the same
    pass and kept in the logits' dtype, so backward is one multiply by the incoming scalar. Same loss as
    ``F.cross_entropy(logits.float(), ..., reduction="sum")``; the gradient is rounded to the logits'
    dtype once more than that path's (which rounds it when casting back through ``.float()``)."""

    @staticmethod
    def forward(
        ctx: Any, logits: Tensor, targets: Tensor, ignore_index: int, label_smoothing: float, rows: int
    ) -> Tensor:
        v = logits.shape[-1]
        grad = torch.empty_like(logits)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for s in range(0, logits.shape[0], rows):
            x = logits[s : s + rows].float()
            t = targets[s : s + rows]
            keep = t != ignore_index
            index = torch.where(keep, t, 0)[:, None]
            logp = torch.log_softmax(x, dim=-1)
            row_loss = -logp.gather(1, index).squeeze(1)
            if label_smoothing > 0:
                row_loss = (1 - label_smoothing) * row_loss - label_smoothing * logp.mean(-1)
            total += torch.where(keep, row_loss, 0.0).sum()
            p = logp.exp_()  # softmax
            p.scatter_add_(1, index, torch.full_like(index, label_smoothing - 1, dtype=p.dtype))
            if label_smoothing > 0:
                p.sub_(label_smoothing / v)
            p.mul_(keep[:, None])
            grad[s : s + rows] = p
        ctx.save_for_backward(grad)
        ctx.used = False
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.used:  # the gradient was scaled in place by the first backward
            raise RuntimeError("a second backward (retain_graph) through the bf16 cross-entropy is not "
                               "supported: compute the loss again, or in fp32")  # fmt: skip
        ctx.used = True
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_total), None, None, None, None  # in place: no second (N, V) tensor


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
