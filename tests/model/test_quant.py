"""Weight formats (``lamina.model.quant``): each one's logits against fp32, on a tiny model and on SmolLM2.

The SmolLM2 bounds are the measured error with a margin (measured over the 256 positions below,
bf16 max |dlogit| 0.89, top-1 0.969; int8 2.5, 0.949; w8a8 5.0, 0.859; see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

import lamina
from lamina.checkpoint.lamina import save_checkpoint
from lamina.config import ModelConfig
from lamina.errors import ConfigError
from lamina.model.quant import (
    FORMATS,
    DynamicInt8Linear,
    Int8Linear,
    convert_weights,
    logit_agreement,
    quantize_per_channel,
)
from lamina.model.transformer import Transformer

TINY = ModelConfig(
    vocab_size=97, max_seq_len=64, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=96,
    pos_encoding="rope", norm="rmsnorm", activation="swiglu", bias=False, tie_embeddings=True,
)  # fmt: skip


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


# tiny random model: max |dlogit| bound per format (its logits are of order 1)
TINY_BOUNDS = {"fp32": 0.0, "bf16": 0.05, "int8": 0.05, "w8a8": 0.1}


@pytest.mark.parametrize("fmt", FORMATS)
def test_tiny_model_formats(fmt: str) -> None:
    ref = _tiny()
    ids = _ids(2, 16)
    with torch.no_grad():
        want = ref(ids)
    model = convert_weights(copy.deepcopy(ref), fmt)
    linear = model.blocks[0].mlp.up_proj
    kind = {"int8": Int8Linear, "w8a8": DynamicInt8Linear}.get(fmt, torch.nn.Linear)
    assert isinstance(linear, kind) and isinstance(model.lm_head, kind)
    with torch.no_grad():
        got = model(ids)
        # decoding through the cache gives the same logits as one forward, in every format
        cache = model.new_cache(2, 16)
        steps = torch.cat([model(ids[:, :10], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(10, 16)], 1)  # fmt: skip
    assert cache.k[0].dtype == (torch.bfloat16 if fmt in ("bf16", "int8") else torch.float32)
    assert (got.float() - want).abs().max() <= TINY_BOUNDS[fmt]
    torch.testing.assert_close(steps.float(), got.float(), atol=0.03 if fmt != "fp32" else 1e-5, rtol=0)


def test_unknown_format_and_double_conversion_raise() -> None:
    with pytest.raises(ConfigError, match="int4"):
        convert_weights(_tiny(), "int4")
    model = convert_weights(_tiny(), "int8")
    with pytest.raises(ConfigError, match="already int8"):
        convert_weights(model, "w8a8")


def test_load_with_weights(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "tiny", _tiny())
    lm = lamina.load(tmp_path / "tiny", weights="int8")
    assert isinstance(lm.model.lm_head, Int8Linear)
    assert lm.model.tok_emb.weight.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="weight format"):
        lamina.load(tmp_path / "tiny", weights="fp8")


# SmolLM2 over 256 tokens of real text: bounds are the measured values with a margin
SMOLLM2_BOUNDS = {"bf16": (1.5, 0.94), "int8": (3.5, 0.90), "w8a8": (8.0, 0.80)}
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
