"""One config-driven transformer: GPT-2, Llama/SmolLM2, BLOOM, BERT, T5, the 2017 Transformer and your own
designs are ``ModelConfig`` s.

Data flows: token ids -> embeddings (+ learned/sinusoidal positions, + token types) -> n_layers x Block
-> final norm -> output head (``ModelConfig.head``: lm logits tied to the embeddings or not, the hidden
states, or a task head from ``lamina.model.heads``). RoPE, ALiBi and T5's relative bias act inside
attention. A decoder (``arch="decoder"``) attends causally; an encoder (``arch="encoder"``, BERT) to every
real token. An encoder-decoder (T5) runs the source through ``encoder_blocks`` once (``encode``: the
memory), then its decoder ``blocks`` attend causally to the target and, through cross-attention, to the
memory: the same Block with a third sub-layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lamina.config import ModelConfig
from lamina.errors import ConfigError
from lamina.model.heads import CopyHead, LMHeadTransform, Pooler, TaskHead, pool_sequence
from lamina.model.layers import (
    MLP,
    ONEDNN_ERRORS,
    Attention,
    HoldsInferenceCopies,
    KVCache,
    alibi_slopes,
    cross_attention_mask,
    inference_copy,
    inference_linear,
    make_norm,
    onednn_available,
    onednn_failed,
    packed_linear,
    prepack,
    relative_position_bucket,
    rope_inv_freq,
    rope_tables,
    sinusoidal_encoding,
)

DECODE_STEP = "decode_step"  # the inference copy holding lamina.model.aot's compiled decode step


def _identity(x: Tensor) -> Tensor:
    return x


class Block(nn.Module):
    """Attention, (cross-attention to the encoder's memory: decoder blocks of an encoder-decoder,) then MLP,
    each in a residual branch, with the norm before (pre-LN) or after (post-LN)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, cross: bool = False) -> None:
        super().__init__()
        self.pre_norm = cfg.norm_placement == "pre"
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer_idx)
        self.cross_norm = make_norm(cfg) if cross else None
        self.cross_attn = Attention(cfg, layer_idx, cross=True) if cross else None
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
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
    ) -> Tensor:
        """(B, T, d_model) -> (B, T, d_model); ``memory`` (B, S, d_model) and ``memory_mask`` (B, 1, 1, S)
        feed the cross-attention (see ``Attention.cross_forward``)."""
        cross = self.cross_attn
        # dropout is the identity outside training: not calling it saves 2-3 module calls per block and
        # decode step (a few % of a batch-1 int4 step)
        drop = self.dropout if self.training else _identity
        if self.pre_norm:
            x = x + drop(self.attn(self.attn_norm(x), rope, attn_mask, is_causal, cache))
            if cross is not None:
                assert self.cross_norm is not None
                x = x + drop(cross.cross_forward(self.cross_norm(x), memory, memory_mask, cache))
            return x + drop(self.mlp(self.mlp_norm(x)))
        x = self.attn_norm(x + drop(self.attn(x, rope, attn_mask, is_causal, cache)))
        if cross is not None:
            assert self.cross_norm is not None
            x = self.cross_norm(x + drop(cross.cross_forward(x, memory, memory_mask, cache)))
        return self.mlp_norm(x + drop(self.mlp(x)))


class Transformer(HoldsInferenceCopies):
    """A causal decoder or a bidirectional encoder built from a ``ModelConfig``.

    ``forward(input_ids, attention_mask=None, position_ids=None, cache=None)`` returns logits
    (B, T, vocab_size). ``attention_mask`` (B, T) marks real tokens (1) and padding (0), left or right;
    position ids then skip the pads. With a ``KVCache`` the call appends to the cached sequence
    (decoders only). ``token_type_ids`` (B, T) select segment embeddings when ``type_vocab_size > 0``.
    With a task head, ``forward`` returns (B, n_labels) per sequence or (B, T, n_labels) per token.

    An encoder-decoder (``arch="encoder-decoder"``) takes the source as ``input_ids`` / ``attention_mask``
    (B, S) and the target's inputs as ``decoder_input_ids`` (B, T) and returns the decoder's logits
    (B, T, vocab_size); ``encode`` and ``decode`` run the two halves apart (generation encodes once).
    With ``copy_attention`` (``heads.CopyHead``) those "logits" are the log-probabilities of the
    pointer-generator's mixture: their softmax is the mixture itself, so losses and decoding take them as
    they take logits.
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
        relative = cfg.pos_encoding == "relative"  # T5: one bias table per stack, shared by its layers
        enc_dec = cfg.arch == "encoder-decoder"
        self.encoder_blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers)) if enc_dec else None
        self.encoder_norm = make_norm(cfg) if enc_dec and cfg.norm_placement == "pre" else None
        self.encoder_rel_bias = (
            nn.Embedding(cfg.relative_attention_num_buckets, cfg.n_heads) if enc_dec and relative else None
        )
        n_blocks = cfg.n_decoder_layers if enc_dec and cfg.n_decoder_layers else cfg.n_layers
        self.blocks = nn.ModuleList(Block(cfg, i, cross=enc_dec) for i in range(n_blocks))
        self.rel_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.n_heads) if relative else None
        self.final_norm = make_norm(cfg) if cfg.norm_placement == "pre" else None
        # the output: one of lm_head (with lm_transform before it for BERT), nothing, or task_head
        self.lm_transform = LMHeadTransform(cfg) if cfg.lm_head_transform else None
        self.lm_head = (
            nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.lm_head_transform) if cfg.head == "lm" else None
        )
        self.pooler = Pooler(cfg) if cfg.pooler else None
        self.task_head = TaskHead(cfg) if cfg.head not in ("lm", "none") else None
        self.copy_head = CopyHead(cfg.d_model) if cfg.copy_attention else None  # pointer-generator
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
                if cfg.initializer == "t5":
                    nn.init.normal_(module.weight, 0.0, _t5_std(name, cfg))
                elif cfg.initializer == "normal":
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
        segment_ids: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        memory: Tensor | None = None,
    ) -> Tensor:
        """What ``config.head`` outputs: logits (B, T, vocab_size) (or (B, 1, vocab_size) for the last
        position with ``last_only``); hidden states (B, T, d_model) for "none"; (B, n_labels) for
        "classify" / "regress"; (B, T, n_labels) for "token_classify". ``segment_ids``: see
        ``hidden_states``.

        Encoder-decoder: logits (B, T, vocab_size) of ``decoder_input_ids`` (B, T) (its real tokens:
        ``decoder_attention_mask``; ``position_ids`` and ``cache`` are the decoder's) given the source
        ``input_ids`` (B, S) and its ``attention_mask``. The encoder runs unless ``memory`` (B, S, d_model,
        from ``encode``) is given or ``cache`` already holds the cross-attention keys.
        """
        if self.config.arch == "encoder-decoder":
            if decoder_input_ids is None:
                raise ValueError(
                    "an encoder-decoder needs decoder_input_ids (B, T): decoder_start_token_id, then the "
                    "target shifted right"
                )
            if memory is None and (cache is None or not cache.cross_k):
                memory = self.encode(input_ids, attention_mask)
            return self.decode(
                decoder_input_ids,
                memory,
                attention_mask,
                decoder_attention_mask,
                position_ids,
                cache,
                last_only,
                source_ids=input_ids,
            )
        step = self.__dict__.get("_inference_copies", {}).get(DECODE_STEP)  # lamina.model.aot
        plain = (
            attention_mask is None and position_ids is None and token_type_ids is None and segment_ids is None
        )
        if step is not None and plain and not self.training and step.applies(input_ids, cache):
            return step(input_ids, cache)  # one token per row with a KV cache: the compiled decode step
        h = self.hidden_states(input_ids, attention_mask, position_ids, cache, token_type_ids, segment_ids)
        if last_only:
            h = h[:, -1:]
        if self.lm_head is not None:
            return self._lm_logits(h)
        if self.task_head is None:
            return h
        if self.config.head == "token_classify":
            return self.task_head(h)
        return self.task_head(self.pooled(h, attention_mask))

    def _lm_logits(self, h: Tensor) -> Tensor:
        """(B, T, d_model) -> (B, T, vocab_size)."""
        assert self.lm_head is not None
        if self.lm_transform is not None:
            h = self.lm_transform(h)
        if self.config.scale_decoder_outputs:  # T5 v1.0 with its tied embeddings
            h = h * self.config.d_model**-0.5
        small = inference_linear(self, "_head_packed", h, self.lm_head)  # a small head: prepacked
        if small is not None:
            return small
        head_t = self._head_t(h)
        if head_t is None:
            return self.lm_head(h)
        # (B*T, d) @ (d, V) as one 2-D matmul: a non-contiguous (B, T, d) (the last position of a prefill,
        # h[:, -1:]) sent torch.matmul to bmm, which expanded head_t to (B, d, V) and copied it (906 MB
        # for 16 SmolLM2 prompts in bf16)
        logits = (h.reshape(-1, h.shape[-1]) @ head_t).view(*h.shape[:-1], head_t.shape[-1])
        return logits if self.lm_head.bias is None else logits + self.lm_head.bias

    _DECODE_ROWS = 16  # at most this many positions: a decoding step (see _head_t)

    def _head_t(self, h: Tensor) -> Tensor | None:
        """The LM head's weight transposed and contiguous (d_model, V) for a decoding step on CPU without
        autograd (at most ``_DECODE_ROWS`` positions, a plain ``nn.Linear`` head); None otherwise.

        On CPU, ``h @ W.T`` with W.T stored contiguous runs about 2x faster than ``F.linear(h, W)`` for
        one row against a large vocabulary (t5-small's head: 13 -> 5 ms on one thread; a decoding step is
        memory-bound and the head is much of it), 1.3x for 8 rows, nothing by 64. (oneDNN's linear on this
        copy's transpose was faster from 2 rows but gave wrong logits after LoRA GRPO training: removed.) Made
        once per weight version
        and held by the model (``layers.inference_copy``: not deep-copied or pickled; an optimizer step or
        ``load_state_dict`` makes a new one): one more copy of the head, only on models that decode on CPU."""
        head = self.lm_head
        if (
            type(head) is not nn.Linear
            or head.weight.device.type != "cpu"
            or torch.is_grad_enabled()
            or h.shape[:-1].numel() > self._DECODE_ROWS
            or torch.compiler.is_compiling()
            or torch.is_autocast_enabled("cpu")
        ):
            return None
        w = head.weight
        return inference_copy(self, "_head_t", [w], lambda: w.detach().t().contiguous())

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The encoder of an encoder-decoder: source ids (B, S) -> memory (B, S, d_model), after the
        encoder's final norm. ``attention_mask`` (B, S) marks real tokens (positions count only those).

        Raises ValueError for a model that is not an encoder-decoder."""
        if self.encoder_blocks is None:
            raise ValueError(f"encode() is for arch='encoder-decoder' models, not arch={self.config.arch!r}")
        B, S = input_ids.shape
        real = attention_mask.bool() if attention_mask is not None else None
        position_ids = self._default_positions(B, S, real, None, input_ids.device)
        x = self._embed(input_ids, position_ids, None)
        rope = self._rope(position_ids, x.dtype)
        mask, _ = self._attention_mask(
            B, S, real, position_ids, None, x.dtype, causal=False, rel_table=self.encoder_rel_bias
        )
        x = self._run(self.encoder_blocks, x, rope, mask, False, None)
        return self.encoder_norm(x) if self.encoder_norm is not None else x

    def decode(
        self,
        input_ids: Tensor,
        memory: Tensor | None,
        memory_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        source_ids: Tensor | None = None,
    ) -> Tensor:
        """The decoder of an encoder-decoder: logits (B, T, vocab_size) (B, 1, ... with ``last_only``) of
        target ids (B, T) attending to ``memory`` (B, S, d_model) whose real tokens are ``memory_mask``
        (B, S). With a ``cache``, the first call stores the cross-attention keys of ``memory`` (and its
        mask); later calls read them (``memory`` may be None then) and append to the self-attention cache.

        With ``copy_attention``: the pointer-generator's log-probabilities (float32, same shape) instead
        of logits, copying from ``source_ids`` (B, S), the source's token ids (kept in the cache with the
        keys). Raises ``ConfigError`` (a ValueError) when they are needed and missing, before the cache
        is touched.

        One token per row with a cache that holds the cross keys (no ``memory``, mask or positions: every
        step of ``lamina.generate`` after the first) runs the compiled step of ``lamina.model.aot`` when
        one is attached (``lamina.load(compile=True)``).
        """
        step = self.__dict__.get("_inference_copies", {}).get(DECODE_STEP)  # lamina.model.aot
        plain = memory is None and attention_mask is None and position_ids is None and not self.training
        if step is not None and plain and step.applies(input_ids, cache):
            return step(input_ids, cache)  # one token per row, the cross keys cached: the compiled step
        if self.copy_head is not None and not self._copy_keys_cached(cache) and source_ids is None:
            raise ConfigError(
                "copy_attention copies source tokens: decode() needs source_ids (B, S), the source's token ids"
            )
        h = self.hidden_states(
            input_ids, attention_mask, position_ids, cache, memory=memory, memory_mask=memory_mask
        )
        h = h[:, -1:] if last_only else h
        logits = self._rows_logits(h)
        if logits is None:
            logits = self._lm_logits(h)
        if self.copy_head is None:
            return logits
        return self._copy(h, logits, memory, memory_mask, source_ids, cache)

    def _rows_logits(self, h: Tensor) -> Tensor | None:
        """An encoder-decoder's logits (B, T, V) for 2 to ``_DECODE_ROWS`` positions (a batched decoding
        step) through a copy of its LM head prepacked for oneDNN (``layers.prepack``, as the ``fp32``
        format's ``PackedLinear`` layers: ~1.5x faster than MKL on the transposed copy for 8 rows of
        t5-small's head on AMD EPYC, one thread); None where this does not apply (one row: ``_head_t``'s
        matrix-vector product is faster; not float32 on CPU, autograd, autocast, compiling, a head
        transform or another head module). Held as ``layers.inference_copy`` (made again once the weight
        changes): one more copy of the head, made only by an encoder-decoder decoding several rows."""
        head, rows = self.lm_head, h.shape[:-1].numel()
        if (
            rows < 2
            or rows > self._DECODE_ROWS
            or type(head) is not nn.Linear
            or self.lm_transform is not None
            or head.weight.dtype != torch.float32
            or h.dtype != torch.float32
            or head.weight.device.type != "cpu"
            or torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or torch.is_autocast_enabled("cpu")
            or not onednn_available()
        ):
            return None
        w = head.weight
        packed = inference_copy(self, "_head_rows", [w], lambda: prepack(w.detach()))
        if packed is None:
            return None
        if self.config.scale_decoder_outputs:  # as _lm_logits
            h = h * self.config.d_model**-0.5
        try:
            logits = packed_linear(h.reshape(-1, h.shape[-1]).contiguous(), packed, head.bias)
        except ONEDNN_ERRORS:
            onednn_failed()
            return None
        return logits.view(*h.shape[:-1], -1)

    def _copy_keys_cached(self, cache: KVCache | None) -> bool:
        """Whether ``cache`` holds the copy head's keys (after the blocks' cross keys)."""
        return cache is not None and len(cache.cross_k) > len(self.blocks)

    def _copy(
        self,
        h: Tensor,
        logits: Tensor,
        memory: Tensor | None,
        memory_mask: Tensor | None,
        source_ids: Tensor | None,
        cache: KVCache | None,
    ) -> Tensor:
        """The copy head's mixture (B, T, V) for decoder states ``h`` (B, T, d_model); its keys and the
        encoder output are computed once per source and kept after the blocks' in the cache."""
        assert self.copy_head is not None
        if self._copy_keys_cached(cache):
            assert cache is not None
            n = len(self.blocks)
            keys, values = cache.cross_k[n][:, 0], cache.cross_v[n][:, 0]
            source_ids, valid = cache.memory_ids, cache.memory_valid
        else:
            if memory is None:
                raise ConfigError("the copy head needs memory, the output of encode(source)")
            keys, values = self.copy_head.k_proj(memory), memory
            valid = memory_mask.bool() if memory_mask is not None else None
            if cache is not None:
                cache.cross_k.append(keys[:, None])
                cache.cross_v.append(values[:, None])
                cache.memory_ids = source_ids
        if source_ids is None:
            raise ConfigError("the cache holds no source ids for the copy head: prefill it with source_ids")
        if valid is None:
            valid = torch.ones(source_ids.shape, dtype=torch.bool, device=source_ids.device)
        return self.copy_head(h, logits, keys, values, source_ids, valid)

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
        segment_ids: Tensor | None = None,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
    ) -> Tensor:
        """Final hidden states (B, T, d_model), after the final norm (an encoder-decoder: of its decoder).

        ``segment_ids`` (B, T) packs several sequences in a row: a token attends only to tokens of its own
        segment (block-diagonal; causal in a decoder), and default positions restart at each segment
        (pass ``position_ids`` to choose them). Not with a cache. ``memory`` (B, S, d_model) and
        ``memory_mask`` (B, S): the encoder output an encoder-decoder's decoder attends to (see ``decode``).
        """
        cfg = self.config
        B, T = input_ids.shape
        if cache is not None and cfg.arch == "encoder":
            raise ValueError("an encoder (arch='encoder') attends in both directions: it takes no KV cache")
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed sequences) work without a KV cache: pass one or the other")
        enc_dec = cfg.arch == "encoder-decoder"
        if enc_dec and memory is None and (cache is None or not cache.cross_k):
            raise ValueError("the decoder of an encoder-decoder needs memory, the output of encode(source)")
        if token_type_ids is not None and self.type_emb is None:
            raise ValueError("token_type_ids given, but this model has no token types (type_vocab_size=0)")
        offset = cache.length if cache is not None else 0
        if cache is not None and offset + T > cache.capacity:
            raise ValueError(f"KV cache full: {offset} + {T} tokens > capacity {cache.capacity}")
        real = attention_mask.bool() if attention_mask is not None else None
        if position_ids is None and segment_ids is not None:
            position_ids = self._segment_positions(segment_ids)
        elif position_ids is None:
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

        x = self._embed(input_ids, position_ids, token_type_ids)
        rope = self._rope(position_ids, x.dtype)
        attn_mask, is_causal = self._attention_mask(
            B, T, real, position_ids, cache, x.dtype, cfg.arch != "encoder", segment_ids, self.rel_bias
        )
        cross_mask = None  # (B, 1, 1, S) additive, or None when no source slot is padding
        if enc_dec and cache is not None:  # the first call's source mask stays with the cross keys
            if not cache.cross_k:
                cache.memory_valid = memory_mask.bool() if memory_mask is not None else None
            cross_mask = (
                cross_attention_mask(cache.memory_valid, x.dtype, check_all=False)
                if compiling
                else cache.cross_mask(x.dtype)
            )
        elif enc_dec:
            cross_mask = cross_attention_mask(memory_mask, x.dtype, check_all=not compiling)
        x = self._run(self.blocks, x, rope, attn_mask, is_causal, cache, memory, cross_mask)
        if cache is not None:
            cache.length = offset + T
        return self.final_norm(x) if self.final_norm is not None else x

    def _embed(self, input_ids: Tensor, position_ids: Tensor, token_type_ids: Tensor | None) -> Tensor:
        """Token (+ position, + type) embeddings (B, T, d_model), normed and dropped out as configured."""
        cfg = self.config
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
        return self.emb_dropout(x)

    def _rope(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        """RoPE's cos and sin tables for ``position_ids`` (B, T), or None without RoPE."""
        cfg = self.config
        if cfg.pos_encoding != "rope":
            return None
        inv_freq = self._fp32_table("inv_freq", position_ids.device)
        if cfg.rope_scaling == "dynamic":
            inv_freq = rope_inv_freq(cfg, seq_len=position_ids.max(dim=1).values + 1)
        return rope_tables(inv_freq, position_ids, dtype)

    def _run(
        self,
        blocks: nn.ModuleList,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        attn_mask: Tensor | None,
        is_causal: bool,
        cache: KVCache | None,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
    ) -> Tensor:
        """x (B, T, d_model) through a stack of blocks (recomputed in backward with activation checkpointing)."""
        for block in blocks:
            if self.activation_checkpointing and self.training and cache is None:
                x = checkpoint(
                    block, x, rope, attn_mask, is_causal, None, memory, memory_mask, use_reentrant=False
                )
            else:
                x = block(x, rope, attn_mask, is_causal, cache, memory, memory_mask)
        return x

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

    @staticmethod
    def _segment_positions(segment_ids: Tensor) -> Tensor:
        """Positions (B, T) that restart at 0 where ``segment_ids`` (B, T) changes."""
        idx = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
        starts = torch.ones_like(segment_ids, dtype=torch.bool)
        starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        return idx - torch.where(starts, idx, 0).cummax(1).values

    def _attention_mask(
        self,
        B: int,
        T: int,
        real: Tensor | None,
        position_ids: Tensor,
        cache: KVCache | None,
        dtype: torch.dtype,
        causal: bool = True,
        segment_ids: Tensor | None = None,
        rel_table: nn.Embedding | None = None,
    ) -> tuple[Tensor | None, bool]:
        """The mask for ``scaled_dot_product_attention``: None (fast causal paths), bool, or float (ALiBi,
        T5's relative bias from ``rel_table``: (B, H, T, S)). ``segment_ids`` (B, T): block-diagonal."""
        compiling = torch.compiler.is_compiling()  # the fast paths' checks would break the graph
        if not causal:  # bidirectional: hide padding keys only
            plain = segment_ids is None and rel_table is None
            if plain and (real is None or (not compiling and bool(real.all()))):
                return None, False
            if real is None:
                real = torch.ones(B, T, dtype=torch.bool, device=position_ids.device)
            keys = real | ~real.any(1, keepdim=True)  # an all-pad row attends to everything: no NaN
            if plain:
                return keys[:, None, None, :], False  # (B, 1, 1, T)
            allowed = keys[:, None, :].expand(B, T, T)  # (B, T, T)
            if segment_ids is not None:
                same = segment_ids[:, :, None] == segment_ids[:, None, :]
                allowed = (allowed & same) | torch.eye(T, dtype=torch.bool, device=keys.device)
            if rel_table is None:
                return allowed[:, None], False  # (B, 1, T, T)
            bias = self._relative_bias(rel_table, position_ids, position_ids, bidirectional=True)
            return bias.masked_fill(~allowed[:, None], float("-inf")).to(dtype), False
        offset = cache.length if cache is not None else 0
        S = offset + T
        # the fast paths need a data-dependent check; under torch.compile the explicit mask (same result)
        # keeps the whole forward one graph
        no_pads = not compiling and (
            (real is None or bool(real.all())) and (cache is None or bool(cache.valid[:, :S].all()))
        )
        alibi = self.config.pos_encoding == "alibi"
        biased = alibi or rel_table is not None
        if no_pads and not biased and segment_ids is None:
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
        if segment_ids is not None:  # no cache here: S == T
            allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
        allowed = allowed | (k_slot == q_slot)[None]  # a pad query sees itself: no all-masked rows (NaN)
        if not biased:
            return allowed[:, None], False  # (B, 1, T, S)
        if rel_table is not None:
            bias = self._relative_bias(rel_table, position_ids, key_pos, bidirectional=False)
        else:
            rel = (key_pos[:, None, :] - position_ids[:, :, None]).to(torch.float32)  # (B, T, S)
            slopes = self._fp32_table("slopes", device)
            bias = slopes[None, :, None, None] * rel[:, None]  # (B, H, T, S)
        return bias.masked_fill(~allowed[:, None], float("-inf")).to(dtype), False

    def _relative_bias(
        self, table: nn.Embedding, q_pos: Tensor, k_pos: Tensor, bidirectional: bool
    ) -> Tensor:
        """T5's position bias (B, H, T, S) from query positions (B, T) and key positions (B, S)."""
        cfg = self.config
        rel = k_pos[:, None, :] - q_pos[:, :, None]  # (B, T, S)
        buckets = relative_position_bucket(
            rel, bidirectional, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        )
        return table(buckets).permute(0, 3, 1, 2).float()  # (B, H, T, S)

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


def _t5_std(name: str, cfg: ModelConfig) -> float:
    """The std of ``initializer="t5"`` for the weight of module ``name``: transformers'
    ``T5PreTrainedModel._init_weights`` (initializer_factor 1): embeddings and the LM head 1, queries
    (d_model * head_dim)^-0.5, keys, values, up/gate projections and relative biases d_model^-0.5, attention
    outputs (n_heads * head_dim)^-0.5, down projections d_ff^-0.5. With T5's unscaled attention and
    ``scale_decoder_outputs`` the logits start with std ~1 (0.02 everywhere starts them at ~0.02, and a
    model trained from scratch spends hundreds of steps growing them)."""
    head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
    if name.endswith("q_proj"):
        return float((cfg.d_model * head_dim) ** -0.5)
    if name.endswith("o_proj"):
        return float((cfg.n_heads * head_dim) ** -0.5)
    if name.endswith("down_proj"):
        return float((cfg.d_ff or 4 * cfg.d_model) ** -0.5)
    if name in ("tok_emb", "lm_head"):
        return 1.0
    return float(cfg.d_model**-0.5)
