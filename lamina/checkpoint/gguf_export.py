"""lamina -> GGUF: a model written as one llama.cpp file (``export_gguf``), with lamina's own quantizers.

The container is written by the ``gguf`` package's ``GGUFWriter`` (llama.cpp's own Python writer); what
goes in is decided here:

- the architecture: ``llama`` for RoPE + RMSNorm + SwiGLU pre-LN decoders (Llama, SmolLM, Mistral without
  sliding windows; GQA and biases included), ``gpt2`` for learned positions + LayerNorm + GELU pre-LN
  decoders. Anything llama.cpp has no field for (post-LN, sinusoidal or relative positions, ALiBi,
  encoders, encoder-decoders, task heads, an embedding norm or scale) is refused in one line naming the
  knob (``gguf_architecture``).
- the tensors: the Hugging Face names of the same family (``hf_state_dict_from_lamina``) mapped to GGUF
  names by the inverse of the import's tables; Llama q/k rows are permuted into ggml's RoPE layout
  (convert_hf_to_gguf.py's ``LlamaModel.permute``; the import undoes it with ``_reverse_qk_permute``).
- the metadata llama.cpp reads: context length, sizes, head counts, RoPE base and linear scaling, norm
  epsilon, the tokenizer (byte-level BPE as ``tokenizer.ggml.model = "gpt2"`` with tokens, types and
  merges), the special ids and the chat template. A model read from a GGUF file keeps that file's
  tokenizer keys verbatim.

Quant types (``GGUFQuant``): ``f32``, ``f16``, ``bf16``, ``q8_0``, ``q4_0``, ``q4_1`` (``quantize``, bit
for bit what ``gguf.quants`` writes), ``q4_k`` and ``q6_k`` (bit for bit llama.cpp's
``quantize_row_q4_K_ref`` / ``quantize_row_q6_K_ref``, which gguf.quants lacks; the tests call the ones in
llama.cpp's libggml-base), and ``keep``: an imported GGUF file's tensors re-written with their own types
and raw blocks, unchanged (read again from the source file). 1-D tensors (norms, biases) stay F32, as
llama.cpp's converter keeps them; a matrix whose rows are not a whole number of blocks is written as F16.
(llama-quantize's Q4_K_M/Q6_K use an importance matrix when given one, and Q4_K_M mixes types per tensor;
lamina writes the plain reference quantization of one type.)
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import torch

from lamina.checkpoint.gguf import (
    _GPT2_GLOBAL_NAMES,
    _GPT2_LAYER_NAMES,
    _LLAMA_GLOBAL_NAMES,
    _LLAMA_LAYER_NAMES,
    dequantize,
    read_gguf,
)
from lamina.checkpoint.hf import hf_state_dict_from_lamina
from lamina.checkpoint.lamina import weights_for_saving
from lamina.config import GenerationConfig, ModelConfig
from lamina.errors import CheckpointError, ConfigError
from lamina.model.transformer import Transformer

if TYPE_CHECKING:
    from lamina.checkpoint.load import LoadedModel
    from lamina.tokenizer import Tokenizer

GGUFQuant = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k", "q6_k", "keep"]
GGUF_QUANTS: tuple[str, ...] = get_args(GGUFQuant)
DEFAULT_GGUF_QUANT: GGUFQuant = "f16"  # what convert_hf_to_gguf.py writes by default

# GGML type ids (ggml.h) and llama.cpp's general.file_type (llama.h, enum llama_ftype) per quant type
_QTYPE = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3, "q4_k": 12, "q6_k": 14}
_FILE_TYPE = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2, "q4_1": 3, "q4_k": 15, "q6_k": 18}
_BLOCK = {"q8_0": 32, "q4_0": 32, "q4_1": 32, "q4_k": 256, "q6_k": 256}
# a K-quant's type for rows that are not whole 256-blocks (llama.cpp falls back Q4_K -> Q5_0 and Q6_K ->
# Q8_0; lamina writes no Q5_0, so Q4_K -> Q4_1, its nearest 32-block type of the same bits)
_FALLBACK = {"q4_k": "q4_1", "q6_k": "q8_0"}

# GGUF token types (llama.cpp's llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED = 1, 2, 3, 4, 5


# -- quantizers ----------------------------------------------------------------------------------------------
# Each takes (n_blocks, block_size) float32 and returns (n_blocks, type_size) uint8 blocks in ggml's
# layout (see the matching _dq_* in lamina.checkpoint.gguf). The arithmetic is float32 in the order of
# gguf.quants (the reference: ggml-quants.c's quantize_row_*_ref), so the bytes are identical.


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C's ``roundf`` (halves away from zero), exact in float32: ``x + 0.5`` would round 0.49999997 up."""
    a = np.abs(x)
    whole = np.floor(a)
    return np.copysign(whole + np.floor(2 * (a - whole)), x)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) values in 0..15 -> (n, 16) bytes: element i < 16 low nibble of byte i, i >= 16 high nibble."""
    q = q.astype(np.uint8)
    return q[:, :16] | (q[:, 16:] << np.uint8(4))


def _q_q8_0(x: np.ndarray) -> np.ndarray:
    d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
    q = _round_half_away(x * _inverse(d)).astype(np.int8)
    return np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)


def _q_q4_0(x: np.ndarray) -> np.ndarray:
    peak = np.take_along_axis(x, np.abs(x).argmax(axis=1, keepdims=True), axis=1)  # signed, largest |x|
    d = peak / np.float32(-8)
    q = np.trunc(x * _inverse(d) + np.float32(8.5)).astype(np.uint8).clip(0, 15)
    return np.concatenate([d.astype(np.float16).view(np.uint8), _pack_nibbles(q)], axis=1)


def _q_q4_1(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    d = (hi - lo) / np.float32(15)
    q = np.trunc((x - lo) * _inverse(d) + np.float32(0.5)).astype(np.uint8).clip(0, 15)
    scales = [d.astype(np.float16).view(np.uint8), lo.astype(np.float16).view(np.uint8)]
    return np.concatenate([*scales, _pack_nibbles(q)], axis=1)


def _q_bf16(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bits, round to nearest even; NaNs stay quiet NaNs (ggml's ggml_compute_fp32_to_bf16)."""
    n = x.view(np.uint32)
    n = np.where((n & 0x7FFFFFFF) > 0x7F800000, (n & np.uint32(0xFFFF0000)) | np.uint32(64 << 16), n)
    return ((n.astype(np.uint64) + (0x7FFF + ((n >> 16) & 1))) >> 16).astype(np.uint16).view(np.uint8)


def _rint(x: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: float32 rounded half to even (it adds 1.5 * 2**23), as int32."""
    return np.rint(x).astype(np.int32)


def _q6_sub_scales(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's ``make_qx_quants(16, 32, x, L, rmse_type=1)`` on (n, 16) sub-blocks: the scale that
    minimises the x**2-weighted squared error over 19 candidate inverse scales, and its codes L (0..63).

    Sums run element by element in float32 (the C loop's order, without fused multiply-adds), so ties
    and roundings match.
    """
    nmax = np.float32(32)
    n = x.shape[0]
    at = np.abs(x).argmax(axis=1)
    peak = x[np.arange(n), at]  # signed, largest |x| (first on ties)
    zero = np.abs(peak) < np.float32(1e-15)
    peak = np.where(zero, np.float32(1), peak)
    w = x * x
    wx = w * x

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        q = np.clip(_rint(iscale[:, None] * x), -32, 31)
        ql = q.astype(np.float32)
        sumlx = np.cumsum(wx * ql, axis=1, dtype=np.float32)[:, -1]  # cumsum adds in order, as the C loop
        suml2 = np.cumsum(w * ql * ql, axis=1, dtype=np.float32)[:, -1]
        return q, sumlx, suml2

    q, sumlx, suml2 = trial(-nmax / peak)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, np.float32(0)).astype(np.float32)
    best = scale * sumlx
    for step in (-9, -8, -7, -6, -5, -4, -3, -2, -1, 1, 2, 3, 4, 5, 6, 7, 8, 9):
        q2, lx, l2 = trial(-(nmax + np.float32(0.1) * np.float32(step)) / peak)
        better = (l2 > 0) & (lx * lx > best * l2)
        q = np.where(better[:, None], q2, q)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(better, lx / l2, scale).astype(np.float32)
        best = np.where(better, scale * lx, best).astype(np.float32)
    return np.where(zero, np.float32(0), scale), np.where(zero[:, None], 0, q + 32)


def _q_q6_k(x: np.ndarray) -> np.ndarray:
    """ggml's ``quantize_row_q6_K_ref`` on (n, 256) super-blocks: 16 sub-blocks of 16 with int8 scales
    under one fp16 ``d``, 6-bit codes (low 4 bits in ``ql``, high 2 in ``qh``)."""
    n = x.shape[0]
    sub = x.reshape(-1, 16)
    scales, codes = _q6_sub_scales(sub)
    scales, codes = scales.reshape(n, 16), codes.reshape(n, 16, 16)
    at = np.abs(scales).argmax(axis=1)
    top = scales[np.arange(n), at]
    empty = np.abs(top) < np.float32(1e-15)
    iscale = np.float32(-128) / np.where(empty, np.float32(1), top)
    d16 = (np.float32(1) / iscale).astype(np.float16)
    sc = np.minimum(127, _rint(iscale[:, None] * scales)).astype(np.int8)
    d = d16.astype(np.float32)[:, None] * sc.astype(np.float32)  # (n, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        fresh = np.clip(_rint(x.reshape(n, 16, 16) / d[..., None]), -32, 31) + 32
    codes = (
        np.where((d != 0)[..., None], fresh, codes).reshape(n, 2, 4, 32).astype(np.uint8)
    )  # (n, half, t, l)
    ql = np.concatenate([codes[:, :, 0] & 15 | (codes[:, :, 2] & 15) << 4,
                         codes[:, :, 1] & 15 | (codes[:, :, 3] & 15) << 4], axis=2)  # fmt: skip
    qh = (
        (codes[:, :, 0] >> 4)
        | (codes[:, :, 1] >> 4) << 2
        | (codes[:, :, 2] >> 4) << 4
        | (codes[:, :, 3] >> 4) << 6
    )
    out = np.concatenate(
        [ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), d16.reshape(n, 1).view(np.uint8)], axis=1
    )
    out[empty] = 0
    return out


def _seq_sum(a: np.ndarray) -> np.ndarray:
    """Row sums added left to right in float32, as a C loop adds (numpy's sum is pairwise)."""
    return np.cumsum(a, axis=1, dtype=np.float32)[:, -1]


def _q4k_sub_scales(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's ``make_qkx2_quants(32, 15, x, w, L, &min, Laux, -1, 0.1, 20, false)`` on (n, 32) sub-blocks
    with Q4_K's weights ``w = rms(x) + |x|``: an affine 4-bit grid (scale, min <= 0) chosen among 21
    candidate scales by weighted squared error. Returns (scale, -min, codes 0..15)."""
    nmax = np.float32(15)
    w = np.sqrt(_seq_sum(x * x) / np.float32(32))[:, None] + np.abs(x)
    lo = np.minimum(x.min(axis=1), np.float32(0))
    hi = x.max(axis=1)
    flat = hi == lo
    span = np.where(flat, np.float32(1), hi - lo)
    sum_w, sum_x = _seq_sum(w), _seq_sum(w * x)

    def codes(iscale: np.ndarray, mn: np.ndarray) -> np.ndarray:
        return np.clip(_rint(iscale[:, None] * (x - mn[:, None])), 0, 15)

    def error(scale: np.ndarray, mn: np.ndarray, q: np.ndarray) -> np.ndarray:
        diff = scale[:, None] * q.astype(np.float32) + mn[:, None] - x
        return _seq_sum(w * (diff * diff))

    iscale = nmax / span
    scale, mn = np.float32(1) / iscale, lo
    q = codes(iscale, mn)
    best = error(scale, mn, q)
    for step in range(21):  # the grid follows the best min so far, as in the C loop
        span = np.where(flat, np.float32(1), hi - mn)
        q2 = codes((np.float32(-1) + np.float32(0.1) * np.float32(step) + nmax) / span, mn)
        ql = q2.astype(np.float32)
        wl = w * ql
        sum_l, sum_l2, sum_xl = _seq_sum(wl), _seq_sum(wl * ql), _seq_sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        with np.errstate(divide="ignore", invalid="ignore"):
            s2 = (sum_w * sum_xl - sum_x * sum_l) / det
            m2 = (sum_l2 * sum_x - sum_l * sum_xl) / det
            clipped = m2 > 0
            s2 = np.where(clipped, sum_xl / sum_l2, s2)
        m2 = np.where(clipped, np.float32(0), m2)
        better = (det > 0) & (error(s2, m2, q2) < best)
        q = np.where(better[:, None], q2, q)
        best = np.where(better, error(s2, m2, q2), best)
        scale, mn = np.where(better, s2, scale), np.where(better, m2, mn)
    scale = np.where(flat, np.float32(0), scale).astype(np.float32)
    return scale, (-mn).astype(np.float32), np.where(flat[:, None], 0, q)


def _q_q4_k(x: np.ndarray) -> np.ndarray:
    """ggml's ``quantize_row_q4_K_ref`` on (n, 256) super-blocks: 8 sub-blocks of 32, each with a 6-bit
    scale and min under fp16 ``d`` and ``dmin``, 4-bit codes."""
    n = x.shape[0]
    scales, mins, q = _q4k_sub_scales(x.reshape(-1, 32))
    scales, mins, q = scales.reshape(n, 8), mins.reshape(n, 8), q.reshape(n, 8, 32)
    top_s = np.maximum(scales.max(axis=1), np.float32(0))
    top_m = np.maximum(mins.max(axis=1), np.float32(0))
    with np.errstate(divide="ignore"):
        inv_s = np.where(top_s > 0, np.float32(63) / top_s, np.float32(0))
        inv_m = np.where(top_m > 0, np.float32(63) / top_m, np.float32(0))
    ls = np.minimum(_rint(inv_s[:, None] * scales) & 0xFF, 63).astype(np.uint8)  # C: uint8_t, then MIN
    lm = np.minimum(_rint(inv_m[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    packed = np.concatenate(
        [
            ls[:, :4] | (ls[:, 4:] >> 4) << 6,
            lm[:, :4] | (lm[:, 4:] >> 4) << 6,
            (ls[:, 4:] & 15) | (lm[:, 4:] & 15) << 4,
        ],
        axis=1,
    )
    d16 = (top_s / np.float32(63)).astype(np.float16)
    m16 = (top_m / np.float32(63)).astype(np.float16)
    d = d16.astype(np.float32)[:, None] * ls.astype(np.float32)  # (n, 8)
    dm = m16.astype(np.float32)[:, None] * lm.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        fresh = np.clip(_rint((x.reshape(n, 8, 32) + dm[..., None]) / d[..., None]), 0, 15)
    q = np.where((d != 0)[..., None], fresh, q).astype(np.uint8).reshape(n, 4, 2, 32)
    qs = (q[:, :, 0] | q[:, :, 1] << 4).reshape(n, 128)
    return np.concatenate(
        [d16.reshape(n, 1).view(np.uint8), m16.reshape(n, 1).view(np.uint8), packed, qs], axis=1
    )


_QUANTIZERS = {"q8_0": _q_q8_0, "q4_0": _q_q4_0, "q4_1": _q_q4_1, "q4_k": _q_q4_k, "q6_k": _q_q6_k}


def quantize(x: np.ndarray | torch.Tensor, quant: str) -> np.ndarray:
    """A tensor in GGUF type ``quant`` (f32, f16, bf16, q8_0, q4_0, q4_1 as ``gguf.quants.quantize``
    writes them; q4_k and q6_k as llama.cpp's ``quantize_row_q4_K_ref`` / ``quantize_row_q6_K_ref``, which
    gguf.quants does not implement).

    Returns f32/f16 arrays of the input's shape, or for bf16 and the block types uint8 of shape
    ``(*shape[:-1], bytes_per_row)``: the rows' blocks, which ``GGUFWriter.add_tensor(raw_dtype=...)``
    takes. Raises ``ConfigError`` for another type or a last dim that is not a whole number of blocks.
    """
    a = x.detach().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    a = np.ascontiguousarray(a, dtype=np.float32)
    if quant == "f32":
        return a
    if quant == "f16":
        return a.astype(np.float16)
    if quant == "bf16":
        return _q_bf16(a.reshape(-1)).reshape(*a.shape[:-1], -1)
    if quant not in _QUANTIZERS:
        raise ConfigError(f"quant={quant!r}: lamina quantizes to {', '.join(_QTYPE)}")
    block = _BLOCK[quant]
    if a.shape[-1] % block:
        raise ConfigError(f"quant={quant!r} needs rows of a multiple of {block} values, got shape {a.shape}")
    blocks = a.reshape(-1, block)
    chunk = 1 << 14  # blocks at a time: the k-quant search holds a few float32 copies of its input
    out = np.concatenate([_QUANTIZERS[quant](blocks[i : i + chunk]) for i in range(0, len(blocks), chunk)])
    return out.reshape(*a.shape[:-1], -1)


# -- which llama.cpp architecture ------------------------------------------------------------------------


def gguf_architecture(cfg: ModelConfig) -> str:
    """``"llama"`` or ``"gpt2"``: the llama.cpp architecture that runs ``cfg`` as lamina does.

    Raises ``CheckpointError`` naming the first setting llama.cpp has no field for.
    """

    def refuse(knob: str) -> CheckpointError:
        return CheckpointError(
            f"cannot export to GGUF: {knob}, which llama.cpp's llama and gpt2 architectures cannot express; "
            "keep it as a lamina checkpoint (or --to hf)"
        )

    if cfg.arch != "decoder":
        raise refuse(f"arch={cfg.arch!r} (llama.cpp runs decoder-only models from lamina)")
    if cfg.head != "lm" or cfg.lm_head_transform or cfg.type_vocab_size:
        raise refuse(
            f"head={cfg.head!r}, lm_head_transform={cfg.lm_head_transform}, "
            f"type_vocab_size={cfg.type_vocab_size} (only a plain lm head)"
        )
    if cfg.norm_placement != "pre":
        raise refuse("norm_placement='post' (a post-LN decoder)")
    if cfg.pos_encoding not in ("rope", "learned"):
        raise refuse(f"pos_encoding={cfg.pos_encoding!r} (only rope or learned positions)")
    for knob in ("emb_norm", "scale_embeddings", "scale_decoder_outputs"):
        if getattr(cfg, knob):
            raise refuse(f"{knob}=True")
    if not cfg.scale_attention:
        raise refuse("scale_attention=False (unscaled attention scores)")
    if cfg.pos_encoding == "rope":
        if cfg.norm != "rmsnorm" or cfg.activation != "swiglu":
            raise refuse(
                f"pos_encoding='rope' with norm={cfg.norm!r}, activation={cfg.activation!r} (the llama "
                "architecture needs rmsnorm and swiglu)"
            )
        if cfg.rope_scaling not in (None, "linear"):
            raise refuse(f"rope_scaling={cfg.rope_scaling!r} (only linear RoPE scaling is exported)")
        return "llama"
    if cfg.norm != "layernorm" or not cfg.bias or cfg.activation not in ("gelu", "gelu_tanh"):
        raise refuse(
            f"pos_encoding='learned' with norm={cfg.norm!r}, bias={cfg.bias}, activation={cfg.activation!r} "
            "(the gpt2 architecture needs layernorm, biases and gelu)"
        )
    if cfg.n_kv_heads != cfg.n_heads or cfg.head_dim != cfg.d_model // cfg.n_heads:
        raise refuse(
            f"n_kv_heads={cfg.n_kv_heads}, head_dim={cfg.head_dim} with learned positions (the gpt2 "
            "architecture needs n_kv_heads = n_heads and head_dim = d_model // n_heads)"
        )
    if cfg.activation == "gelu":
        warnings.warn(
            "activation='gelu' (exact) is written as llama.cpp's gpt2, whose GELU is the tanh "
            "approximation (they differ by at most 5e-4 per activation); outputs can differ slightly",
            stacklevel=3,
        )
    return "gpt2"


# -- tensors -------------------------------------------------------------------------------------------------


def _permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's ``LlamaModel.permute``: each head's two RoPE halves interleaved row by row
    (HF pairs dim i with i + head_dim/2, ggml pairs 2i with 2i+1); the inverse of ``_reverse_qk_permute``."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model: Transformer, arch: str) -> dict[str, torch.Tensor]:
    """The model's weights under llama.cpp's tensor names, in llama.cpp's layouts (float32, contiguous)."""
    cfg = model.config
    hf = hf_state_dict_from_lamina(weights_for_saving(model), cfg)
    layer_table, top_table = (
        (_LLAMA_LAYER_NAMES, _LLAMA_GLOBAL_NAMES)
        if arch == "llama"
        else (_GPT2_LAYER_NAMES, _GPT2_GLOBAL_NAMES)
    )
    layer_prefix = "model.layers." if arch == "llama" else "transformer.h."
    to_layer = {v: k for k, v in layer_table.items()}
    to_top = {v: k for k, v in top_table.items()}
    out: dict[str, torch.Tensor] = {}
    for name, t in hf.items():
        stem, _, suffix = name.rpartition(".")
        t = t.detach().float()
        if stem.startswith(layer_prefix):
            i, _, rest = stem[len(layer_prefix) :].partition(".")
            gguf = f"blk.{i}.{to_layer[rest]}.{suffix}"
            if arch == "gpt2" and suffix == "weight" and t.ndim == 2:
                t = t.t()  # HF GPT-2's Conv1D stores (in, out); ggml wants Linear's (out, in)
            elif arch == "llama" and rest == "self_attn.q_proj":
                t = _permute_qk(t, cfg.n_heads)
            elif arch == "llama" and rest == "self_attn.k_proj":
                assert cfg.n_kv_heads is not None
                t = _permute_qk(t, cfg.n_kv_heads)
        else:
            gguf = f"{to_top[stem]}.{suffix}"
        out[gguf] = t.contiguous()
    return out


# -- tokenizer -----------------------------------------------------------------------------------------------


def _tokenizer_metadata(tok: Tokenizer, vocab_rows: int) -> dict[str, Any]:
    """``tokenizer.ggml.*`` keys of a byte-level BPE tokenizer; ``CheckpointError`` for other kinds."""
    import json

    from lamina.tokenizer.gguf_vocab import GGUF_PRE_TOKENIZER_SPLITS

    spec = json.loads(tok.backend.to_str())
    model = spec.get("model") or {}
    pre = json.dumps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or '"ByteLevel"' not in pre:
        raise CheckpointError(
            f"cannot export this tokenizer to GGUF: lamina writes byte-level BPE vocabularies (GPT-2, Llama 3, "
            f"SmolLM), this one is {model.get('type')!r} without a ByteLevel pre-tokenizer; convert the "
            "original model with llama.cpp's convert_hf_to_gguf.py instead"
        )
    pre_name = _pre_tokenizer_name(spec.get("pre_tokenizer") or {}, GGUF_PRE_TOKENIZER_SPLITS)
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    if vocab_rows < len(vocab) or max(vocab.values()) >= vocab_rows:
        raise CheckpointError(
            f"the tokenizer has {len(vocab)} tokens (largest id {max(vocab.values())}) but the model's "
            f"embedding has {vocab_rows} rows; llama.cpp needs one token per row"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_rows)]
    types = [_UNUSED] * vocab_rows
    for text, i in vocab.items():
        tokens[i], types[i] = text, _NORMAL
    for added in spec.get("added_tokens") or []:
        types[added["id"]] = _CONTROL if added.get("special") else _USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    out: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre_name,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.add_bos_token": bool(tok.add_bos_token),
        "tokenizer.ggml.add_eos_token": bool(tok.add_eos_token),
        "tokenizer.ggml.add_space_prefix": False,
    }
    for key, value in (
        ("bos", tok.bos_token_id),
        ("unknown", tok.unk_token_id),
        ("padding", tok.pad_token_id),
    ):
        if value is not None:
            out[f"tokenizer.ggml.{key}_token_id"] = value
            if key == "unknown":
                types[value] = _UNKNOWN
    if tok.chat_template:
        out["tokenizer.chat_template"] = tok.chat_template
    return out


def _pre_tokenizer_name(pre: Mapping[str, Any], splits: Mapping[str, str]) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a HF pre-tokenizer spec: ``gpt-2`` for GPT-2's ByteLevel regex,
    ``smollm`` for single digits then ByteLevel, the name of a known split regex (Llama 3, Qwen2, ...)."""
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and steps[1].get("use_regex", True)
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        for name, split in splits.items():
            if split == regex:
                return name
    raise CheckpointError(
        f"cannot export this tokenizer to GGUF: llama.cpp has no name (tokenizer.ggml.pre) for its "
        f"pre-tokenizer {kinds}; lamina knows GPT-2's ByteLevel, SmolLM's digits + ByteLevel and the split "
        "regexes of lamina.tokenizer.gguf_vocab.GGUF_PRE_TOKENIZER_SPLITS"
    )


# -- the file ------------------------------------------------------------------------------------------------


def _model_metadata(cfg: ModelConfig, arch: str) -> dict[str, Any]:
    assert cfg.head_dim is not None and cfg.d_ff is not None
    meta: dict[str, Any] = {
        f"{arch}.context_length": cfg.max_seq_len,
        f"{arch}.embedding_length": cfg.d_model,
        f"{arch}.feed_forward_length": cfg.d_ff,
        f"{arch}.block_count": cfg.n_layers,
        f"{arch}.attention.head_count": cfg.n_heads,
        f"{arch}.attention.head_count_kv": cfg.n_kv_heads,
        f"{arch}.vocab_size": cfg.vocab_size,
    }
    if arch == "gpt2":
        meta[f"{arch}.attention.layer_norm_epsilon"] = float(cfg.norm_eps)
        return meta
    meta[f"{arch}.attention.layer_norm_rms_epsilon"] = float(cfg.norm_eps)
    meta[f"{arch}.rope.freq_base"] = float(cfg.rope_theta)
    meta[f"{arch}.rope.dimension_count"] = cfg.head_dim
    if cfg.head_dim != cfg.d_model // cfg.n_heads:
        meta[f"{arch}.attention.key_length"] = cfg.head_dim
        meta[f"{arch}.attention.value_length"] = cfg.head_dim
    if cfg.rope_scaling == "linear":
        meta[f"{arch}.rope.scaling.type"] = "linear"
        meta[f"{arch}.rope.scaling.factor"] = float(cfg.rope_factor)
    return meta


def _special_ids(
    generation: GenerationConfig | None, tok: Tokenizer | None, vocab_rows: int
) -> dict[str, int]:
    """eos (and eot for a second end-of-generation id, as llama.cpp and lamina's import read it)."""
    ids = list(generation.eos_token_ids) if generation is not None else []
    if not ids and tok is not None:
        ids = tok.eos_token_ids
    ids = [i for i in dict.fromkeys(ids) if 0 <= i < vocab_rows]
    return dict(zip(("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"), ids, strict=False))


_SOURCE_GENERAL_KEYS = ("general.name", "general.organization", "general.finetune", "general.basename",
                        "general.size_label", "general.license", "general.languages", "general.type")  # fmt: skip


def export_gguf(
    model: Transformer | LoadedModel,
    path: str | os.PathLike[str],
    quant: GGUFQuant = DEFAULT_GGUF_QUANT,
    tokenizer: Tokenizer | None = None,
    generation: GenerationConfig | None = None,
    source: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as one GGUF file that llama.cpp loads and runs, atomically (temp file + rename).

    Args:
        model: a ``Transformer`` or what ``lamina.load`` returned (its tokenizer, end-of-generation ids and,
            for a GGUF source, the source file come with it)
        path: the ``.gguf`` file to write
        quant: tensor type of the matrices (f32, f16, bf16, q8_0, q4_0, q4_1, q4_k, q6_k; see ``quantize``) or ``keep``:
            every tensor of the ``source`` GGUF file re-written with its own type and raw blocks
        tokenizer: the tokenizer to embed (default: the loaded model's); required, llama.cpp needs it
        generation: its ``eos_token_ids`` become eos (and eot) ids (default: the loaded model's)
        source: the GGUF file the model was read from; its tokenizer keys are copied verbatim, and
            ``keep`` copies its tensors
        overwrite: replace an existing file at ``path``

    Raises:
        CheckpointError: an architecture or setting llama.cpp cannot express, a missing or unsupported
            tokenizer, ``keep`` without a GGUF source or with weights changed since loading, an existing
            ``path`` without ``overwrite``. Nothing is left at ``path`` on error.
        ConfigError: an unknown ``quant``.
    """
    if not isinstance(model, Transformer):  # a LoadedModel
        loaded = model
        model = loaded.model
        tokenizer = tokenizer if tokenizer is not None else loaded.tokenizer
        generation = generation if generation is not None else loaded.generation
        if source is None and loaded.entry.format == "gguf":
            source = loaded.entry.path
    if quant not in GGUF_QUANTS:
        raise ConfigError(f"quant={quant!r} is not one of {', '.join(GGUF_QUANTS)}")
    target = Path(path)
    if target.is_dir():
        raise CheckpointError(f"{target} is a directory; export_gguf writes a .gguf file")
    if target.exists() and not overwrite:
        raise CheckpointError(
            f"{target} already exists; choose a new path, or pass --overwrite to replace it"
        )
    from lamina.model.lora import adapter_names, lora_layers

    if lora_layers(model) or adapter_names(model):
        raise CheckpointError(
            "this model holds unmerged LoRA adapters, which GGUF cannot store: merge them first "
            "(lamina.model.lora.merge_lora(model, unload=True), or `lamina convert MODEL --merge-lora ADAPTER`)"
        )
    cfg = model.config
    arch = gguf_architecture(cfg)
    src = read_gguf(source) if source is not None else None
    if quant == "keep" and src is None:
        raise CheckpointError(
            "quant='keep' re-exports the tensors of the GGUF file the model was loaded from; this model "
            "was not loaded from a GGUF file: choose f32, f16, bf16, q8_0, q4_0, q4_1, q4_k or q6_k"
        )
    if tokenizer is None and src is None:
        raise CheckpointError(
            "cannot export to GGUF without a tokenizer: llama.cpp reads the vocabulary from the file; "
            "pass tokenizer=... (or export a model folder that has tokenizer.json)"
        )
    tensors = gguf_tensors(model, arch)
    meta = _model_metadata(cfg, arch)
    if src is not None:
        meta |= {
            k: v for k, v in src.metadata.items() if k.startswith("tokenizer.") or k in _SOURCE_GENERAL_KEYS
        }
    else:
        assert tokenizer is not None
        meta |= _tokenizer_metadata(tokenizer, cfg.vocab_size)
    meta |= _special_ids(generation, tokenizer, cfg.vocab_size)
    meta.setdefault("general.name", "lamina export")
    meta["general.file_type"] = (
        _FILE_TYPE[quant] if quant != "keep" else src.metadata.get("general.file_type", 0)  # type: ignore[union-attr]
    )
    if quant not in ("f32", "f16", "bf16"):
        meta["general.quantization_version"] = 2
    _write_atomic(target, arch, meta, _encoded(tensors, quant, src))
    return target


def _encoded(
    tensors: Mapping[str, torch.Tensor], quant: str, src: Any
) -> list[tuple[str, np.ndarray, int | None]]:
    """(name, data, GGML type or None for plain f32/f16 arrays) for each tensor."""
    out: list[tuple[str, np.ndarray, int | None]] = []
    if quant == "keep":
        extra = set(src.tensors) - set(tensors) - {"rope_freqs.weight"}
        missing = set(tensors) - set(src.tensors)
        if extra or missing:
            raise CheckpointError(
                f"quant='keep': the model's tensors differ from {src.path}'s (only in the model: "
                f"{sorted(missing)[:3]}, only in the file: {sorted(extra)[:3]}); choose a quant type"
            )
        for name in src.tensors:
            info = src.tensors[name]
            raw = src.raw_tensor(name)
            if name in tensors and not np.array_equal(
                dequantize(raw, info.qtype, info.shape).numpy(), tensors[name].numpy()
            ):
                raise CheckpointError(
                    f"quant='keep': tensor {name!r} changed since it was read from {src.path} (merged "
                    "adapter? fine-tuned?), so its blocks cannot be kept; choose a quant type (q8_0, q4_1, ...)"
                )
            out.append((name, np.array(raw).reshape(*info.shape[:-1], -1), info.qtype))
        return out
    fallback = []
    for name, t in tensors.items():
        q = quant if t.ndim == 2 else "f32"  # norms and biases stay F32 (as llama.cpp's converter)
        if q in _BLOCK and t.shape[-1] % _BLOCK[q]:  # as llama.cpp: a K-quant falls back to a 32-block type
            q = _FALLBACK.get(q, "f16") if t.shape[-1] % 32 == 0 else "f16"
            fallback.append(name)
        data = quantize(t, q)
        out.append((name, data, None if q in ("f32", "f16") else _QTYPE[q]))
    if fallback:
        warnings.warn(
            f"{len(fallback)} tensors ({', '.join(fallback[:3])}...) have rows that are not whole {quant} "
            f"blocks; written as {_FALLBACK.get(quant, 'f16').upper()} (F16 where rows are not whole 32-blocks)",
            stacklevel=3,
        )
    return out


def _write_atomic(
    target: Path, arch: str, meta: Mapping[str, Any], tensors: list[tuple[str, np.ndarray, int | None]]
) -> None:
    import gguf  # the writer of llama.cpp's own converters (gguf-py)

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        for key, value in meta.items():
            if key == "general.architecture":
                continue
            _add_value(writer, key, value)
        for name, data, qtype in tensors:
            raw_dtype = None if qtype is None else gguf.GGMLQuantizationType(qtype)
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _add_value(writer: Any, key: str, value: Any) -> None:
    """One metadata entry, typed as llama.cpp checks it: uint32 ids and sizes, float32 reals, strings,
    bools; arrays of strings, of float32 (scores), of uint32, and int32 token types."""
    import gguf

    T = gguf.GGUFValueType
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list) and value:
        if key == "tokenizer.ggml.token_type":
            sub = T.INT32
        elif all(isinstance(v, str) for v in value):
            sub = T.STRING
        elif all(isinstance(v, float) for v in value):
            sub = T.FLOAT32
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            sub = T.UINT32
        else:
            raise CheckpointError(f"cannot write GGUF metadata {key}: a list of mixed types")
        writer.add_key_value(key, value, T.ARRAY, sub_type=sub)
    elif not isinstance(value, list):
        raise CheckpointError(f"cannot write GGUF metadata {key}={value!r} (type {type(value).__name__})")
