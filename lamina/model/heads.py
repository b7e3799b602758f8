"""Output heads on top of the transformer's final hidden states, chosen by ``ModelConfig.head``.

- ``lm``: logits over the vocabulary (``Transformer.lm_head``), optionally after BERT's transform
  (``LMHeadTransform``: dense, activation, norm) when ``lm_head_transform`` is set;
- ``none``: the hidden states themselves (sentence embeddings pool them, see ``lamina.embed``);
- ``classify`` / ``regress``: one vector per sequence (``pool_sequence``, then BERT's ``Pooler`` when
  ``pooler`` is set) -> dropout -> ``n_labels`` outputs;
- ``token_classify``: dropout -> ``n_labels`` outputs at every position (tagging, NER).
"""

from __future__ import annotations

import torch
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
