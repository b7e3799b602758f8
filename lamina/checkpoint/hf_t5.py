"""Hugging Face T5 (``T5ForConditionalGeneration``: T5 v1.0, v1.1, Flan-T5) <-> lamina's encoder-decoder.

A family, as in ``lamina.checkpoint.hf``: ``config.json`` -> ``ModelConfig`` and HF tensor names ->
lamina's, with the inverse maps for export. ``hf.py`` registers it under ``model_type="t5"``.

BART and Marian are not mapped: BART needs learned positions per stack, an embedding norm per stack and
a final-logits bias; Marian's sinusoidal table puts sin and cos in halves (not interleaved) and uses
SiLU; lamina's encoder-decoder has none of these knobs yet.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from lamina.config import GATED_ACTIVATIONS, ModelConfig
from lamina.errors import CheckpointError

StateDict = dict[str, torch.Tensor]

# HF feed_forward_proj -> lamina activation ("gated-gelu" is gelu_new: the tanh approximation)
_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gated-gelu": "geglu_tanh", "gated-silu": "swiglu"}


def t5_config(hf: Mapping[str, Any]) -> ModelConfig:
    """``ModelConfig`` of a HF T5 ``config.json``.

    Output rescaling: ``scale_decoder_outputs`` when the file says so (transformers >= 5), else when the
    embeddings are tied (``tie_word_embeddings`` true, the default: T5 v1.0), as ``transformers`` reads it.
    """
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in _ACTIVATIONS:
        raise CheckpointError(
            f"T5 feed_forward_proj={proj!r} is not supported; lamina maps {', '.join(_ACTIVATIONS)}"
        )
    tied = hf.get("tie_word_embeddings", True) is not False
    dropout = float(hf.get("dropout_rate", 0.1))
    return ModelConfig(
        arch="encoder-decoder",
        vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("n_positions", 512),  # T5 has no position limit: the default cache size
        n_layers=hf["num_layers"],
        n_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        d_model=hf["d_model"],
        n_heads=hf["num_heads"],
        head_dim=hf["d_kv"],
        d_ff=hf["d_ff"],
        activation=_ACTIVATIONS[proj],  # type: ignore[arg-type]
        norm="rmsnorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-6),
        pos_encoding="relative",
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        bias=False,
        scale_attention=False,
        tie_embeddings=tied,
        scale_decoder_outputs=bool(hf.get("scale_decoder_outputs", tied)),
        decoder_start_token_id=hf.get("decoder_start_token_id", hf.get("pad_token_id", 0)) or 0,
        scaled_residual_init=False,
        initializer="t5",  # transformers' T5 init, should the model be re-initialised
        emb_dropout=dropout,
        attn_dropout=dropout,
        resid_dropout=dropout,
    )


def _exportable(cfg: ModelConfig) -> str | None:
    """None when T5 holds ``cfg`` exactly, else what stands in the way."""
    if cfg.pos_encoding != "relative" or cfg.norm != "rmsnorm" or cfg.bias or cfg.scale_attention:
        return "T5 needs relative positions, RMSNorm, no biases and unscaled attention"
    if cfg.norm_placement != "pre" or cfg.scale_embeddings or cfg.activation not in _ACTIVATIONS.values():
        return "T5 needs pre-LN, unscaled embeddings and relu, gelu, geglu_tanh or swiglu"
    if cfg.n_kv_heads != cfg.n_heads:
        return "T5 needs n_kv_heads = n_heads"
    if cfg.copy_attention:
        return "T5 has no copy head (copy_attention)"
    return None


def t5_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The HF ``config.json`` dict of an encoder-decoder ``cfg``.

    Raises CheckpointError when T5 cannot hold the model (e.g. the sinusoidal 2017 Transformer)."""
    why = _exportable(cfg)
    if why is not None:
        raise CheckpointError(
            f"this encoder-decoder has no Hugging Face equivalent lamina can export to: {why}; "
            "keep it as a lamina checkpoint"
        )
    proj = {v: k for k, v in _ACTIVATIONS.items()}[cfg.activation]
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "is_encoder_decoder": True,
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_len,
        "d_model": cfg.d_model,
        "d_kv": cfg.head_dim,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.n_layers,
        "num_decoder_layers": cfg.n_decoder_layers,
        "num_heads": cfg.n_heads,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "dropout_rate": cfg.resid_dropout,
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_factor": 1.0,
        "feed_forward_proj": proj,
        "tie_word_embeddings": cfg.tie_embeddings,
        "scale_decoder_outputs": cfg.scale_decoder_outputs,
        "decoder_start_token_id": cfg.decoder_start_token_id,
        "torch_dtype": "float32",
    }


# per block: HF "layer.N.<sub>" -> lamina, for the encoder (2 sub-layers) and the decoder (3)
_ATTN = {f"{x}.weight": f"{x}_proj.weight" for x in "qkvo"}
_MLP = {"wi.weight": "up_proj.weight", "wi_0.weight": "gate_proj.weight", "wi_1.weight": "up_proj.weight",
        "wo.weight": "down_proj.weight"}  # fmt: skip
_ENC_LAYERS = {"0.SelfAttention.": ("attn.", _ATTN), "0.layer_norm.": ("attn_norm.", None),
               "1.DenseReluDense.": ("mlp.", _MLP), "1.layer_norm.": ("mlp_norm.", None)}  # fmt: skip
_DEC_LAYERS = {"0.SelfAttention.": ("attn.", _ATTN), "0.layer_norm.": ("attn_norm.", None),
               "1.EncDecAttention.": ("cross_attn.", _ATTN), "1.layer_norm.": ("cross_norm.", None),
               "2.DenseReluDense.": ("mlp.", _MLP), "2.layer_norm.": ("mlp_norm.", None)}  # fmt: skip
_TOP = {"shared.weight": "tok_emb.weight", "encoder.final_layer_norm.weight": "encoder_norm.weight",
        "decoder.final_layer_norm.weight": "final_norm.weight", "lm_head.weight": "lm_head.weight",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": "encoder_rel_bias.weight",
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": "rel_bias.weight"}  # fmt: skip
_BLOCK = re.compile(r"^(encoder|decoder)\.block\.(\d+)\.layer\.(.+)$")


def t5_weights(sd: StateDict, cfg: ModelConfig) -> StateDict:
    """HF T5 tensors renamed to lamina's (``encoder_blocks.i``, decoder ``blocks.i``; the relative bias of
    each stack's first layer becomes the stack's ``encoder_rel_bias`` / ``rel_bias``)."""
    out: StateDict = {}
    for name, t in sd.items():
        if name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            continue  # copies of shared.weight
        if name in _TOP:
            out[_TOP[name]] = t
        elif m := _BLOCK.match(name):
            stack, i, rest = m.groups()
            table = _ENC_LAYERS if stack == "encoder" else _DEC_LAYERS
            prefix = "encoder_blocks" if stack == "encoder" else "blocks"
            out[f"{prefix}.{i}.{_lamina_name(rest, table, name)}"] = t
        else:
            raise CheckpointError(f"unexpected T5 tensor {name!r}")
    if "tok_emb.weight" not in out and "encoder.embed_tokens.weight" in sd:
        out["tok_emb.weight"] = sd["encoder.embed_tokens.weight"]
    return out


def _lamina_name(rest: str, table: Mapping[str, tuple[str, dict[str, str] | None]], full: str) -> str:
    for src, (dst, leaf) in table.items():
        if rest.startswith(src):
            tail = rest[len(src) :]
            if leaf is None:
                return dst + tail
            if tail in leaf:
                return dst + leaf[tail]
    raise CheckpointError(f"unexpected T5 tensor {full!r}")


def _hf_name(
    rest: str, table: Mapping[str, tuple[str, dict[str, str] | None]], gated: bool, full: str
) -> str:
    unused = "wi.weight" if gated else "wi_1.weight"  # both are lamina's up_proj
    for src, (dst, leaf) in table.items():
        if rest.startswith(dst):
            tail = rest[len(dst) :]
            if leaf is None:
                return src + tail
            inv = {v: k for k, v in leaf.items() if k != unused}
            if tail in inv:
                return src + inv[tail]
    raise CheckpointError(f"lamina tensor {full!r} has no T5 name")


def t5_hf_weights(sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> StateDict:
    """lamina tensors of an encoder-decoder renamed to HF T5's (the inverse of ``t5_weights``)."""
    inv_top = {v: k for k, v in _TOP.items()}
    gated = cfg.activation in GATED_ACTIVATIONS
    out: StateDict = {}
    for name, t in sd.items():
        if name in inv_top:
            out[inv_top[name]] = t
        elif m := re.match(r"^(encoder_blocks|blocks)\.(\d+)\.(.+)$", name):
            stack, i, rest = m.groups()
            enc = stack == "encoder_blocks"
            hf_rest = _hf_name(rest, _ENC_LAYERS if enc else _DEC_LAYERS, gated, name)
            out[f"{'encoder' if enc else 'decoder'}.block.{i}.layer.{hf_rest}"] = t
        else:
            raise CheckpointError(f"lamina tensor {name!r} has no T5 name")
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return {k: v.contiguous() for k, v in out.items()}
