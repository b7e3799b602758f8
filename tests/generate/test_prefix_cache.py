"""Prefix caching changes no output: the same requests with the cache on and off give the same greedy
tokens and logprobs (within 1e-5), through a full hit, a partial hit and an eviction, with a LoRA adapter,
and with a hit followed by chunked prefill; admission charges only what follows a cached prefix; dynamic
RoPE turns caching and chunking off."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lamina.config import GenerationConfig
from lamina.errors import ConfigError
from lamina.generate.engine import Engine
from lamina.generate.prefix_cache import PrefixCache

CFG = GenerationConfig(temperature=0.0, max_new_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=2)
SYSTEM = [(7 * i) % 40 + 1 for i in range(40)]  # a 40-token shared "system prompt": 2 whole blocks of 16


def _model() -> Any:
    from lamina.config import ModelConfig
    from lamina.model.transformer import Transformer

    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("llama-tiny", vocab_size=48, max_seq_len=96)).eval()


def _run(engine: Engine, prompts: list[list[int]], adapter: int = 0) -> list[Any]:
    """Each prompt alone, one after another (so later ones can hit what earlier ones stored)."""
    out = []
    for p in prompts:
        (seq,) = engine.submit(p, CFG, adapter=adapter)
        while engine.has_work():
            engine.step()
        out.append(seq)
    return out


@torch.no_grad()
def test_cache_on_and_off_give_the_same_tokens_and_logprobs() -> None:
    model = _model()
    prompts = [
        [*SYSTEM, 3, 4, 5],  # stores 2 blocks
        [*SYSTEM, 9, 8],  # full hit of both blocks
        SYSTEM[:20] + [2] * 30,  # partial hit: the first block only, then its own blocks
        [11, 12, 13] * 12,  # unrelated: 2 new blocks evict the least recent ones (budget: 4 blocks)
        [*SYSTEM, 6],  # its second block was evicted: hit of the first only
        SYSTEM[:16],  # exactly one block: never the whole prompt (its last token must run)
    ]
    off = _run(Engine(model), prompts)
    engine = Engine(model, prefix_cache_mib=1.0)
    pc = engine.prefix_cache
    assert pc is not None
    pc.max_bytes = 4 * pc.block_bytes
    on, hits = [], []
    for p in prompts:
        before = pc.stats.hit
        on += _run(engine, [p])
        hits.append(pc.stats.hit - before)
        assert pc.num_blocks <= 4
    assert hits == [0, 32, 16, 0, 16, 0]
    assert pc.stats.evicted > 0
    for a, b in zip(off, on, strict=True):
        assert a.tokens == b.tokens
        assert a.logprobs is not None and b.logprobs is not None
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-5)
            assert [t for t, _ in x.top] == [t for t, _ in y.top]


@torch.no_grad()
def test_a_loaded_prefix_holds_the_keys_the_prompt_computes() -> None:
    model = _model()
    prompt = [*SYSTEM, 1, 2]
    pc = PrefixCache(model.config, 2**20)
    full = model.new_cache(1, len(prompt))
    model(torch.tensor([prompt]), cache=full)
    pc.store(prompt, full)
    assert pc.num_blocks == 2
    loaded = model.new_cache(1, len(prompt))
    assert pc.load(prompt, loaded) == 32
    for a, b in zip(full.k + full.v, loaded.k + loaded.v, strict=True):
        torch.testing.assert_close(a[:, :, :32], b[:, :, :32], atol=1e-6, rtol=0)
    assert pc.load(prompt, model.new_cache(1, len(prompt)), salt=1) == 0  # another adapter's keys differ
    assert pc.load([5, *prompt], model.new_cache(1, 50)) == 0  # matching starts at the first token


def test_a_negative_budget_is_an_error() -> None:
    with pytest.raises(ConfigError, match="prefix_cache_mib"):
        Engine(_model(), prefix_cache_mib=-1)


def _with_adapter(model: Any) -> Any:
    """``model`` with one random LoRA adapter (1) on every key and value projection: its keys differ."""
    from lamina.model.lora import add_multi_adapter

    g = torch.Generator().manual_seed(1)
    layers = {}
    for b in range(model.config.n_layers):
        for name in ("k_proj", "v_proj"):
            lin = model.get_submodule(f"blocks.{b}.attn.{name}")
            a = torch.randn(4, lin.in_features, generator=g) * 0.1
            layers[f"blocks.{b}.attn.{name}"] = (a, torch.randn(lin.out_features, 4, generator=g) * 0.1, 2.0)
    assert add_multi_adapter(model, "a", layers) == 1
    return model


@torch.no_grad()
def test_a_cached_prefix_of_a_lora_adapter_changes_no_output() -> None:
    model = _with_adapter(_model())
    prompts = [([*SYSTEM, 3, 4, 5], 1), ([*SYSTEM, 9, 8], 1), ([*SYSTEM, 9, 8], 0)]
    off = [_run(Engine(model), [p], adapter=k)[0] for p, k in prompts]
    engine = Engine(model, prefix_cache_mib=1.0)
    pc = engine.prefix_cache
    assert pc is not None
    on, hits = [], []
    for p, k in prompts:
        before = pc.stats.hit
        on += _run(engine, [p], adapter=k)
        hits.append(pc.stats.hit - before)
    assert hits == [0, 32, 0]  # the base does not read the adapter's keys
    assert abs(off[1].logprobs[0].logprob - off[2].logprobs[0].logprob) > 1e-3  # the adapter matters
    _assert_same(off, on)


@torch.no_grad()
def test_a_cache_hit_then_chunks_changes_no_output() -> None:
    model = _model()
    prompts = [[*SYSTEM, 1], [*SYSTEM, *[(5 * k) % 47 for k in range(38)]]]  # the second: 32 cached + 38
    off = _run(Engine(model), prompts)
    engine = Engine(model, max_prefill_tokens=16, prefix_cache_mib=1.0)
    pc = engine.prefix_cache
    assert pc is not None
    _run(engine, prompts[:1])
    (seq,) = engine.submit(prompts[1], CFG)
    engine.step()
    assert pc.stats.hit == 32 and not seq.tokens and engine.num_queued == 1  # the rest goes in chunks
    while engine.has_work():
        engine.step()
    _assert_same(off, [off[0], seq])


@torch.no_grad()
def test_admission_charges_only_what_follows_a_cached_prefix() -> None:
    from lamina.config import ModelConfig
    from lamina.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("llama-tiny", vocab_size=48, max_seq_len=520)).eval()
    prefix = [(7 * i) % 40 + 1 for i in range(496)]  # 31 blocks
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=1, ignore_eos=True)
    admitted = []
    for mib in (0.0, 4.0):
        engine = Engine(model, max_prefill_tokens=1024, prefix_cache_mib=mib)
        engine.submit([*prefix, 1], cfg)
        engine.step()  # stores the prefix (with the cache on)
        for k in range(4):
            engine.submit([*prefix, k, k], cfg)
        deltas = engine.step(decode=False)
        admitted.append(len(deltas))
    assert admitted == [2, 4]  # 498 + 498 <= 1024 < 3 * 498; cached: 2 tokens charged each


@torch.no_grad()
def test_dynamic_rope_prefills_whole_prompts_without_a_cache() -> None:
    # dynamic RoPE scales a forward by its longest position: a cached block's keys would depend on the prompt
    # that stored them, a chunk's on the chunk (logprobs off by ~1e-3): the engine turns both off
    from lamina.config import ModelConfig
    from lamina.model.transformer import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig.preset(
        "llama-tiny", vocab_size=48, max_seq_len=128, rope_scaling="dynamic", rope_factor=2.0,
        rope_original_max_seq_len=32,
    )  # fmt: skip
    model = Transformer(cfg).eval()
    long = [(3 * k) % 47 + 1 for k in range(100)]
    prompts = [long, [*long[:16], 5, 6, 7]]  # the second starts with the first's first block
    alone = [_run(Engine(model), [p])[0] for p in prompts]
    engine = Engine(model, max_prefill_tokens=16, prefix_cache_mib=1.0)
    assert engine.prefix_cache is None
    (seq,) = engine.submit(long, CFG)
    engine.step()
    assert seq.tokens  # whole, not in chunks
    while engine.has_work():
        engine.step()
    _assert_same(alone, [seq, *_run(engine, prompts[1:])])


def _assert_same(a_seqs: list[Any], b_seqs: list[Any]) -> None:
    for a, b in zip(a_seqs, b_seqs, strict=True):
        assert a.tokens == b.tokens
        assert a.logprobs is not None and b.logprobs is not None
        assert [x.logprob for x in a.logprobs] == pytest.approx([y.logprob for y in b.logprobs], abs=1e-5)
