"""Speculative decoding gives exactly the target's greedy output, whatever the draft: a separate tiny
model, a noisy copy of the target, the target's first layers (self-speculative), or the target itself;
in the engine's batch, next to sampled, beam and logprob requests that decode as without a draft."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lamina.config import ModelConfig
from lamina.errors import ConfigError
from lamina.generate.engine import greedy_decode
from lamina.generate.speculative import layer_skip_draft, speculative_decode
from lamina.model.transformer import Transformer

V = 64
PROMPTS = [[1, 2, 3], [7, 30, 12, 9, 41, 5, 5, 20], [60]]


def _model(seed: int, preset: str = "llama-tiny", **kw: Any) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig.preset(preset, **{"vocab_size": V, "max_seq_len": 96, "init_std": 0.3, **kw})  # peaked
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def target() -> Transformer:
    return _model(0, n_layers=4, d_model=64)


def _noisy_copy(model: Transformer, scale: float, seed: int) -> Transformer:
    """A separate model close to ``model``: it agrees with it on some tokens, not all."""
    copy = Transformer(model.config).eval()
    copy.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    return copy


@torch.no_grad()
@pytest.mark.parametrize("num_draft_tokens", [1, 3, 5])
def test_equals_greedy_with_separate_drafts(target: Transformer, num_draft_tokens: int) -> None:
    drafts = {
        "other tiny model": _model(1, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1),
        "noisy copy": _noisy_copy(target, 0.02, seed=2),
    }
    refs = greedy_decode(target, PROMPTS, 30)
    for name, draft in drafts.items():
        rates = []
        for prompt, ref in zip(PROMPTS, refs, strict=True):
            res = speculative_decode(target, prompt, 30, draft=draft, num_draft_tokens=num_draft_tokens)
            assert res.tokens == ref, (name, prompt)
            assert res.target_calls == 30 - res.accepted  # prefill, then one per token not accepted
            assert 0 <= res.accepted <= res.proposed
            rates.append(res.acceptance_rate)
        print(f"{name}, {num_draft_tokens} draft tokens: acceptance {[round(r, 2) for r in rates]}")
    # the noisy copy agrees often enough to exercise partial and full acceptance (and the rollbacks)
    assert 0.1 < speculative_decode(target, PROMPTS[1], 30, draft=drafts["noisy copy"]).acceptance_rate < 1


@torch.no_grad()
def test_draft_equal_to_target_accepts_everything_and_eos_stops(target: Transformer) -> None:
    prompt = PROMPTS[1]
    free = greedy_decode(target, [prompt], 30)[0]
    res = speculative_decode(target, prompt, 30, draft=target, num_draft_tokens=4)
    assert res.tokens == free and res.acceptance_rate == 1.0
    assert res.target_calls == 1 + 6  # prefill, then 5 tokens per verification (4 proposed + its own)
    eos = free[13]
    stopped = greedy_decode(target, [prompt], 30, eos_token_ids=[eos])[0]
    assert len(stopped) < 30
    for draft in (target, _noisy_copy(target, 0.02, seed=2)):
        for k in (1, 4):
            res = speculative_decode(target, prompt, 30, draft=draft, num_draft_tokens=k, eos_token_ids=[eos])
            assert res.tokens == stopped
    for n in (0, 1, 2, 7):  # short budgets
        assert speculative_decode(target, prompt, n, draft=target).tokens == free[:n]


@torch.no_grad()
def test_learned_positions_roll_back() -> None:
    """GPT-2-style learned positions: rejected tokens must give their position ids back."""
    gpt = _model(3, preset="tiny", n_layers=3, d_model=64)
    for prompt, ref in zip(PROMPTS, greedy_decode(gpt, PROMPTS, 24), strict=True):
        for draft_layers in (1, 2):
            assert speculative_decode(gpt, prompt, 24, draft_layers=draft_layers).tokens == ref


@torch.no_grad()
def test_layer_skip_draft_shares_weights_and_leaves_the_target_alone(target: Transformer) -> None:
    x = torch.tensor([PROMPTS[1]])
    before = target(x)
    draft = layer_skip_draft(target, 2)
    assert len(draft.blocks) == 2 and draft.config.n_layers == 2
    assert len(target.blocks) == 4 and target.config.n_layers == 4
    assert draft.blocks[1] is target.blocks[1] and draft.lm_head is target.lm_head
    torch.testing.assert_close(target(x), before, rtol=0, atol=0)
    full = layer_skip_draft(target, 4)
    torch.testing.assert_close(full(x), before, rtol=0, atol=0)
    assert draft.new_cache(1, 8).k.__len__() == 2


def test_bad_input_is_a_clear_error(target: Transformer) -> None:
    with pytest.raises(ConfigError, match="vocab_size"):
        speculative_decode(target, [1, 2], 4, draft=_model(1, vocab_size=V + 1))
    for k in (0, 5):
        with pytest.raises(ConfigError, match=f"draft_layers={k} must be in 1..4"):
            speculative_decode(target, [1, 2], 4, draft_layers=k)
    with pytest.raises(ConfigError, match="exactly one of"):
        speculative_decode(target, [1, 2], 4)
    with pytest.raises(ConfigError, match="exactly one of"):
        speculative_decode(target, [1, 2], 4, draft=target, draft_layers=2)
    with pytest.raises(ConfigError, match="num_draft_tokens"):
        speculative_decode(target, [1, 2], 4, draft=target, num_draft_tokens=0)
    with pytest.raises(ConfigError, match="empty prompt"):
        speculative_decode(target, [], 4, draft=target)


@pytest.mark.slow
@torch.no_grad()
def test_equals_greedy_on_smollm2(lamina_smollm2: Any) -> None:
    model, tok = lamina_smollm2.model, lamina_smollm2.tokenizer
    eos = lamina_smollm2.generation.eos_token_ids
    prompts = [tok.encode("The capital of France is"), tok.encode("def fibonacci(n):\n    ")]
    refs = greedy_decode(model, prompts, 16, eos)
    runs = [  # each draft on one prompt: 3 runs instead of 6 keep the test short
        ("draft_layers=8", {"draft_layers": 8}, 0),
        ("draft_layers=20", {"draft_layers": 20}, 1),
        ("draft=target", {"draft": model}, 0),
    ]
    for name, kw, i in runs:
        res = speculative_decode(model, prompts[i], 16, eos_token_ids=eos, **kw)
        print(f"{name}: acceptance {res.acceptance_rate:.2f}, {res.target_calls} target calls")
        assert res.tokens == refs[i], name
        if name == "draft=target":
            assert res.acceptance_rate == 1.0


def test_lamina_generate_decodes_speculatively_to_the_greedy_text() -> None:
    # before: speculative_decode was reached only by its own tests; lamina.generate had no way to it
    from tiny_chat import tiny_lm

    from lamina.generate.text import complete, generate

    lm = tiny_lm()
    torch.manual_seed(1)
    other = Transformer(lm.model.config).eval()  # a draft that disagrees with the target
    for prompt, budget in [("hello there", 12), ([{"role": "user", "content": "the cat"}], 40)]:
        plain = complete(lm, prompt, max_new_tokens=budget, temperature=0)
        for spec in [{"speculative_layers": 1}, {"draft": other, "num_draft_tokens": 3}, {"draft": lm}]:
            got = complete(lm, prompt, max_new_tokens=budget, temperature=0, **spec)
            (a,), (b,) = plain.choices, got.choices
            assert (b.tokens, b.text, b.finish_reason) == (a.tokens, a.text, a.finish_reason), spec
            assert generate(lm, prompt, max_new_tokens=budget, temperature=0, **spec) == a.text


@torch.no_grad()
def test_greedy_rows_speculate_in_a_batch_with_sampled_beam_and_logprob_requests(target: Transformer) -> None:
    # before: speculative decoding was a batch-1 loop of its own; the engine had no draft
    from lamina.config import GenerationConfig
    from lamina.generate.engine import Engine

    greedy = GenerationConfig(temperature=0, max_new_tokens=30)
    configs = [
        greedy,
        GenerationConfig(temperature=0.9, seed=4, n=2, max_new_tokens=20),  # sampled: decodes normally
        GenerationConfig(temperature=0, max_new_tokens=12, logprobs=True),  # logprobs: decodes normally
        GenerationConfig(temperature=0, num_beams=2, max_new_tokens=8),  # a beam group
        GenerationConfig(temperature=0, n=2, max_new_tokens=25),  # two greedy rows
    ]
    prompts = [PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[0], PROMPTS[2]]
    plain = [_run(Engine(target), p, c) for p, c in zip(prompts, configs, strict=True)]
    for draft in (layer_skip_draft(target, 2), _noisy_copy(target, 0.02, seed=2)):
        engine = Engine(target, draft=draft, num_draft_tokens=3, max_batch_size=16)
        seqs = [engine.submit(p, c) for p, c in zip(prompts, configs, strict=True)]
        while engine.has_work():
            engine.step()
        for want, got in zip(plain, seqs, strict=True):
            assert [(s.tokens, s.finish_reason) for s in got] == [w[:2] for w in want]
            for s, w in zip(
                got, want, strict=True
            ):  # (a batch with proposals reads a mask: last bits differ)
                assert [lp.logprob for lp in s.logprobs or []] == pytest.approx(
                    [lp.logprob for lp in w[2] or []], abs=1e-4
                )
        stats = engine.draft_stats
        assert stats is not None and 0 < stats.accepted <= stats.proposed
        assert stats.proposed <= 3 * (30 + 25 + 25)  # only the three greedy rows proposed


def _run(engine: Any, prompt: list[int], cfg: Any) -> list[tuple[list[int], str | None, Any]]:
    seqs = engine.submit(prompt, cfg)
    while engine.has_work():
        engine.step()
    return [(s.tokens, s.finish_reason, s.logprobs) for s in seqs]


def test_stream_text_chat_and_batches_decode_speculatively() -> None:
    from tiny_chat import tiny_lm

    from lamina.generate.batch import generate_batch
    from lamina.generate.chat import chat_loop
    from lamina.generate.text import complete, stream_text

    lm = tiny_lm()
    plain = complete(lm, "hello there", max_new_tokens=20, temperature=0)
    got = complete(lm, "hello there", max_new_tokens=20, temperature=0, speculative_layers=1)
    assert got.text == plain.text and got.draft is not None and got.draft.proposed > 0
    assert "draft accepted" in got.summary()
    assert "".join(stream_text(lm, "hello there", max_new_tokens=20, temperature=0, draft=lm)) == plain.text
    requests = [{"prompt": "hello there"}, {"prompt": "the cat", "temperature": 0.8, "seed": 2}]
    stats: dict[str, Any] = {}
    rows = generate_batch(lm, requests, max_new_tokens=20, temperature=0, speculative_layers=1, stats=stats)
    assert rows == generate_batch(lm, requests, max_new_tokens=20, temperature=0)
    assert stats["draft"].proposed > 0
    lines = iter(["hello", "the cat"])
    kw: dict[str, Any] = {"max_new_tokens": 8, "temperature": 0, "repetition_penalty": 1.0}
    history = chat_loop(lm, lambda: next(lines, None), lambda _: None, **kw)
    lines = iter(["hello", "the cat"])
    assert (
        chat_loop(lm, lambda: next(lines, None), lambda _: None, speculative_layers=1, stats=stats, **kw)
        == history
    )


def test_a_draft_and_a_layer_count_together_are_refused() -> None:
    from tiny_chat import tiny_lm

    from lamina.generate.text import complete

    with pytest.raises(ConfigError, match="not both") as err:
        complete(tiny_lm(), "hello", speculative_layers=1, draft="x", temperature=0)
    assert "\n" not in str(err.value)
