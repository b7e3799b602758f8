"""Prefix caching changes no output: the same requests with the cache on and off give the same greedy
tokens and logprobs (within 1e-5), through a full hit, a partial hit and an eviction."""

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


def _run(engine: Engine, prompts: list[list[int]]) -> list[Any]:
    """Each prompt alone, one after another (so later ones can hit what earlier ones stored)."""
    out = []
    for p in prompts:
        (seq,) = engine.submit(p, CFG)
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
