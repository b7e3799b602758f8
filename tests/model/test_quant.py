"""Weight formats (``lamina.model.quant``): each one's logits against fp32, on a tiny model and on SmolLM2.

The SmolLM2 bounds are the measured error with a margin (measured over the 256 positions below,
bf16 max |dlogit| 0.89, top-1 0.969; int8 2.5, 0.949; int4 1.4, 0.965 (SmolLM2's weights are Q4_1:
int4 gets them back); w8a8 5.0, 0.859; see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from int4_kernel import built_or_skip
from tiny_chat import tiny_llama_config

import lamina
from lamina.checkpoint.hf import export_hf
from lamina.checkpoint.lamina import save_checkpoint
from lamina.errors import CheckpointError, ConfigError
from lamina.model import int4_cpu
from lamina.model.quant import (
    DEQUANT_ROWS,
    FORMATS,
    INT4_DEQUANT_ROWS,
    DynamicInt8Linear,
    Int4Linear,
    Int8Linear,
    PackedLinear,
    RescoredHead,
    _unpack_int4,
    convert_weights,
    logit_agreement,
    path_lengths,
    quantize_groupwise_int4,
    quantize_per_channel,
    use_int4_kernel,
)
from lamina.model.transformer import Transformer

TINY = tiny_llama_config()


def _tiny() -> Transformer:
    torch.manual_seed(0)
    return Transformer(copy.deepcopy(TINY)).eval()


def _ids(B: int, T: int) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))


def test_per_channel_quantization_round_trips() -> None:
    w = torch.randn(8, 32)
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (8,)
    assert int(q.abs().max()) == 127
    torch.testing.assert_close(q.float() * scale[:, None], w, atol=float(scale.max()) / 2, rtol=0)


def _dequantize_int4(
    q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int = 32
) -> torch.Tensor:
    out_f, in_f = q.shape
    w = (q.float().view(out_f, -1, group) - 8) * scale.float()[..., None] + offset.float()[..., None]
    return w.view(out_f, in_f)


def test_int4_gives_back_q4_1_weights_exactly() -> None:
    """Weights on a Q4_1 grid (``q * d + m`` per group of 32, d and m exact in bf16, each group using
    q = 0 and q = 15) come back bit for bit. SmolLM2's Q4_1 weights keep their codes the same way; their
    fp16 scales are not all exact in bf16, so their values move by up to 0.07 of a step (see the bounds
    of test_smollm2_formats_agree_with_fp32)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (48, 96), generator=g)
    q[:, ::32], q[:, 1::32] = 0, 15
    d = torch.tensor([2.0**-7, 3 * 2.0**-9, 2.0**-5])[torch.randint(0, 3, (48, 3), generator=g)]
    m = -8 * d + torch.randint(-4, 4, (48, 3), generator=g) * 2.0**-10
    w = (q.float().view(48, 3, 32) * d[..., None] + m[..., None]).view(48, 96)
    qq, scale, offset = quantize_groupwise_int4(w)
    assert qq.dtype == torch.int32 and int(qq.min()) == 0 and int(qq.max()) == 15
    assert torch.equal(_dequantize_int4(qq, scale, offset), w)


def test_int4_error_is_within_half_a_step() -> None:
    w = torch.randn(32, 64)
    q, scale, offset = quantize_groupwise_int4(w)
    step = scale.float().repeat_interleave(32, dim=1)
    err = (_dequantize_int4(q, scale, offset) - w).abs()
    assert bool((err <= 0.5 * step * 1.02 + 1e-6).all()), float((err / step).max())


@pytest.mark.parametrize(("in_f", "out_f", "bias"), [(64, 48, False), (40, 10, True), (96, 97, False)])
def test_int4_linear_pads_odd_shapes(in_f: int, out_f: int, bias: bool) -> None:
    """The kernel wants out % 16 == 0 and in % 32 == 0: other shapes are zero-padded, same result."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    layer = Int4Linear(lin)
    x = torch.randn(2, 5, in_f)
    w = F.pad(lin.weight.detach(), (0, -in_f % 32, 0, -out_f % 16))
    q, scale, offset = quantize_groupwise_int4(w)
    want = F.linear(x, _dequantize_int4(q, scale, offset)[:out_f, :in_f], lin.bias)
    got = layer(x.to(torch.bfloat16))
    assert got.shape == (2, 5, out_f) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.03, rtol=0.02)


@pytest.mark.parametrize(("in_f", "out_f", "bias"), [(96, 128, True), (64, 200, False)])
def test_int4_prefill_rows_take_the_dequantized_matmul_with_the_kernels_weight(
    in_f: int, out_f: int, bias: bool
) -> None:
    """From INT4_DEQUANT_ROWS rows on, Int4Linear unpacks its codes to bf16 (bit for bit the weight the
    int4 kernel multiplies by: the kernel on the identity) and runs one bf16 matmul."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    layer = Int4Linear(lin)
    assert layer.unpackable == (layer.packed.shape[0] % 64 == 0)  # 200 -> 208 outputs: the kernel's path
    eye = torch.eye(layer.packed.shape[1] * 2, dtype=torch.bfloat16)
    by_kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, layer.packed, 32, layer.scale_offset)
    assert torch.equal(layer.dequantize(), by_kernel[:in_f, :out_f].t())
    x = torch.randn(1, INT4_DEQUANT_ROWS + 3, in_f, dtype=torch.bfloat16)  # (B, T, in): T chooses the path
    rows = torch.cat([layer(x[:, i : i + 1]) for i in range(x.shape[1])], 1)  # a token at a time: the kernel
    torch.testing.assert_close(layer(x).float(), rows.float(), atol=0.02, rtol=0.02)


@pytest.mark.parametrize("in_f", [8, 40, 60, 64])
@pytest.mark.parametrize("rows", [1, 20])  # the kernel, and the dequantized matmul past DEQUANT_ROWS
def test_int8_linear_pads_odd_input_counts(in_f: int, rows: int) -> None:
    """The int8 CPU kernel reads out of bounds unless in % 16 == 0: other input counts are zero-padded."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_f, 48)
    q, scale = quantize_per_channel(lin.weight)
    x = torch.randn(1, rows, in_f)  # (B, T, in): T chooses the path
    want = F.linear(x, q.float() * scale[:, None], lin.bias)
    got = Int8Linear(lin, torch.bfloat16)(x.to(torch.bfloat16))
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@torch.no_grad()
def test_a_rows_numerics_do_not_depend_on_its_batch_mates(fmt: str) -> None:
    """The kernel/dequantized choice follows the tokens per sequence, not the batch: a prompt alone and
    among 19 others of its length (400 prefill rows, past INT4_DEQUANT_ROWS; 20 decode rows, past
    DEQUANT_ROWS) gives the same tokens and logprobs. Prompts padded across a switch (``path_lengths``)
    are prefilled in separate groups."""
    from lamina.config import GenerationConfig
    from lamina.generate.engine import _length_groups, generate_ids

    model = convert_weights(_tiny(), fmt)
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=4, ignore_eos=True, logprobs=True)
    prompts = _ids(20, 20).tolist()
    (alone,) = generate_ids(model, prompts[:1], cfg)
    batched = generate_ids(model, prompts, cfg)[0]
    assert alone.tokens == batched.tokens and alone.logprobs is not None and batched.logprobs is not None
    assert [x.logprob for x in alone.logprobs] == pytest.approx(
        [x.logprob for x in batched.logprobs], abs=1e-5
    )
    assert path_lengths(model) == (
        (DEQUANT_ROWS + 1,) if fmt == "int8" else (DEQUANT_ROWS + 1, INT4_DEQUANT_ROWS)
    )
    assert _length_groups([3, 20, 5, 70], path_lengths(model)) == (
        [[0, 2], [1, 3]] if fmt == "int8" else [[0, 2], [1], [3]]
    )
    assert path_lengths(_tiny()) == ()


@pytest.mark.parametrize("layer_type", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("T", [4, 80])  # the kernel's path and the dequantized one
def test_a_frozen_quantized_layer_passes_gradients_to_its_input(layer_type: type, T: int) -> None:
    """QLoRA trains adapters below layers it does not wrap: their input's gradient is autograd's through a
    linear with the dequantized weight, on either path (the int kernels have no derivative of their own)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 128, bias=False)
    layer = Int8Linear(lin, torch.bfloat16) if layer_type is Int8Linear else Int4Linear(lin)
    x = torch.randn(2, T, 64, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    with torch.no_grad():
        assert torch.equal(y, layer(x))  # the same forward as without autograd
    g = torch.randn_like(y)
    y.backward(g)
    xf = x.detach().float().requires_grad_()
    F.linear(xf, layer.dequantize().float()).backward(g.float())
    assert x.grad is not None and xf.grad is not None
    torch.testing.assert_close(x.grad.float(), xf.grad, atol=1e-2, rtol=1.6e-2)  # bf16 rounding


# An int8 matmul whose pairs of products overflow int16 on AVX2 without VNNI (oneDNN's u8 x s8 kernel):
# the layer's output must equal the exact sum of its own int8 codes on every CPU.
_W8A8_EXACT = """
import torch
from lamina.model.quant import DynamicInt8Linear, int8_weight_max
torch.manual_seed(0)
lin = torch.nn.Linear(576, 64)
layer = DynamicInt8Linear(lin)
x = torch.randn(17, 576)
x_scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
xq = torch.round(x / x_scale)
exact = (xq.double() @ layer.weight_t.double()) * x_scale.double() * layer.scale.double() + lin.bias.double()
err = (layer(x).double() - exact).abs().max().item()
assert err < 1e-4, err
print(int8_weight_max())
"""


@pytest.mark.parametrize("isa", ["this CPU", "AVX2"])
def test_w8a8_sums_its_int8_codes_exactly(isa: str) -> None:
    """On this CPU, and with oneDNN held to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``: the kernel an AVX2-only CPU
    runs, which saturates full-range int8 products), where w8a8 detects it and keeps its weights 7-bit."""
    env = dict(os.environ)
    if isa == "AVX2":
        env["ONEDNN_MAX_CPU_ISA"] = "AVX2"
    res = subprocess.run(
        [sys.executable, "-c", _W8A8_EXACT], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    if isa == "AVX2":
        assert res.stdout.split() == ["63"]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_odd_widths_decode(fmt: str) -> None:
    """d_model 40, d_ff 72 (neither a multiple of 16): every integer linear pads, decoding matches fp32."""
    torch.manual_seed(0)
    ref = Transformer(dataclasses.replace(TINY, d_model=40, n_heads=4, n_kv_heads=2, d_ff=72)).eval()
    ids = _ids(2, 12)
    with torch.no_grad():
        want = ref(ids)
        model = convert_weights(copy.deepcopy(ref), fmt)
        cache = model.new_cache(2, 16)
        steps = torch.cat([model(ids[:, :8], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(8, 12)], 1)  # fmt: skip
    assert bool(torch.isfinite(steps).all())
    assert (steps.float() - want).abs().max() <= TINY_BOUNDS[fmt]


# tiny random model: max |dlogit| bound per format (its logits are of order 1)
TINY_BOUNDS = {"fp32": 1e-5, "bf16": 0.05, "int8": 0.05, "int4": 0.1, "w8a8": 0.1}
ONEDNN = torch.backends.mkldnn.is_available()
LINEAR_KIND = {"int8": Int8Linear, "int4": Int4Linear, "w8a8": DynamicInt8Linear}
if ONEDNN:
    LINEAR_KIND["fp32"] = PackedLinear  # without oneDNN: fp32 leaves the nn.Linear layers


@pytest.mark.parametrize("fmt", FORMATS)
def test_tiny_model_formats(fmt: str) -> None:
    ref = _tiny()
    ids = _ids(2, 16)
    with torch.no_grad():
        want = ref(ids)
    model = convert_weights(copy.deepcopy(ref), fmt)
    kind = LINEAR_KIND.get(fmt, torch.nn.Linear)
    # int4 keeps the output head in int8, fp32 as it was (a decode step multiplies it transposed)
    head_kind = {"int4": Int8Linear, "fp32": torch.nn.Linear}.get(fmt, kind)
    assert isinstance(model.blocks[0].mlp.down_proj, kind) and type(model.lm_head) is head_kind
    fused = model.blocks[0].attn.qkv_proj  # every format fuses q/k/v and gate/up (fp32: with oneDNN)
    unfused = fmt == "fp32" and not ONEDNN
    assert (fused is None) == unfused and (model.blocks[0].mlp.gate_up_proj is None) == unfused
    assert fused is None or isinstance(fused, kind)
    with torch.no_grad():
        got = model(ids)
        # decoding through the cache gives the same logits as one forward, in every format
        cache = model.new_cache(2, 16)
        steps = torch.cat([model(ids[:, :10], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(10, 16)], 1)  # fmt: skip
    assert cache.k[0].dtype == (torch.bfloat16 if fmt in ("bf16", "int8", "int4") else torch.float32)
    assert (got.float() - want).abs().max() <= TINY_BOUNDS[fmt]
    torch.testing.assert_close(steps.float(), got.float(), atol=0.03 if fmt != "fp32" else 1e-5, rtol=0)


@pytest.mark.skipif(not ONEDNN, reason="no oneDNN in this torch build")
def test_packed_fp32_linear_is_the_linear_it_replaced() -> None:
    """PackedLinear: outputs within 1e-5 of F.linear for 1, 8 and 80 rows; gradients reach x as F.linear's;
    the state dict holds nn.Linear's keys and exact values, and loading one repacks (wrong shape: refused);
    copy.deepcopy and pickling keep the weight."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    layer = PackedLinear(lin)
    for rows in (1, 8, 80):
        x = torch.randn(2, rows, 64)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), lin(x), atol=1e-5, rtol=1e-5)
    x = torch.randn(2, 3, 64, requires_grad=True)
    g = torch.randn(2, 3, 48)
    layer(x).backward(g)
    torch.testing.assert_close(x.grad, g @ lin.weight.detach(), atol=1e-5, rtol=1e-5)
    state = layer.state_dict()
    assert state.keys() == lin.state_dict().keys() and torch.equal(state["weight"], lin.weight)
    other = torch.nn.Linear(64, 48)
    layer.load_state_dict(other.state_dict())
    x = torch.randn(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), other(x), atol=1e-5, rtol=1e-5)
        for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            assert torch.equal(copied(x), layer(x))
    with pytest.raises(RuntimeError, match="size mismatch"):
        layer.load_state_dict(torch.nn.Linear(64, 40).state_dict())
    with pytest.raises(RuntimeError, match="Missing"):
        layer.load_state_dict({"bias": lin.bias})


@pytest.mark.skipif(not ONEDNN, reason="no oneDNN in this torch build")
def test_fp32_format_packs_only_a_model_converted_for_inference(tmp_path: Path) -> None:
    """lamina.load(weights="fp32") prepacks (weight_format set: not trained, not saved, state dict still
    the fused model's weights); a plain load, fuse=False (LoRA's base) and pack=False (compile) keep
    nn.Linear layers, trainable and savable."""
    save_checkpoint(tmp_path / "tiny", _tiny())
    packed = lamina.load(tmp_path / "tiny", weights="fp32").model
    assert packed.weight_format == "fp32" and isinstance(packed.blocks[0].attn.o_proj, PackedLinear)
    assert "blocks.0.attn.qkv_proj.weight" in packed.state_dict()
    with pytest.raises(CheckpointError, match="converted for inference"):
        save_checkpoint(tmp_path / "again", packed)
    plain = lamina.load(tmp_path / "tiny").model
    for model in (
        plain,
        convert_weights(_tiny(), "fp32", fuse=False),
        convert_weights(_tiny(), "fp32", pack=False),
    ):
        assert model.weight_format is None
        assert not any(isinstance(m, PackedLinear) for m in model.modules())
    save_checkpoint(tmp_path / "plain", plain)


@pytest.fixture(scope="module")
def int4_kernel() -> Path:
    """``int4_cpu`` built and loaded (``int4_kernel.built_or_skip``)."""
    return built_or_skip()


@pytest.mark.slow  # the first run on a machine builds the kernel (about a minute of CPU)
@pytest.mark.parametrize(("in_f", "out_f", "rows"), [(64, 128, 1), (96, 192, 3), (40, 64, 2)])
def test_int4_kernel_multiplies_by_the_dequantized_weight(int4_kernel: Path, in_f: int, out_f: int, rows: int) -> None:  # fmt: skip
    torch.manual_seed(0)
    layer = Int4Linear(torch.nn.Linear(in_f, out_f)).to(torch.bfloat16)
    x = torch.randn(rows, 1, in_f).bfloat16()
    with torch.no_grad():
        aten = layer(x).float()
        assert layer.use_kernel() and layer.mv_packed is not None
        got = layer(x).float()
    assert got.shape == (rows, 1, out_f) and "kernel=int4_cpu" in repr(layer)
    # the weight both kernels multiply by, exactly: (q - 8) * scale + offset in fp32 per group
    n, k = layer.packed.shape[0], layer.packed.shape[1] * 2
    so = layer.scale_offset.float()  # (k / 32, n, 2)
    q = _unpack_int4(layer.packed, n, k, torch.float32).view(n, k // 32, 32)
    w = ((q - 8) * so[:, :, 0].t()[..., None] + so[:, :, 1].t()[..., None]).view(n, k)[:out_f, :in_f]
    prod, bias = x.float() @ w.t(), layer.bias.float()  # type: ignore[union-attr]
    want = prod + bias
    step = (prod.abs() + bias.abs()) * 2**-7 + 1e-6  # the bf16 roundings of the product and of the sum
    assert bool(((got - want).abs() <= step).all())
    assert bool(((got - aten).abs() <= 2 * step).all())  # the aten kernel's product, other summation order
    # a padded output count that is not a multiple of 64 keeps the aten kernel
    assert not Int4Linear(torch.nn.Linear(64, 48)).use_kernel()


@pytest.mark.slow
def test_use_int4_kernel_decodes_as_the_aten_kernel(int4_kernel: Path) -> None:
    ref = _tiny()
    assert use_int4_kernel(copy.deepcopy(ref), int4_kernel) is not None  # not converted: refused
    aten = convert_weights(copy.deepcopy(ref), "int4")
    model = convert_weights(copy.deepcopy(ref), "int4")
    assert use_int4_kernel(model, int4_kernel) is None
    layers = [m for m in model.blocks.modules() if isinstance(m, Int4Linear)]
    assert layers and all(m.mv_packed is not None for m in layers)
    ids = _ids(2, 12)
    with torch.no_grad():
        out = []
        for m in (aten, model):
            cache = m.new_cache(2, 16)
            out.append(torch.cat([m(ids[:, :8], cache=cache)] + [m(ids[:, t : t + 1], cache=cache) for t in range(8, 12)], 1).float())  # fmt: skip
    torch.testing.assert_close(out[1], out[0], atol=0.03, rtol=0)
    assert torch.equal(out[1][:, 8:].argmax(-1), out[0][:, 8:].argmax(-1))
    # the kernel's copy of the codes is not saved: the state dict loads strictly into a fresh int4 model
    state = model.state_dict()
    assert not any("mv_" in k for k in state) and state.keys() == aten.state_dict().keys()
    convert_weights(copy.deepcopy(ref), "int4").load_state_dict(state, strict=True)
    # where the op is not registered (an unpickled copy in another process), the aten kernel runs
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(int4_cpu, "op_loaded", lambda: False)
        assert int4_cpu.aoti_configs(model) == {}
        assert torch.equal(model(ids[:, :1]), aten(ids[:, :1]))


@pytest.mark.slow
def test_int4_kernel_rows_and_threads_do_not_change_a_row(int4_kernel: Path) -> None:
    """Rows computed 4 at a time (then 3, 2 or 1) and half-blocks split between threads give each row
    the outputs of that row alone on one thread, bit for bit."""
    torch.manual_seed(0)
    layer = Int4Linear(torch.nn.Linear(96, 192)).to(torch.bfloat16)  # 3 blocks of 64: 6 halves
    assert layer.use_kernel() and layer.mv_packed is not None and layer.mv_so is not None
    x = torch.randn(11, 96).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([int4_cpu.mv(x[i : i + 1].contiguous(), layer.mv_packed, layer.mv_so) for i in range(11)])  # fmt: skip
        for n in (11, 7, 6, 5):  # 4 + 4 + 3, 4 + 3, 4 + 2, 4 + 1 rows
            assert torch.equal(int4_cpu.mv(x[:n], layer.mv_packed, layer.mv_so), alone[:n])
        torch.set_num_threads(2)  # 3 halves each: the middle block split
        assert torch.equal(int4_cpu.mv(x, layer.mv_packed, layer.mv_so), alone)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_int4_kernel_checks_its_shapes(int4_kernel: Path) -> None:
    """The kernel refuses a layout other than ``pack``'s (it would read out of bounds)."""
    layer = Int4Linear(torch.nn.Linear(64, 128)).to(torch.bfloat16)
    assert layer.use_kernel() and layer.mv_packed is not None and layer.mv_so is not None
    x = torch.randn(1, 64).bfloat16()
    assert int4_cpu.mv(x, layer.mv_packed, layer.mv_so).shape == (1, 128)
    bad = [(layer.mv_packed, layer.mv_so[:, :, :2].contiguous()), (layer.mv_packed[:1], layer.mv_so),
           (layer.mv_packed.view(2, 2, 4, 8, 32), layer.mv_so), (layer.mv_packed, layer.mv_so.flatten())]  # fmt: skip
    for packed, so in bad:
        with pytest.raises(RuntimeError):
            int4_cpu.mv(x, packed, so)


def test_rescored_head_keeps_int8s_top_k_and_int4s_tail() -> None:
    """head_topk=k: each row's k best tokens (by the int4 copy) get the int8 head's logits, the others the
    int4 copy's; so the argmax is int8's whenever int8's best is in int4's top k (always, for k = V)."""
    ref = Transformer(dataclasses.replace(TINY, vocab_size=160)).eval()  # a vocabulary int4 packs (x16)
    plain = convert_weights(copy.deepcopy(ref), "int4")
    model = convert_weights(copy.deepcopy(ref), "int4", head_topk=5)
    head = model.lm_head
    assert isinstance(head, RescoredHead) and type(plain.lm_head) is Int8Linear
    h = (4 * torch.randn(3, 2, TINY.d_model)).to(torch.bfloat16)
    with torch.no_grad():
        got, exact8, approx = head(h).float(), plain.lm_head(h).float(), head.approx(h).float()
    top = approx.topk(5, dim=-1).indices
    rest = torch.ones_like(got, dtype=torch.bool).scatter(-1, top, False)
    torch.testing.assert_close(got.gather(-1, top), exact8.gather(-1, top), atol=0.01, rtol=0.01)
    assert (approx.gather(-1, top) - exact8.gather(-1, top)).abs().max() > 0.05  # int4's error, undone
    assert torch.equal(got[rest], approx[rest])
    full = convert_weights(copy.deepcopy(ref), "int4", head_topk=160)
    ids = _ids(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(full(ids).float(), plain(ids).float(), atol=0.05, rtol=0)
        cache = full.new_cache(2, 16)  # decoding through the cache: the same logits as one forward
        steps = torch.cat([full(ids[:, :8], cache=cache)] + [full(ids[:, t : t + 1], cache=cache) for t in range(8, 12)], 1)  # fmt: skip
    torch.testing.assert_close(steps.float(), full(ids).float(), atol=0.03, rtol=0)
    with pytest.raises(ConfigError, match="int4 only"):
        convert_weights(copy.deepcopy(ref), "int8", head_topk=5)
    with pytest.raises(ConfigError, match=r"must be in 1\.\.160"):
        convert_weights(copy.deepcopy(ref), "int4", head_topk=161)
    with pytest.raises(ConfigError, match=r"head_topk=0 must be in 1\.\.10"):  # the same check
        RescoredHead(torch.nn.Linear(32, 10), 0)


def test_unknown_format_and_double_conversion_raise() -> None:
    with pytest.raises(ConfigError, match="int3"):
        convert_weights(_tiny(), "int3")
    model = convert_weights(_tiny(), "int4")
    with pytest.raises(ConfigError, match="already converted"):
        convert_weights(model, "w8a8")


def test_converted_model_is_not_saved(tmp_path: Path) -> None:
    """Packed integer weights and fused projections are no checkpoint: saving says so, writes nothing."""
    model = convert_weights(_tiny(), "int4")
    assert model.weight_format == "int4"
    with pytest.raises(CheckpointError, match="converted for inference"):
        save_checkpoint(tmp_path / "q", model)
    with pytest.raises(CheckpointError, match="converted for inference"):
        export_hf(tmp_path / "hf", model)
    assert not any(tmp_path.iterdir())


def test_load_with_weights(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "tiny", _tiny())
    lm = lamina.load(tmp_path / "tiny", weights="int8")
    assert isinstance(lm.model.lm_head, Int8Linear)
    assert lm.model.tok_emb.weight.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="weight format"):
        lamina.load(tmp_path / "tiny", weights="fp8")


@pytest.mark.skipif(
    not (shutil.which("c++") or shutil.which("g++")), reason="torch.compile on CPU needs a C++ compiler"
)
def test_load_with_compile(tmp_path: Path) -> None:
    """``compile=True`` on a model the compiled decode step does not cover (ALiBi; the others: tests/model/
    test_aot.py) wraps the converted model in torch.compile: the cached decode path is one graph (no graph
    break) and its logits match the eager model's."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    save_checkpoint(
        tmp_path / "tiny", Transformer(dataclasses.replace(TINY, pos_encoding="alibi", n_layers=1))
    )
    eager = lamina.load(tmp_path / "tiny", weights="int4").model
    compiled = lamina.load(tmp_path / "tiny", weights="int4", compile=True).model
    assert compiled._compiled_call_impl is not None and eager._compiled_call_impl is None
    ids = _ids(2, 9)
    counters.clear()
    outs = []
    with torch.inference_mode():
        for model in (eager, compiled):
            cache = model.new_cache(2, 16)
            steps = [model(ids[:, :6], cache=cache)] + [
                model(ids[:, t : t + 1], cache=cache) for t in (6, 7, 8)
            ]
            outs.append(torch.cat(steps, 1).float())
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    torch.testing.assert_close(outs[1], outs[0], atol=0.02, rtol=0)


# SmolLM2 over 256 tokens of real text: bounds are the measured values with a margin
SMOLLM2_BOUNDS = {
    "fp32": (1e-3, 1.0),
    "bf16": (1.5, 0.94),
    "int8": (3.5, 0.90),
    "int4": (2.5, 0.93),
    "w8a8": (8.0, 0.80),
}
TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair, we had "
    "everything before us, we had nothing before us, we were all going direct to Heaven, we were all going "
    "direct the other way. In short, the period was so far like the present period, that some of its "
    "noisiest authorities insisted on its being received, for good or for evil, in the superlative degree "
    "of comparison only.\n"
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. However little known the feelings or views of such a man may be on his first entering "
    "a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
    "considered the rightful property of some one or other of their daughters.\n"
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, "
    "and nothing particular to interest me on shore, I thought I would sail about a little and see the "
    "watery part of the world. It is a way I have of driving off the spleen and regulating the circulation."
)


@pytest.fixture(scope="module")
def smollm2_reference(lamina_smollm2: Any) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([lamina_smollm2.tokenizer.encode(TEXT)[:256]])
    assert ids.shape[1] == 256
    with torch.inference_mode():
        return ids, lamina_smollm2.model(ids).float()


@pytest.mark.parametrize("fmt", list(SMOLLM2_BOUNDS))
def test_smollm2_formats_agree_with_fp32(
    fmt: str, lamina_smollm2: Any, smollm2_reference: tuple[torch.Tensor, torch.Tensor]
) -> None:
    ids, ref = smollm2_reference
    model = convert_weights(copy.deepcopy(lamina_smollm2.model), fmt)  # the session fixture stays fp32
    err, top1 = logit_agreement(model, ref, ids)
    max_err, min_top1 = SMOLLM2_BOUNDS[fmt]
    assert err <= max_err and top1 >= min_top1, f"{fmt}: max |dlogit| {err:.3f}, top-1 agreement {top1:.3f}"
    assert lamina_smollm2.model.tok_emb.weight.dtype == torch.float32


def test_logit_agreement_stepwise_feeds_the_cache_one_token_at_a_time() -> None:
    model = _tiny()
    ids = torch.randint(0, TINY.vocab_size, (1, 12))
    with torch.no_grad():
        ref = model(ids).float()
    assert logit_agreement(model, ref, ids, stepwise=True) == pytest.approx((0.0, 1.0), abs=1e-4)
    calls: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(args[0].shape[1]), with_kwargs=True
    )
    logit_agreement(model, ref, ids, stepwise=True)
    hook.remove()
    assert calls == [1] * 12  # one token per forward, through the cache
