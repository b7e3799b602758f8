"""Hugging Face import/export: lamina's logits equal `transformers`' on tiny random models of each family."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf

from lamina.checkpoint.hf import config_from_hf, read_hf_folder, state_dict_from_hf
from lamina.checkpoint.lamina import build_model
from lamina.errors import CheckpointError
from lamina.model.transformer import Transformer

V = 101


def _gpt2() -> tf.PreTrainedModel:
    return tf.GPT2LMHeadModel(
        tf.GPT2Config(
            vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
        )
    )


def _llama(**kw: object) -> tf.PreTrainedModel:
    base = dict(
        vocab_size=V,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,  # GQA
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    return tf.LlamaForCausalLM(tf.LlamaConfig(**{**base, **kw}))


def _bloom() -> tf.PreTrainedModel:
    return tf.BloomForCausalLM(tf.BloomConfig(vocab_size=V, hidden_size=48, n_layer=2, n_head=6))


FAMILIES = {
    "gpt2": _gpt2,
    "llama-gqa": _llama,
    "llama-mqa-untied-bias": lambda: _llama(
        num_key_value_heads=1, tie_word_embeddings=False, attention_bias=True, mlp_bias=True
    ),
    "llama-rope-linear": lambda: _llama(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama-rope-dynamic": lambda: _llama(
        max_position_embeddings=8, rope_scaling={"rope_type": "dynamic", "factor": 2.0}
    ),
    "llama-rope-llama3": lambda: _llama(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "original_max_position_embeddings": 16,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
        }
    ),
    "bloom-alibi": _bloom,
}


def _perturb(model: torch.nn.Module) -> None:
    """Random norm weights and biases, so that a mapping bug in them cannot hide behind ones and zeros."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Transformer]:
    torch.manual_seed(0)
    ref = FAMILIES[request.param]().eval()
    _perturb(ref)
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder)
    hf, sd = read_hf_folder(folder)
    cfg = config_from_hf(hf)
    return ref, build_model(cfg, state_dict_from_hf(hf, sd, cfg))


def _ids(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, V, (b, t), generator=torch.Generator().manual_seed(seed))


def _reference_logits(ref: Any, model: Transformer, x: torch.Tensor, prefill: int) -> torch.Tensor:
    """What cached decoding of ``x`` (``prefill`` tokens, then one at a time) must give.

    A full forward, except for dynamic NTK RoPE: its base changes as the sequence grows, so cached keys
    keep the base they were rotated with, and the reference is transformers' own incremental decoding.
    """
    if model.config.rope_scaling != "dynamic":
        return ref(x).logits
    out = ref(x[:, :prefill], use_cache=True)
    logits, past = [out.logits], out.past_key_values
    for t in range(prefill, x.shape[1]):
        out = ref(x[:, t : t + 1], past_key_values=past, use_cache=True)
        logits.append(out.logits)
        past = out.past_key_values
    return torch.cat(logits, dim=1)


@torch.no_grad()
def test_full_forward_matches(pair: tuple) -> None:
    ref, model = pair
    x = _ids(3, 20)
    torch.testing.assert_close(model(x), ref(x).logits, atol=1e-4, rtol=0)


@torch.no_grad()
def test_kv_cache_token_by_token_matches(pair: tuple) -> None:
    ref, model = pair
    x = _ids(2, 16, seed=1)
    full = _reference_logits(ref, model, x, prefill=4)
    cache = model.new_cache(2, capacity=32)
    steps = [model(x[:, :4], cache=cache)] + [model(x[:, t : t + 1], cache=cache) for t in range(4, 16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_rows_equal_rows_alone(pair: tuple, side: str) -> None:
    ref, model = pair
    lengths = [12, 7, 3]
    rows = [_ids(1, n, seed=10 + n)[0] for n in lengths]
    T = max(lengths)
    ids = torch.full((len(rows), T), 2, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    batched = model(ids, attention_mask=mask)
    for i, r in enumerate(rows):
        alone_ref = ref(r[None]).logits[0]
        sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        torch.testing.assert_close(batched[i, sl], alone_ref, atol=1e-4, rtol=0)


@torch.no_grad()
def test_left_padded_cache_decoding_matches_alone(pair: tuple) -> None:
    """Prefill a left-padded batch into the cache, then decode step by step: each row as if alone."""
    ref, model = pair
    rows = [_ids(1, 9, seed=3)[0], _ids(1, 4, seed=4)[0]]
    cont = _ids(2, 5, seed=5)
    ids = torch.full((2, 9), 2, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, 9 - len(r) :], mask[i, 9 - len(r) :] = r, 1
    cache = model.new_cache(2, capacity=16)
    model(ids, attention_mask=mask, cache=cache)
    steps = [model(cont[:, t : t + 1], cache=cache)[:, 0] for t in range(5)]
    for i, r in enumerate(rows):
        alone = _reference_logits(ref, model, torch.cat([r, cont[i]])[None], prefill=len(r))[0, len(r) :]
        torch.testing.assert_close(torch.stack([s[i] for s in steps]), alone, atol=1e-4, rtol=0)


def test_unknown_model_type_is_a_clear_error() -> None:
    with pytest.raises(CheckpointError, match=r"model_type='bart'.*supported: gpt2, llama"):
        config_from_hf({"model_type": "bart"})


def test_folder_without_weights_or_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        read_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        read_hf_folder(tmp_path)


def test_truncated_safetensors_is_a_clear_error(tmp_path: Path) -> None:
    _llama().save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_hf_folder(tmp_path)
