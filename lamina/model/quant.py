"""Weight formats for inference: fp32, bf16, int8 and int4 weight-only, and dynamic int8 (W8A8).

``convert_weights(model, fmt)`` converts a ``Transformer`` in place and returns it. The integer formats
swap each ``nn.Linear`` for a module holding integer weights and their scales:

- ``fp32``: the weights unchanged, each linear but the output head prepacked for oneDNN's float32
  matmul (``PackedLinear``, CPU; one copy of the weight), which beats MKL's for the few rows of a decode
  step. Logits within ~1e-5 of the model's own.
- ``bf16``: every weight and activation in bfloat16 (native on CPUs with AVX-512 BF16 or AMX).
- ``int8``: int8 weights, bf16 activations; ``torch.ops.aten._weight_int8pack_mm`` dequantizes inside
  the matmul. A quarter of fp32's weight bytes, which is what bounds decoding speed.
- ``int4``: 4-bit weights in groups of 32 input features, each group with a bf16 scale and offset
  (asymmetric, the layout of GGUF's Q4_1, so SmolLM2's Q4_1 weights keep their 4-bit codes; the values
  move by the bf16 rounding of the scales, at most 0.07 of a step), bf16 activations,
  ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (torch >= 2.6). The output head stays int8 per
  channel (as llama.cpp keeps it at higher precision in its 4-bit mixes): it is the layer whose error
  every logit sees (opt-in ``convert_weights(..., head_topk=k)``: ``RescoredHead``, an int4 copy
  scores the vocabulary and the k best are rescored in int8, about half the head's time). An eighth of
  fp32's bytes in the blocks: the fastest at batch 1. From
  ``INT4_DEQUANT_ROWS`` tokens per sequence (prefill) a layer unpacks its codes to the same bf16 weight
  and runs one bf16 matmul instead, as ``int8`` does past ``DEQUANT_ROWS``.
  ``use_int4_kernel(model, build_dir)`` (``lamina.load``'s default where it can run:
  ``LoadOptions.int4_kernel``): decode steps through ``lamina.model.int4_cpu``'s AVX-512 BF16
  kernel (built on first use; 1.5x the aten kernel at one row with the weights streamed from memory,
  1 thread: figures in its docstring; outputs equal up to one bf16 rounding).
- ``w8a8``: int8 weights and int8 activations, quantized per token on the fly (dynamic), an int8 x int8
  -> int32 matmul (``torch._int_mm``), then both scales. Activations stay fp32 between layers. On CPUs
  whose int8 matmul saturates (AVX2 without VNNI: oneDNN sums u8 x s8 pairs in int16), the weights get
  7 bits instead of 8, which keeps the int32 sums exact there (``int8_weight_max``, probed at run time).

Norms, embeddings and the KV cache stay in the activation dtype. Every format also fuses the q/k/v
projections into one matmul and the gate/up projections into another (fewer, larger calls). A converted
model is for inference: it cannot be trained, and ``save_checkpoint`` / ``export_hf`` refuse it.

The int8/int4 path (the integer kernel, or the dequantized weight in a bf16 matmul; their rounding
differs, logprobs up to ~7e-3 apart) is chosen by the tokens per sequence of a forward (T of the input
(B, T, in); a 2-D (B, in) input, as a pooled head's, is one token per row), never by the batch size: a
decode step (T = 1) takes the kernel at any batch size, so a row's numerics do not depend on its
batch-mates. A batch of left-padded prompts is padded to its longest,
so the engine never prefills together prompts on both sides of a switch (``path_lengths``). The price:
many short int8 rows (a decode step at batch ~64, a batch of short prompts) stay on the kernel, whose
matmuls there are ~1.3-1.4x slower than the dequantized weight's (int4's kernel is not slower there).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lamina.errors import ConfigError
from lamina.model import int4_cpu
from lamina.model.layers import (
    MLP,
    ONEDNN_ERRORS,
    Attention,
    onednn_available,
    onednn_failed,
    packed_linear,
    prepack,
)
from lamina.model.transformer import Transformer

WeightFormat = Literal["fp32", "bf16", "int8", "int4", "w8a8"]
FORMATS: tuple[str, ...] = get_args(WeightFormat)
INT4_GROUP = 32  # input features per int4 scale/offset (GGUF Q4_0/Q4_1 use 32)
DEQUANT_ROWS = 16  # int8: above this many tokens per sequence, dequantize to bf16 and use the bf16 matmul
INT4_DEQUANT_ROWS = 64  # int4: from this many tokens per sequence (prefill), the same (cheaper there)


def _tokens_per_row(x: Tensor) -> int:
    """What chooses an int8/int4 layer's path: T of (..., T, in), the tokens per sequence of this forward,
    not the batch size; a 2-D (B, in) input (a pooled head's vector per sequence) is one token per row."""
    return x.shape[-2] if x.dim() >= 3 else 1


def path_lengths(model: nn.Module) -> tuple[int, ...]:
    """The tokens per sequence at which a layer of ``model`` switches from its integer kernel to the
    dequantized bf16 matmul (sorted; empty for fp32 / bf16 / w8a8): prompts padded to a common length
    across one of these get other numerics than alone, so ``lamina.generate.engine`` groups them apart."""
    found = set()
    for module in model.modules():
        if isinstance(module, Int8Linear):
            found.add(DEQUANT_ROWS + 1)
        elif isinstance(module, Int4Linear) and module.unpackable:
            found.add(INT4_DEQUANT_ROWS)
    return tuple(sorted(found))


def pads_across(short: int, long: int, bounds: Sequence[int]) -> bool:
    """Whether padding a row of ``short`` tokens to ``long`` crosses one of ``bounds`` (``path_lengths``):
    the padded row would take the other int8/int4 path and get other numerics than alone."""
    return any(short < b <= long for b in bounds)


class _FrozenMatmul(torch.autograd.Function):
    """A frozen int8/int4 layer's forward (its usual path), differentiable in ``x``: the backward
    multiplies by the weight dequantized then (``grad_x = grad_y @ W``), so the forward saves no tensor
    (QLoRA: gradients reach the adapters below a layer they do not wrap, whatever its tokens per row)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: nn.Module) -> Tensor:
        ctx.layer = layer
        with torch.no_grad():
            return layer(x)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, None]:
        w = ctx.layer.dequantize()  # (out, in)
        return (grad_y.to(w.dtype) @ w).to(grad_y.dtype), None


def quantize_per_channel(weight: Tensor, qmax: int = 127) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per output channel: ``weight ~= q * scale[:, None]``; q in [-qmax, qmax]."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / qmax  # (out,)
    q = torch.round(w / scale[:, None]).clamp(-qmax, qmax).to(torch.int8)
    return q.contiguous(), scale


_INT8_WEIGHT_MAX: list[int] = []  # the probe's answer, once per process


def int8_weight_max() -> int:
    """The largest int8 weight code ``torch._int_mm`` sums exactly on this CPU: 127, or 63 where it
    saturates (oneDNN on AVX2 without VNNI adds pairs of u8 x s8 products in int16; 7-bit weights keep
    them in range). Probed once at run time with a product that saturates there."""
    if not _INT8_WEIGHT_MAX:
        a, b = torch.full((17, 64), 127, dtype=torch.int8), torch.full((64, 8), 127, dtype=torch.int8)
        exact = bool((torch._int_mm(a, b) == 64 * 127 * 127).all())
        _INT8_WEIGHT_MAX.append(127 if exact else 63)
    return _INT8_WEIGHT_MAX[0]


class Int8Linear(nn.Module):
    """Weight-only int8 linear: int8 weights (out, in), one scale per output channel, activations unchanged.

    The CPU kernel reads out of bounds unless the input count is a multiple of 16: other input counts are
    zero-padded (padded inputs are multiplied by zero)."""

    weight: Tensor
    scale: Tensor
    bias: Tensor | None

    def __init__(self, linear: nn.Linear, act_dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.pad_in = -self.in_features % 16
        q, scale = quantize_per_channel(F.pad(linear.weight.detach(), (0, self.pad_in)))
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale.to(act_dtype))
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(act_dtype))

    def forward(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out), in x's dtype (which must be the scales' dtype)."""
        if x.requires_grad and torch.is_grad_enabled():
            return _FrozenMatmul.apply(x, self)
        x2 = x.reshape(-1, self.in_features)
        if self.pad_in:
            x2 = F.pad(x2, (0, self.pad_in))
        if _tokens_per_row(x) > DEQUANT_ROWS:  # prefill: matmul-bound, dequantizing once is cheaper
            y = F.linear(x2, self.weight.to(x.dtype) * self.scale[:, None], self.bias)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scale)
            if self.bias is not None:
                y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def dequantize(self) -> Tensor:
        """The weight (out, in) the matmul uses, in the scales' dtype (for LoRA's backward and merges)."""
        w = self.weight[:, : self.in_features]
        return w.to(self.scale.dtype) * self.scale[:, None]


def quantize_groupwise_int4(weight: Tensor, group: int = INT4_GROUP) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric 4-bit quantization in groups of ``group`` input features, with bf16 scales.

    Returns ``q`` (out, in) int32 in [0, 15], ``scale`` and ``offset`` (out, in // group) bf16 such that
    ``weight ~= (q - 8) * scale + offset`` per group (the form ``_weight_int4pack_mm_for_cpu`` computes).
    The scale spans the group's min..max in 15 steps; q is chosen against the bf16-rounded scale and
    offset. For groups centred near zero, as trained weights are, the error stays within about half a
    step; a group whose values sit far from zero compared with their spread (|mean| >> range) loses more
    to the bf16 offset, and q is clamped at 0 or 15."""
    out_f, in_f = weight.shape
    w = weight.detach().float().reshape(out_f, in_f // group, group)
    lo, hi = w.amin(dim=2), w.amax(dim=2)
    scale = ((hi - lo) / 15).clamp(min=1e-12).to(torch.bfloat16)
    offset = (lo + 8 * scale.float()).to(torch.bfloat16)
    q = torch.round((w - offset.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)
    return q.to(torch.int32).reshape(out_f, in_f), scale, offset


def _unpack_int4(packed: Tensor, n: int, k: int, dtype: torch.dtype = torch.uint8) -> Tensor:
    """The 4-bit codes (n, k) of ``_convert_weight_to_int4pack_for_cpu``'s output (n, k / 2) uint8, in
    ``dtype``. That layout (torch's CPU kernel, read from its packing): blocks of 64 outputs; within a
    block, for each input, 32 bytes whose low nibbles are outputs 0-31 and high nibbles outputs 32-63."""
    p = packed.view(n // 64, k, 32)
    w = torch.empty(n // 64, 2, 32, k, dtype=dtype, device=packed.device)
    w[:, 0].copy_((p & 15).transpose(1, 2))
    w[:, 1].copy_((p >> 4).transpose(1, 2))
    return w.view(n, k)


class Int4Linear(nn.Module):
    """Weight-only int4 linear (groups of ``INT4_GROUP`` inputs, bf16 scale and offset per group).

    The kernel needs the output count to be a multiple of 16 and the input count a multiple of the group:
    other shapes are zero-padded (padded outputs are cut off, padded inputs are multiplied by zero)."""

    packed: Tensor
    scale_offset: Tensor
    bias: Tensor | None
    mv_packed: Tensor | None
    mv_so: Tensor | None

    def __init__(self, linear: nn.Linear, group: int = INT4_GROUP) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group = linear.in_features, linear.out_features, group
        # use_kernel: the codes in int4_cpu's layout, derived from ``packed`` (not saved: a state dict
        # loads into any int4 model)
        self.register_buffer("mv_packed", None, persistent=False)
        self.register_buffer("mv_so", None, persistent=False)
        self.pad_in = -self.in_features % group
        pad_out = -self.out_features % 16
        w = F.pad(linear.weight.detach().float(), (0, self.pad_in, 0, pad_out))
        q, scale, offset = quantize_groupwise_int4(w, group)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2))
        # whether ``packed`` has the layout ``_unpack_int4`` reads (torch's CPU layout today; checked, not
        # assumed, so that another torch falls back to the kernel-based dequantization)
        self.unpackable = q.shape[0] % 64 == 0 and torch.equal(
            _unpack_int4(self.packed, *q.shape), q.to(torch.uint8)
        )
        # (in // group, out, 2): the kernel's layout of the scales and offsets
        self.register_buffer("scale_offset", torch.stack([scale, offset], dim=2).transpose(0, 1).contiguous())
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))

    def forward(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out) in bf16 (x must be bf16: the kernel is slow in fp32)."""
        if x.requires_grad and torch.is_grad_enabled():
            return _FrozenMatmul.apply(x, self)
        x2 = x.reshape(-1, self.in_features)
        if self.pad_in:
            x2 = F.pad(x2, (0, self.pad_in))
        if _tokens_per_row(x) >= INT4_DEQUANT_ROWS and self.unpackable:
            # prefill: matmul-bound; dequantizing the layer (the same bf16 weight the kernel uses) and
            # the bf16 matmul beat the int4 kernel from about 64 rows on (B = 1)
            y = F.linear(x2, self._dequantize_padded())
        elif self.mv_packed is not None and self.mv_so is not None and int4_cpu.op_loaded():
            # (a pickled copy or a spawned process without int4_cpu.load takes the aten kernel)
            y = int4_cpu.mv(x2.contiguous(), self.mv_packed, self.mv_so)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.scale_offset)
        if y.shape[1] != self.out_features:
            y = y[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def use_kernel(self) -> bool:
        """Also keep the codes in ``int4_cpu``'s layout (as many bytes again): forwards of fewer than
        ``INT4_DEQUANT_ROWS`` tokens per sequence (decode steps) then run its kernel, the same products
        with another summation order (``int4_cpu.load`` must have succeeded). False (nothing changed)
        for a group other than 32 or a packed layout this code cannot unpack."""
        n, k = self.packed.shape[0], self.packed.shape[1] * 2
        if self.group != 32 or not self.unpackable or n % 64:
            return False
        so = self.scale_offset  # (k // group, n, 2)
        packed, mv_so = int4_cpu.pack(_unpack_int4(self.packed, n, k), so[:, :, 0].t(), so[:, :, 1].t())
        self.register_buffer("mv_packed", packed, persistent=False)
        self.register_buffer("mv_so", mv_so, persistent=False)
        return True

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, "
            f"kernel={'int4_cpu' if self.mv_packed is not None else 'aten'}"
        )

    def _dequantize_padded(self) -> Tensor:
        """The padded weight (out_pad, in_pad) in bf16 from the packed codes: ``q * scale + (offset - 8
        scale)`` in fp32 per group, rounded once (bit for bit the weight the int4 kernel multiplies by)."""
        n, k = self.packed.shape[0], self.packed.shape[1] * 2
        so = self.scale_offset.float()  # (k // group, n, 2)
        scale = so[:, :, 0].t()[:, :, None]  # (n, k // group, 1)
        shift = so[:, :, 1].t()[:, :, None] - 8 * scale
        w = _unpack_int4(self.packed, n, k, torch.float32).view(n, k // self.group, self.group)
        return w.mul_(scale).add_(shift).view(n, k).to(torch.bfloat16)

    def dequantize(self) -> Tensor:
        """The weight (out, in) the kernel uses, in bf16 (for LoRA's backward): unpacked from the codes, or
        (a packed layout this code does not know) the kernel applied to the identity matrix."""
        if self.unpackable:
            return self._dequantize_padded()[: self.out_features, : self.in_features]
        eye = torch.eye(self.in_features + self.pad_in, dtype=torch.bfloat16, device=self.packed.device)
        wt = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group, self.scale_offset)
        return wt[: self.in_features, : self.out_features].t()  # (in_pad, out_pad) -> (out, in)


def _check_head_topk(k: int, vocab: int) -> None:
    """Raise ``ConfigError`` unless ``k`` (``head_topk``) is in 1..``vocab``, the head's outputs."""
    if not 1 <= k <= vocab:
        raise ConfigError(f"head_topk={k} must be in 1..{vocab} (the head's outputs), or 0 (off)")


class RescoredHead(nn.Module):
    """An int8 output head scored in two passes (``convert_weights(..., head_topk=k)``, int4 only): an int4
    copy of the head (groups of ``INT4_GROUP``, ``Int4Linear``) scores the whole vocabulary, then the ``k``
    best tokens of each position are scored again exactly with the int8 per-channel weight (the usual int4
    format's head; dot products in fp32) and written over their approximations.

    The top of each row (what greedy decoding, top-k/top-p sampling and a token's logprob mostly see) is
    int8's, while the head reads the int4 codes plus k int8 rows: SmolLM2-135M's head (49152 x 576) takes
    0.48x the int8 kernel's time at one row, 0.55-0.58x at 4-16 (1 thread). The other logits keep the int4
    error (up to ~5 on SmolLM2, against int8's ~1.3), which moves the tail of a sampled distribution:
    hence opt-in. The same path at every row count (a scoring forward over a prompt included), so a
    position's logits do not depend on the tokens around it. Inference only; (..., in) bf16 ->
    (..., out) bf16."""

    weight: Tensor
    scale: Tensor
    bias: Tensor | None

    def __init__(self, linear: nn.Linear, k: int) -> None:
        super().__init__()
        _check_head_topk(k, linear.out_features)
        self.in_features, self.out_features, self.k = linear.in_features, linear.out_features, k
        self.approx = Int4Linear(linear)
        q, scale = quantize_per_channel(linear.weight.detach())
        self.register_buffer("weight", q)  # (out, in) int8
        self.register_buffer("scale", scale.to(torch.bfloat16))
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))

    def forward(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out) in bf16: the int4 logits with each row's top ``k`` recomputed in int8."""
        x2 = x.reshape(-1, self.in_features).contiguous()  # the int4 kernel's need (h[:, -1:] of a prefill)
        y = self.approx(x2)  # (M, out) bf16, the head's bias included
        idx = y.topk(self.k, dim=-1).indices  # (M, k)
        rows = self.weight[idx].float() * self.scale[idx].float()[..., None]  # (M, k, in)
        exact = (rows @ x2.float()[:, :, None]).squeeze(-1)  # (M, k)
        if self.bias is not None:
            exact = exact + self.bias[idx].float()
        return y.scatter(-1, idx, exact.to(y.dtype)).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}"


class DynamicInt8Linear(nn.Module):
    """W8A8 linear: int8 weights per output channel, activations quantized per token on the fly."""

    weight_t: Tensor
    scale: Tensor
    bias: Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_per_channel(linear.weight, int8_weight_max())
        self.register_buffer("weight_t", q.t())  # (in, out) view of the (out, in) tensor: _int_mm's layout
        self.register_buffer("scale", scale)
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out) in x's dtype."""
        x2 = x.reshape(-1, self.in_features).float()
        x_scale = x2.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0  # (M, 1): one per token
        xq = torch.round(x2 / x_scale).to(torch.int8)
        y = torch._int_mm(xq, self.weight_t).float() * (x_scale * self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


class PackedLinear(nn.Module):
    """A float32 linear for inference on CPU whose weight lives only in oneDNN's blocked layout
    (``torch.ops.mkldnn._reorder_linear_weight``, private; ``layers.prepack``): the ``fp32`` format.

    MKL's float32 matmul for a few rows is slow on this project's CPUs (AMD EPYC, one thread: t5-small's
    (2048, 512) layer takes 0.7 ms for 8 rows in ``F.linear``, 0.3 ms prepacked; SmolLM2's (3072, 576)
    1.3 ms and 0.3 ms); prepacked, a decode step of 1-16 rows runs the layer 1.2-4x faster and a prefill
    of 64-256 rows 1.05-1.4x. The packed weight replaces the module's weight (one copy, as the integer
    formats hold theirs). Outputs within ~1e-6 of ``F.linear`` 's (another summation order).

    The state dict holds ``weight`` (out, in) and ``bias`` as ``nn.Linear`` 's do (unpacked on the way
    out, repacked on the way in), and so do ``copy.deepcopy`` and pickling. Gradients reach ``x``
    (``_FrozenMatmul``: the weight is frozen); inputs must be float32 on CPU."""

    bias: Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = prepack(linear.weight.detach().float())  # opaque (mkldnn layout): no buffer
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    @torch.compiler.disable  # inductor cannot lower the opaque weight: a graph break (compile unpacked)
    def forward(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out), float32."""
        if x.requires_grad and torch.is_grad_enabled():
            return _FrozenMatmul.apply(x, self)
        return packed_linear(x, self.packed, self.bias)

    def dequantize(self) -> Tensor:
        """The weight (out, in) float32, unpacked (a new tensor: exactly the weight packed)."""
        return self.packed.to_dense()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.dequantize()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "weight"
        weight = state_dict.get(key)
        if weight is None:
            if strict:
                missing_keys.append(key)
        elif tuple(weight.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"size mismatch for {key}: {tuple(weight.shape)} in the state dict, "
                              f"({self.out_features}, {self.in_features}) in the model")  # fmt: skip
        else:
            self.packed = prepack(weight.detach().float())
        others = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(
            others, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def __getstate__(self) -> dict[str, Any]:  # copy.deepcopy and pickle: the opaque tensor has no storage
        state = self.__dict__.copy()
        state["packed"] = self.dequantize()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["packed"] = prepack(state["packed"])
        self.__dict__.update(state)


def _packable(model: Transformer) -> bool:
    """Whether oneDNN's prepacked float32 linear runs here (its private ops exist and answer right)."""
    if not onednn_available() or model.tok_emb.weight.device.type != "cpu":
        return False
    try:
        w, x = torch.ones(3, 2), torch.ones(1, 2)
        return bool(torch.equal(packed_linear(x, prepack(w), None), F.linear(x, w)))
    except ONEDNN_ERRORS:
        onednn_failed()
        return False


def _swap_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> None:
    """Replace every ``nn.Linear`` of ``model`` (the output head included) by ``make(linear)``."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, make(child))


def convert_weights(
    model: Transformer, fmt: str, fuse: bool = True, pack: bool = True, head_topk: int = 0
) -> Transformer:
    """Convert ``model`` in place to weight format ``fmt`` (one of ``FORMATS``) and return it.

    ``fp32`` on CPU (oneDNN present) fuses the projections and replaces every ``nn.Linear`` but the output
    head by a ``PackedLinear`` (the weight prepacked for oneDNN: one copy, faster matmuls for every row
    count); elsewhere, with ``fuse=False`` and with ``pack=False`` (for ``torch.compile``, which cannot
    lower the packed weight: each ``PackedLinear`` is a graph break there) it leaves the model as it was
    (trainable and savable).
    ``fuse=False`` keeps q/k/v_proj and gate/up_proj apart and the linears ``nn.Linear`` / integer ones
    (LoRA over a converted base wraps them by name: ``lamina.model.lora``).
    ``head_topk=k`` (int4 only; 0: off) gives the output head a ``RescoredHead``: the vocabulary scored
    by an int4 copy, each position's k best tokens rescored with the int8 weight (about half the int8
    head's time at 1-16 rows; the tail of the logits keeps int4's error)."""
    if fmt not in FORMATS:
        raise ConfigError(f"weight format {fmt!r} is not one of {', '.join(FORMATS)}")
    if head_topk and fmt != "int4":
        raise ConfigError(f"head_topk={head_topk} applies to weights int4 only (got {fmt!r}): set it to 0")
    vocab = model.lm_head.out_features if isinstance(model.lm_head, nn.Linear) else None
    if head_topk and vocab is not None:
        _check_head_topk(head_topk, vocab)
    if model.weight_format is not None:
        raise ConfigError(
            f"this model is already converted (weights={model.weight_format!r}): convert a fresh copy of the "
            "model as loaded"
        )
    device = model.tok_emb.weight.device
    if fmt in ("int8", "int4", "w8a8") and device.type != "cpu":
        raise ConfigError(
            f"weight format {fmt!r} uses CPU kernels; the model is on {device}: use dtype bf16 there"
        )
    model.eval().float()  # integer weights are quantized from the fp32 values
    if fmt == "fp32" and not (fuse and pack and _packable(model)):
        return model  # as it was: still trainable and savable
    if fuse:  # fewer, larger matmuls
        for module in model.modules():
            if isinstance(module, Attention | MLP):
                module.fuse_projections()
    if fmt == "fp32":
        head = model.lm_head  # kept: a decode step multiplies it transposed (Transformer._head_t)
        model.lm_head = None
        _swap_linears(model, PackedLinear)
        model.lm_head = head
    elif fmt == "w8a8":
        _swap_linears(model, DynamicInt8Linear)
    elif fmt == "int8":
        _swap_linears(model, lambda lin: Int8Linear(lin, torch.bfloat16))
    elif fmt == "int4":
        head = model.lm_head
        if isinstance(head, nn.Linear) and head_topk:
            model.lm_head = RescoredHead(head, head_topk)  # type: ignore[assignment]
        elif isinstance(head, nn.Linear):
            model.lm_head = Int8Linear(head, torch.bfloat16)  # type: ignore[assignment]
        _swap_linears(model, Int4Linear)
    if fmt in ("bf16", "int8", "int4"):
        model.to(torch.bfloat16)  # int8 buffers stay int8; scales, norms and embeddings become bf16
    model.weight_format = fmt
    return model


def use_int4_kernel(
    model: nn.Module, build_dir: Path | None = None, log: Callable[[str], None] | None = None
) -> str | None:
    """Run every ``Int4Linear`` of ``model`` (an int4-converted model, a ``RescoredHead`` 's int4 copy
    included) through ``lamina.model.int4_cpu``'s kernel at decode steps: 1.5x the aten kernel at one row
    with the weights streamed from memory (1 thread; figures in its docstring), outputs equal up to one
    bf16 rounding. Builds the kernel into ``build_dir`` (default ``int4_cpu.default_build_dir()``) the
    first time (about 7 s of CPU here; a C++ compiler and ninja are needed). Returns None when it is in use,
    else why not (the model then runs as before): no AVX-512 BF16, no compiler or ninja, no int4 layer.
    The kernel's copy of the codes is not in the state dict; a process that unpickles the model runs
    the aten kernel until it calls this again. Call it before
    ``lamina.model.aot.attach_decode_step`` (the compiled step then calls the kernel). ``log`` gets one
    line before a build (``int4_cpu.load``)."""
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    if not layers:
        return "no int4 layer (convert_weights(model, 'int4') first)"
    why = int4_cpu.load(build_dir, log)
    if why is not None:
        return why
    for layer in layers:
        if layer.mv_packed is None:
            layer.use_kernel()
    return None


@torch.inference_mode()
def logit_agreement(
    model: Transformer, reference_logits: Tensor, input_ids: Tensor, stepwise: bool = False
) -> tuple[float, float]:
    """How close ``model``'s logits on ``input_ids`` (1, T) are to ``reference_logits`` (1, T, V): the max
    absolute difference and the fraction of positions whose top-1 token agrees. ``stepwise``: the ids fed
    one token per step through a KV cache (the path a decode step takes; one forward of T tokens takes
    the prefill's matmuls, e.g. int4's dequantized one, not a decode kernel)."""
    if stepwise:
        cache = model.new_cache(1, input_ids.shape[1])
        steps = [model(input_ids[:, t : t + 1], cache=cache) for t in range(input_ids.shape[1])]
        logits = torch.cat(steps, 1).float()
    else:
        logits = model(input_ids).float()
    err = (logits - reference_logits).abs().max().item()
    top1 = (logits.argmax(-1) == reference_logits.argmax(-1)).float().mean().item()
    return err, top1
