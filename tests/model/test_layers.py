"""lamina.model.layers: the inference copies of small projections (``inference_linear``) that decoding
steps use without changing the model."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

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
    assert model._inference_copies  # the head's copy
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert not other.blocks[0].attn.__dict__["_inference_copies"] and not other._inference_copies
        torch.testing.assert_close(_steps(other, ids), want, atol=0, rtol=0)


def test_copies_follow_swapped_converted_and_data_written_weights() -> None:
    """A copy is made again for a weight swapped in (``load_state_dict(assign=True)``: same address and
    version possible), dropped by ``.to()``, and by ``clear_inference_copies`` after a write through
    ``.data`` (unseen otherwise); inference tensors take the plain path. Stacked + prepacked: one copy."""
    model = _model(False)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    _steps(model, ids)
    attn, held = model.blocks[0].attn, model.blocks[0].attn._inference_copies
    if layers._MKLDNN:  # the prepacked weight only, not the stacked one too
        assert held["_qkv"][1][0] is None and held["_qkv"][1][2] is not None
    before = held["_qkv"]
    attn.q_proj.weight = torch.nn.Parameter(attn.q_proj.weight.detach())  # same address and version
    _steps(model, ids)
    assert held["_qkv"] is not before  # another tensor: made again
    new = {k: v * 0.5 if k.endswith("weight") else v for k, v in model.state_dict().items()}
    model.load_state_dict(new, assign=True)
    plain = _model(False)
    plain.load_state_dict(new)
    want = _plain_steps(plain, ids)
    torch.testing.assert_close(_steps(model, ids), want, atol=1e-5, rtol=1e-5)
    model.double().float()
    assert not held and not model._inference_copies
    _steps(model, ids)
    attn.q_proj.weight.data.mul_(2.0)  # unseen by the copies (same tensor, same version) ...
    plain.blocks[0].attn.q_proj.weight.data.mul_(2.0)
    layers.clear_inference_copies(model)  # ... until they are dropped
    torch.testing.assert_close(_steps(model, ids), _plain_steps(plain, ids), atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        w = torch.randn(3, 4)
    assert layers.inference_copy(attn, "t", [w], lambda: w.t()) is None


def _plain_steps(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layers, "STACK_MAX_ELEMENTS", -1)  # no copies, the small head's included
        mp.setattr(Transformer, "_DECODE_ROWS", 0)
        return _steps(model, ids)


def test_autocast_takes_the_plain_layers() -> None:
    """Under CPU autocast a layer returns F.linear's bfloat16, which a float32 copy would not."""
    model = _model(False)
    attn = model.blocks[0].attn
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert layers.inference_linear(attn, "t", torch.randn(2, 1, 64), attn.q_proj, attn.k_proj) is None
        assert model._head_t(torch.randn(1, 1, 64)) is None


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")
def test_the_onednn_path_is_taken_and_falls_back_for_good_when_its_ops_fail(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the pinned torch the prepacked path runs and equals F.linear (1e-5); a failing private op
    turns it off for the process, with the stacked F.linear (or the module) giving the same values."""
    lin = torch.nn.Linear(64, 48)
    owner, x = torch.nn.Module(), torch.randn(3, 1, 64)
    monkeypatch.setattr(layers, "_MKLDNN", True)
    with torch.no_grad():
        y = layers.inference_linear(owner, "one", x, lin)
        assert y is not None and owner._inference_copies["one"][1][2] is not None
        torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)

        def fail(*args: object) -> None:
            raise RuntimeError("no such op")

        monkeypatch.setattr(layers, "packed_linear", fail)
        assert layers.inference_linear(owner, "one", x, lin) is None and not layers._MKLDNN
        monkeypatch.setattr(layers, "_MKLDNN", True)
        monkeypatch.setattr(layers, "prepack", fail)
        two = torch.nn.Linear(64, 16)
        y = layers.inference_linear(owner, "two", x, lin, two)
        assert y is not None and not layers._MKLDNN
        want = torch.cat([F.linear(x, lin.weight, lin.bias), F.linear(x, two.weight, two.bias)], -1)
        torch.testing.assert_close(y, want, atol=1e-6, rtol=1e-6)


def test_the_transposed_head_takes_a_non_contiguous_last_position_as_one_matmul() -> None:
    """A prefill's last positions h[:, -1:] (B, 1, d), not contiguous, through the transposed head: one
    2-D matmul, equal to the plain head. torch.matmul sent it to bmm, which expanded the (d, V) head to
    (B, d, V) and copied it (906 MB for 16 SmolLM2 prompts in bf16)."""
    model = _model(False).to(torch.bfloat16)
    h = torch.randn(4, 3, 64, dtype=torch.bfloat16)[:, -1:]
    assert not h.is_contiguous()
    with torch.no_grad():
        assert model._head_t(h) is not None  # the transposed-head path is the one under test
        with torch.profiler.profile() as prof:
            logits = model._lm_logits(h)
    assert "aten::bmm" not in {e.name for e in prof.events()}
    assert torch.allclose(logits.float(), model.lm_head(h).float(), atol=1e-2)


def test_cross_attention_mask_is_sdpas_bool_mask_made_once() -> None:
    valid = torch.tensor([[True, True, False], [False, False, False]])
    mask = layers.cross_attention_mask(valid, torch.float32)
    assert mask is not None and mask.shape == (2, 1, 1, 3)
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 4, 3, 8), torch.randn(2, 4, 3, 8)
    keys = (valid | ~valid.any(1, keepdim=True))[:, None, None, :]  # a row with no real slot reads all
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=keys)
    assert torch.equal(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), want)
    assert layers.cross_attention_mask(torch.ones(2, 3, dtype=torch.bool), torch.float32) is None
    assert (
        layers.cross_attention_mask(torch.ones(2, 3, dtype=torch.bool), torch.float32, check_all=False)
        is not None
    )
    # the cache computes it once per set of rows; rows leaving (keep) make it again
    cfg = ModelConfig.preset("t5-tiny")
    cache = layers.KVCache(cfg, batch_size=2, capacity=4)
    cache.memory_valid = valid
    first = cache.cross_mask(torch.float32)
    assert cache.cross_mask(torch.float32) is first
    cache.memory_valid = valid[:1]
    assert cache.cross_mask(torch.float32).shape == (1, 1, 1, 3)
