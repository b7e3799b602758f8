"""Output heads on top of the transformer's final hidden states, chosen by ``ModelConfig.head``.

- ``lm``: logits over the vocabulary (``Transformer.lm_head``), optionally after BERT's transform
  (``LMHeadTransform``: dense, activation, norm) when ``lm_head_transform`` is set;
- ``none``: the hidden states themselves (sentence embeddings pool them, see ``lamina.embed``);
- ``classify`` / ``regress``: one vector per sequence (``pool_sequence``, then BERT's ``Pooler`` when
  ``pooler`` is set) -> dropout -> ``n_labels`` outputs;
- ``token_classify``: dropout -> ``n_labels`` outputs at every position (tagging, NER).

An encoder-decoder with ``copy_attention`` adds ``CopyHead`` to its ``lm`` head: a pointer-generator
(See et al. 2017) that mixes copying the source's tokens into the vocabulary distribution.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lamina.config import ModelConfig
from lamina.model.layers import _ACTIVATIONS, make_norm


class LMHeadTransform(nn.Module):
    """BERT's ``cls.predictions.transform``: dense (d_model -> d_model), activation, norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.act = _ACTIVATIONS[cfg.activation]
        self.norm = make_norm(cfg)

    def forward(self, h: Tensor) -> Tensor:
        """(..., d_model) -> (..., d_model)."""
        return self.norm(self.act(self.dense(h)))


class Pooler(nn.Module):
    """BERT's pooler: ``tanh(dense(h))`` of the vector ``pool_sequence`` picked."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, pooled: Tensor) -> Tensor:
        """(B, d_model) -> (B, d_model)."""
        return torch.tanh(self.dense(pooled))


def pool_sequence(h: Tensor, attention_mask: Tensor | None, causal: bool) -> Tensor:
    """One vector per sequence (B, d_model) from hidden states (B, T, d_model).

    An encoder summarises a sequence in its first token ([CLS]); a causal decoder in its last real
    token, the only one that has seen the whole sequence (pads, left or right, are skipped).
    """
    if not causal:
        return h[:, 0]
    T = h.shape[1]
    if attention_mask is None:
        return h[:, -1]
    real = attention_mask.bool()
    last = T - 1 - real.flip(1).int().argmax(1)  # (B,) index of the last real token
    return h[torch.arange(h.shape[0], device=h.device), last]


class TaskHead(nn.Module):
    """Dropout then a linear layer to ``n_labels`` outputs; its weights are named ``classifier``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.n_labels is not None
        self.dropout = nn.Dropout(cfg.resid_dropout)
        self.classifier = nn.Linear(cfg.d_model, cfg.n_labels)

    def forward(self, h: Tensor) -> Tensor:
        """(..., d_model) -> (..., n_labels)."""
        return self.classifier(self.dropout(h))


class CopyHead(nn.Module):
    """The pointer-generator of See, Liu & Manning 2017 ("Get To The Point", eq. 8-9), for an
    encoder-decoder whose source and target share the vocabulary (``ModelConfig.copy_attention``).

    A dedicated single-head attention from the decoder's final hidden state ``h_t`` to the encoder output
    (queries ``q_proj``, keys ``k_proj``, the encoder output itself as values) gives the copy distribution
    ``a_t`` over source positions and the context ``c_t = sum_s a_ts memory_s``;
    ``p_gen = sigmoid(w . [h_t, c_t] + b)``; the output distribution is
    ``p_gen * softmax(logits) + (1 - p_gen) * sum_{s: source_s = w} a_ts``. A head of its own rather than
    the last block's cross-attention: the blocks attend through fused ``scaled_dot_product_attention``,
    which returns no weights, and their heads carry content for the next layer, while this one is
    trained only to point; its keys are cached once per source like the blocks' (``KVCache.cross_k``).
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.p_gen = nn.Linear(2 * d_model, 1)

    def forward(
        self, h: Tensor, logits: Tensor, keys: Tensor, memory: Tensor, source_ids: Tensor, valid: Tensor
    ) -> Tensor:
        """The mixture's log-probabilities (B, T, V), float32, from decoder states ``h`` (B, T, d_model),
        the vocabulary ``logits`` (B, T, V), the copy ``keys`` (B, S, d_model) (``k_proj(memory)``), the
        encoder output ``memory`` (B, S, d_model), the ``source_ids`` (B, S) and the real source tokens
        ``valid`` (B, S) (padding gets no copy mass; a row without real tokens copies from all)."""
        q = self.q_proj(h)
        scores = (q @ keys.transpose(1, 2)).float() / math.sqrt(q.shape[-1])  # (B, T, S)
        valid = valid | ~valid.any(1, keepdim=True)
        attn = scores.masked_fill(~valid[:, None, :], float("-inf")).softmax(-1)
        context = attn.to(memory.dtype) @ memory  # (B, T, d_model)
        gate = self.p_gen(torch.cat([h, context], -1)).float()  # (B, T, 1)
        B, T, S = attn.shape
        copy = attn.new_zeros(B, T, logits.shape[-1])
        copy.scatter_add_(2, source_ids[:, None, :].expand(B, T, S), attn)
        # log(copy) with log 0 = -inf, and no NaN gradient through the zeros (the double where)
        present = copy > 0
        log_copy = torch.where(present, torch.log(torch.where(present, copy, 1.0)), float("-inf"))
        return torch.logaddexp(
            F.logsigmoid(gate) + F.log_softmax(logits.float(), -1), F.logsigmoid(-gate) + log_copy
        )
