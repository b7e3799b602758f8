"""One config-driven transformer: GPT-2, Llama/SmolLM2, BLOOM, BERT and your own designs are ``ModelConfig`` s.

Data flows: token ids -> embeddings (+ learned/sinusoidal positions, + token types) -> n_layers x Block
-> final norm -> output head (``ModelConfig.head``: lm logits tied to the embeddings or not, the hidden
states, or a task head from ``lamina.model.heads``). RoPE and ALiBi act inside attention. A decoder
(``arch="decoder"``) attends causally; an encoder (``arch="encoder"``, BERT) to every real token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lamina.config import ModelConfig
from lamina.model.heads import LMHeadTransform, Pooler, TaskHead, pool_sequence
from lamina.model.layers import (
    MLP,
    Attention,
    KVCache,
    alibi_slopes,
    make_norm,
    rope_cos_sin,
    rope_inv_freq,
    sinusoidal_encoding,
)


class Block(nn.Module):
    """Attention then MLP, each in a residual branch, with the norm before (pre-LN) or after (post-LN)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.pre_norm = cfg.norm_placement == "pre"
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.resid_dropout)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        attn_mask: Tensor | None,
        is_causal: bool,
        cache: KVCache | None,
    ) -> Tensor:
        """(B, T, d_model) -> (B, T, d_model)."""
        if self.pre_norm:
            x = x + self.dropout(self.attn(self.attn_norm(x), rope, attn_mask, is_causal, cache))
            return x + self.dropout(self.mlp(self.mlp_norm(x)))
        x = self.attn_norm(x + self.dropout(self.attn(x, rope, attn_mask, is_causal, cache)))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))


class Transformer(nn.Module):
    """A causal decoder or a bidirectional encoder built from a ``ModelConfig``.

    ``forward(input_ids, attention_mask=None, position_ids=None, cache=None)`` returns logits
    (B, T, vocab_size). ``attention_mask`` (B, T) marks real tokens (1) and padding (0), left or right;
    position ids then skip the pads. With a ``KVCache`` the call appends to the cached sequence
    (decoders only). ``token_type_ids`` (B, T) select segment embeddings when ``type_vocab_size > 0``.
    With a task head, ``forward`` returns (B, n_labels) per sequence or (B, T, n_labels) per token.
    """

    # RoPE frequencies and ALiBi slopes are plain float32 attributes, not buffers, so that
    # ``model.to(torch.bfloat16)`` cannot round them; they follow the device lazily (``_fp32_table``).
    inv_freq: Tensor | None
    slopes: Tensor | None

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos_encoding == "learned" else None
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size else None
        self.emb_norm = make_norm(cfg) if cfg.emb_norm else None
        self.emb_dropout = nn.Dropout(cfg.emb_dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.final_norm = make_norm(cfg) if cfg.norm_placement == "pre" else None
        # the output: one of lm_head (with lm_transform before it for BERT), nothing, or task_head
        self.lm_transform = LMHeadTransform(cfg) if cfg.lm_head_transform else None
        self.lm_head = (
            nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.lm_head_transform) if cfg.head == "lm" else None
        )
        self.pooler = Pooler(cfg) if cfg.pooler else None
        self.task_head = TaskHead(cfg) if cfg.head not in ("lm", "none") else None
        self.tie_weights()
        self.activation_checkpointing = False  # recompute blocks in backward to save memory (training)
        self.weight_format: str | None = None  # set by lamina.model.quant.convert_weights (inference only)
        self.make_position_tables()
        self.reset_parameters()

    def tie_weights(self) -> None:
        """Share the output head's weight with the token embeddings when ``tie_embeddings`` is set."""
        if self.config.tie_embeddings and self.lm_head is not None:
            self.lm_head.weight = self.tok_emb.weight

    def make_position_tables(self) -> None:
        """(Re)compute the float32 RoPE frequencies / ALiBi slopes on the CPU."""
        cfg = self.config
        with torch.device("cpu"):
            self.inv_freq = rope_inv_freq(cfg) if cfg.pos_encoding == "rope" else None
            self.slopes = alibi_slopes(cfg.n_heads) if cfg.pos_encoding == "alibi" else None

    def _fp32_table(self, name: str, device: torch.device) -> Tensor:
        table = getattr(self, name)
        assert table is not None
        if table.device != device:
            table = table.to(device)
            setattr(self, name, table)
        return table

    # -- initialisation ----------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Initialise weights as ``config.initializer`` says; norms to 1, biases to 0."""
        cfg = self.config
        residual_std = (
            cfg.init_std / math.sqrt(2 * cfg.n_layers) if cfg.scaled_residual_init else cfg.init_std
        )
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                is_residual_out = name.endswith(("attn.o_proj", "mlp.down_proj"))
                if cfg.initializer == "normal":
                    nn.init.normal_(module.weight, 0.0, residual_std if is_residual_out else cfg.init_std)
                elif cfg.initializer == "xavier":
                    nn.init.xavier_uniform_(module.weight)
                else:
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif hasattr(module, "weight") and isinstance(module.weight, nn.Parameter):  # norms
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        """Number of parameters (shared tensors counted once)."""
        return sum(p.numel() for p in self.parameters())

    # -- forward -----------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        """What ``config.head`` outputs: logits (B, T, vocab_size) (or (B, 1, vocab_size) for the last
        position with ``last_only``); hidden states (B, T, d_model) for "none"; (B, n_labels) for
        "classify" / "regress"; (B, T, n_labels) for "token_classify"."""
        h = self.hidden_states(input_ids, attention_mask, position_ids, cache, token_type_ids)
        if last_only:
            h = h[:, -1:]
        if self.lm_head is not None:
            if self.lm_transform is not None:
                h = self.lm_transform(h)
            return self.lm_head(h)
        if self.task_head is None:
            return h
        if self.config.head == "token_classify":
            return self.task_head(h)
        return self.task_head(self.pooled(h, attention_mask))

    def pooled(self, h: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """One vector per sequence (B, d_model) from hidden states: first token (encoder) or last real
        token (decoder), through the pooler when the config has one."""
        v = pool_sequence(h, attention_mask, causal=self.config.arch == "decoder")
        return self.pooler(v) if self.pooler is not None else v

    def hidden_states(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        """Final hidden states (B, T, d_model), after the final norm."""
        cfg = self.config
        B, T = input_ids.shape
        if cache is not None and cfg.arch == "encoder":
            raise ValueError("an encoder (arch='encoder') attends in both directions: it takes no KV cache")
        if token_type_ids is not None and self.type_emb is None:
            raise ValueError("token_type_ids given, but this model has no token types (type_vocab_size=0)")
        offset = cache.length if cache is not None else 0
        if cache is not None and offset + T > cache.capacity:
            raise ValueError(f"KV cache full: {offset} + {T} tokens > capacity {cache.capacity}")
        real = attention_mask.bool() if attention_mask is not None else None
        if position_ids is None:
            position_ids = self._default_positions(B, T, real, cache, input_ids.device)
        if cache is not None:  # record the new slots before attention reads them
            sl = slice(offset, offset + T)
            cache.valid[:, sl] = True if real is None else real
            cache.positions[:, sl] = position_ids
            cache.next_pos = cache.next_pos + (T if real is None else real.sum(1))
        compiling = torch.compiler.is_compiling()  # no data-dependent checks then: one graph per shape
        if cfg.pos_encoding == "learned" and not compiling and int(position_ids.max()) >= cfg.max_seq_len:
            raise ValueError(
                f"position {int(position_ids.max())} is past max_seq_len={cfg.max_seq_len} of this model"
            )

        x = self.tok_emb(input_ids)
        if cfg.scale_embeddings:
            x = x * math.sqrt(cfg.d_model)
        if self.pos_emb is not None:
            x = x + self.pos_emb(position_ids)
        elif cfg.pos_encoding == "sinusoidal":
            x = x + sinusoidal_encoding(position_ids, cfg.d_model).to(x.dtype)
        if self.type_emb is not None:  # no token_type_ids: every token is of type 0 (as BERT)
            x = x + (self.type_emb.weight[0] if token_type_ids is None else self.type_emb(token_type_ids))
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        x = self.emb_dropout(x)

        rope = None
        if cfg.pos_encoding == "rope":
            inv_freq = self._fp32_table("inv_freq", x.device)
            if cfg.rope_scaling == "dynamic":
                inv_freq = rope_inv_freq(cfg, seq_len=position_ids.max(dim=1).values + 1)
            rope = rope_cos_sin(inv_freq, position_ids, x.dtype)
        attn_mask, is_causal = self._attention_mask(B, T, real, position_ids, cache, x.dtype)
        for block in self.blocks:
            if self.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, rope, attn_mask, is_causal, None, use_reentrant=False)
            else:
                x = block(x, rope, attn_mask, is_causal, cache)
        if cache is not None:
            cache.length = offset + T
        return self.final_norm(x) if self.final_norm is not None else x

    @staticmethod
    def _default_positions(
        B: int, T: int, real: Tensor | None, cache: KVCache | None, device: torch.device
    ) -> Tensor:
        """Position ids that count only real tokens, continuing from the cache."""
        start = cache.next_pos[:, None] if cache is not None else torch.zeros(B, 1, dtype=torch.long)
        start = start.to(device)
        if real is None:
            return start + torch.arange(T, device=device)
        return start + (real.long().cumsum(1) - 1).clamp(min=0)

    def _attention_mask(
        self,
        B: int,
        T: int,
        real: Tensor | None,
        position_ids: Tensor,
        cache: KVCache | None,
        dtype: torch.dtype,
    ) -> tuple[Tensor | None, bool]:
        """The mask for ``scaled_dot_product_attention``: None (fast causal paths), bool, or float (ALiBi)."""
        compiling = torch.compiler.is_compiling()  # the fast paths' checks would break the graph
        if self.config.arch == "encoder":  # bidirectional: hide padding keys only
            if real is None or (not compiling and bool(real.all())):
                return None, False
            keys = real | ~real.any(1, keepdim=True)  # an all-pad row attends to everything: no NaN
            return keys[:, None, None, :], False  # (B, 1, 1, T)
        offset = cache.length if cache is not None else 0
        S = offset + T
        # the fast paths need a data-dependent check; under torch.compile the explicit mask (same result)
        # keeps the whole forward one graph
        no_pads = not compiling and (
            (real is None or bool(real.all())) and (cache is None or bool(cache.valid[:, :S].all()))
        )
        alibi = self.config.pos_encoding == "alibi"
        if no_pads and not alibi:
            if offset == 0:
                return None, T > 1
            if T == 1:
                return None, False
        device = position_ids.device
        if cache is not None:
            key_valid, key_pos = cache.valid[:, :S], cache.positions[:, :S]
        else:
            key_valid = real if real is not None else torch.ones(B, T, dtype=torch.bool, device=device)
            key_pos = position_ids
        q_slot = torch.arange(offset, S, device=device)[:, None]  # (T, 1)
        k_slot = torch.arange(S, device=device)[None, :]  # (1, S)
        allowed = (k_slot <= q_slot)[None] & key_valid[:, None, :]  # (B, T, S)
        allowed = allowed | (k_slot == q_slot)[None]  # a pad query sees itself: no all-masked rows (NaN)
        if not alibi:
            return allowed[:, None], False  # (B, 1, T, S)
        rel = (key_pos[:, None, :] - position_ids[:, :, None]).to(torch.float32)  # (B, T, S)
        slopes = self._fp32_table("slopes", device)
        bias = slopes[None, :, None, None] * rel[:, None]  # (B, H, T, S)
        return bias.masked_fill(~allowed[:, None], float("-inf")).to(dtype), False

    # -- conveniences ------------------------------------------------------------------------------------
    def new_cache(
        self, batch_size: int, capacity: int | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """A preallocated KV cache on the model's device (capacity defaults to ``max_seq_len``)."""
        p = self.tok_emb.weight
        return KVCache(
            self.config, batch_size, capacity or self.config.max_seq_len, dtype or p.dtype, p.device
        )

    def loss(self, input_ids: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
        """Mean next-token cross-entropy of ``targets`` (B, T) given ``input_ids`` (B, T)."""
        logits = self(input_ids)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)


def set_dropout(model: Transformer, p: float) -> None:
    """Set every dropout of ``model`` (embedding, attention, residual) to ``p``, config included."""
    cfg = model.config
    cfg.emb_dropout = cfg.attn_dropout = cfg.resid_dropout = p
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        elif isinstance(m, Attention):
            m.attn_dropout = p
