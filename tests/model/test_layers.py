"""lamina.model.layers: the inference copies of small projections (``inference_linear``) that decoding
steps use without changing the model."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import lamina.model.layers as layers
from lamina.config import ModelConfig
from lamina.model.transformer import Transformer


def _model(bias: bool) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=64,
                      norm="rmsnorm", activation="swiglu", pos_encoding="rope", bias=bias, init_std=0.2)  # fmt: skip
    return Transformer(cfg).eval()


def _steps(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V): a prefill of 4 tokens, then one decoding step per token."""
    cache = model.new_cache(ids.shape[0], 16)
    with torch.no_grad():
        out = [model(ids[:, :4], cache=cache)]
        out += [model(ids[:, t : t + 1], cache=cache) for t in range(4, ids.shape[1])]
    return torch.cat(out, 1)


@pytest.mark.parametrize("bias", [False, True])
def test_decoding_steps_with_inference_copies_equal_the_plain_layers(
    bias: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stacked q/k/v and gate/up, prepacked on CPU: the decoding steps' logits equal the plain layers'
    (1e-5), the copies are made and held apart from the state dict, and follow a weight that changes."""
    model = _model(bias)
    ids = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(1))
    keys = set(model.state_dict())
    got = _steps(model, ids)
    held = model.blocks[0].attn.__dict__["_inference_copies"]
    assert {"_qkv", "_o"} <= set(held) and {"_gate_up", "_down"} <= set(model.blocks[0].mlp._inference_copies)
    assert set(model.state_dict()) == keys
    monkeypatch.setattr(layers, "STACK_MAX_ELEMENTS", 0)  # the plain layers
    want = _steps(model, ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        model.blocks[1].attn.k_proj.weight.mul_(1.5)  # an optimizer step, in effect
    want = _steps(model, ids)
    monkeypatch.undo()
    torch.testing.assert_close(_steps(model, ids), want, atol=1e-5, rtol=1e-5)


def test_autograd_prompts_and_lora_take_the_plain_layers() -> None:
    """No copy with autograd on, for a prompt's forward (T > 1) or for a module that is not an nn.Linear."""
    model = _model(False)
    attn = model.blocks[0].attn
    x = torch.randn(2, 1, 64)
    parts = (attn.q_proj, attn.k_proj, attn.v_proj)
    assert layers.inference_linear(attn, "t", x, *parts) is None  # autograd is on
    with torch.no_grad():
        assert layers.inference_linear(attn, "t", torch.randn(2, 3, 64), *parts) is None
        assert layers.inference_linear(attn, "t", x, attn.q_proj, torch.nn.Identity()) is None
        y = layers.inference_linear(attn, "t", x, *parts)
    assert y is not None and y.shape == (2, 1, 64 + 2 * 32)


def test_a_model_with_copies_deep_copies_and_pickles() -> None:
    """The held copies (a prepacked weight cannot be copied) stay behind; the copy makes its own."""
    model = _model(True)
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(2))
    want = _steps(model, ids)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert not other.blocks[0].attn.__dict__["_inference_copies"]
        torch.testing.assert_close(_steps(other, ids), want, atol=0, rtol=0)
