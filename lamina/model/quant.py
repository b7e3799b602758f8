"""Weight formats for inference: fp32, bf16, int8 weight-only and dynamic int8 (W8A8).

``convert_weights(model, fmt)`` converts a ``Transformer`` in place and returns it. Every format keeps
the model's structure; int8 formats swap each ``nn.Linear`` (the output head included) for a module
holding per-output-channel symmetric int8 weights and one scale per output channel:

- ``bf16``: every weight and activation in bfloat16 (native on CPUs with AVX-512 BF16 or AMX).
- ``int8``: int8 weights, bf16 activations; ``torch.ops.aten._weight_int8pack_mm`` dequantizes inside
  the matmul. A quarter of fp32's weight bytes, which is what bounds decoding speed.
- ``w8a8``: int8 weights and int8 activations, quantized per token on the fly (dynamic), an int8 x int8
  -> int32 matmul (``torch._int_mm``), then both scales. Activations stay fp32 between layers.

Norms, embeddings and the KV cache stay in the activation dtype. A converted model is for inference:
it cannot be trained or saved with ``save_checkpoint``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lamina.errors import ConfigError
from lamina.model.transformer import Transformer

FORMATS = ("fp32", "bf16", "int8", "w8a8")
DEQUANT_ROWS = 16  # int8: above this many tokens per call, dequantize to bf16 and use the bf16 matmul


def quantize_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per output channel: ``weight ~= q * scale[:, None]``; q in [-127, 127]."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale


class Int8Linear(nn.Module):
    """Weight-only int8 linear: int8 weights (out, in), one scale per output channel, activations unchanged."""

    weight: Tensor
    scale: Tensor
    bias: Tensor | None

    def __init__(self, linear: nn.Linear, act_dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_per_channel(linear.weight)
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale.to(act_dtype))
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(act_dtype))

    def forward(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out), in x's dtype (which must be the scales' dtype)."""
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] > DEQUANT_ROWS:  # prefill: matmul-bound, dequantizing the weight once is cheaper
            y = F.linear(x2, self.weight.to(x.dtype) * self.scale[:, None], self.bias)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scale)
            if self.bias is not None:
                y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


class DynamicInt8Linear(nn.Module):
    """W8A8 linear: int8 weights per output channel, activations quantized per token on the fly."""

    weight_t: Tensor
    scale: Tensor
    bias: Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_per_channel(linear.weight)
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


def _swap_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> None:
    """Replace every ``nn.Linear`` of ``model`` (the output head included) by ``make(linear)``."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, make(child))


def convert_weights(model: Transformer, fmt: str) -> Transformer:
    """Convert ``model`` in place to weight format ``fmt`` (one of ``FORMATS``) and return it."""
    if fmt not in FORMATS:
        raise ConfigError(f"weight format {fmt!r} is not one of {', '.join(FORMATS)}")
    if any(isinstance(m, Int8Linear | DynamicInt8Linear) for m in model.modules()):
        raise ConfigError("this model's weights are already int8: convert a fresh copy of the fp32 model")
    model.eval().float()  # int8 weights are quantized from the fp32 values
    if fmt == "w8a8":
        _swap_linears(model, DynamicInt8Linear)
    elif fmt == "int8":
        _swap_linears(model, lambda lin: Int8Linear(lin, torch.bfloat16))
    if fmt in ("bf16", "int8"):
        model.to(torch.bfloat16)  # int8 buffers stay int8; scales, norms and embeddings become bf16
    return model


@torch.inference_mode()
def logit_agreement(model: nn.Module, reference_logits: Tensor, input_ids: Tensor) -> tuple[float, float]:
    """How close ``model``'s logits on ``input_ids`` are to ``reference_logits`` (same shape): the max
    absolute difference and the fraction of positions whose top-1 token agrees."""
    logits = model(input_ids).float()
    err = (logits - reference_logits).abs().max().item()
    top1 = (logits.argmax(-1) == reference_logits.argmax(-1)).float().mean().item()
    return err, top1
