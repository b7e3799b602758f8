"""Beam search: tokens and ``sequences_scores`` equal `transformers`' beam search on tiny random models
(Llama, GPT-2), batched prompts of different lengths, eos hit or not; num_beams=1 is greedy on SmolLM2; a
beam request in the engine's batch with sampled and greedy ones gives what each gives alone."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers as tf

from lamina.checkpoint.hf import config_from_hf, read_hf_folder, state_dict_from_hf
from lamina.checkpoint.lamina import build_model
from lamina.config import GenerationConfig
from lamina.errors import ConfigError
from lamina.generate.beam import Beam, beam_search
from lamina.generate.engine import Engine, generate_ids, greedy_decode
from lamina.model.transformer import Transformer

V = 101
PAD = 0
PROMPTS = [[5, 17, 33, 8, 60, 2, 9], [44, 12, 7]]  # different lengths: left padding
MAX_NEW = 10


def _llama() -> tf.PreTrainedModel:
    return tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.5,  # peaked: no ties
            bos_token_id=None, eos_token_id=None, pad_token_id=PAD,
        )
    )  # fmt: skip


def _gpt2() -> tf.PreTrainedModel:
    return tf.GPT2LMHeadModel(
        tf.GPT2Config(
            vocab_size=V, n_positions=64, n_embd=64, n_layer=2, n_head=4, initializer_range=0.5,
            bos_token_id=None, eos_token_id=None, pad_token_id=PAD,
        )
    )  # fmt: skip


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Any, Transformer, int]:
    """A random `transformers` model, the same weights in lamina, and a token that, as eos, gets hit."""
    torch.manual_seed(0)
    ref = (_llama if request.param == "llama" else _gpt2)().eval()
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder)
    hf, sd = read_hf_folder(folder)
    cfg = config_from_hf(hf)
    model = build_model(cfg, state_dict_from_hf(hf, sd, cfg)).eval()
    return ref, model, _an_eos_that_gets_hit(model)


def _hf_beams(
    ref: Any, prompts: list[list[int]], eos: int | None, n: int, **kw: Any
) -> list[list[tuple[list[int], float]]]:
    """`transformers`' beam search: per prompt, n (new tokens without eos, sequences_score)."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :], mask[i, T - len(p) :] = torch.tensor(p), 1
    with torch.no_grad():
        out = ref.generate(
            ids, attention_mask=mask, do_sample=False, num_return_sequences=n, eos_token_id=eos,
            pad_token_id=PAD, return_dict_in_generate=True, output_scores=True, **kw,
        )  # fmt: skip
    rows = []
    for r in range(out.sequences.shape[0]):
        new = out.sequences[r, T:].tolist()
        if eos is not None and eos in new:
            new = new[: new.index(eos)]
        rows.append((new, float(out.sequences_scores[r])))
    return [rows[i * n : (i + 1) * n] for i in range(len(prompts))]


def _assert_equal(ours: list[list[Beam]], theirs: list[list[tuple[list[int], float]]]) -> None:
    assert len(ours) == len(theirs)
    for mine, ref in zip(ours, theirs, strict=True):
        assert [b.tokens for b in mine] == [t for t, _ in ref]
        torch.testing.assert_close(
            torch.tensor([b.score for b in mine]), torch.tensor([s for _, s in ref]), atol=1e-4, rtol=0
        )


def _an_eos_that_gets_hit(model: Transformer) -> int:
    """A token the best beam of the first prompt generates (third new token): as eos, it is hit."""
    free = beam_search(model, PROMPTS, GenerationConfig(num_beams=4, max_new_tokens=MAX_NEW, temperature=0))
    return free[0][0].tokens[2]


# (num_beams, length_penalty, early_stopping, num_return_sequences, with an eos that gets hit)
CASES = [
    (2, 1.0, False, 1, False),
    (2, 2.0, True, 2, True),
    (4, 0.5, True, 2, True),
    (4, 0.5, False, 3, True),
    (4, 1.0, True, 1, True),
    (4, 1.0, False, 4, True),
    (4, 2.0, True, 4, False),
    (4, 2.0, False, 2, True),
]


@torch.no_grad()
@pytest.mark.parametrize(("num_beams", "length_penalty", "early_stopping", "n", "with_eos"), CASES)
def test_equals_transformers_beam_search(
    pair: tuple[Any, Transformer, int],
    num_beams: int,
    length_penalty: float,
    early_stopping: bool,
    n: int,
    with_eos: bool,
) -> None:
    ref, model, eos_hit = pair
    eos = eos_hit if with_eos else None
    cfg = GenerationConfig(
        num_beams=num_beams, n=n, length_penalty=length_penalty, early_stopping=early_stopping,
        max_new_tokens=MAX_NEW, temperature=0,
    )  # fmt: skip
    ours = beam_search(model, PROMPTS, cfg, [eos] if eos is not None else [])
    theirs = _hf_beams(
        ref, PROMPTS, eos, n, num_beams=num_beams, length_penalty=length_penalty,
        early_stopping=early_stopping, max_new_tokens=MAX_NEW,
    )  # fmt: skip
    _assert_equal(ours, theirs)
    assert all(len(beams) == n for beams in ours)
    reasons = {b.finish_reason for beams in ours for b in beams}
    if not with_eos:
        assert reasons == {"length"}
    elif length_penalty < 1:  # favours short hypotheses: the eos ends some of those returned
        assert "stop" in reasons
    for beams in ours:
        assert [b.score for b in beams] == sorted((b.score for b in beams), reverse=True)


@torch.no_grad()
@pytest.mark.parametrize(
    "processors",
    [{"repetition_penalty": 1.5}, {"no_repeat_ngram_size": 2}, {"min_new_tokens": 5}],
    ids=lambda d: next(iter(d)),
)
def test_processors_act_on_log_probs_as_transformers(
    pair: tuple[Any, Transformer, int], processors: dict
) -> None:
    """HF applies its processors to the log-softmax in beam search; so does lamina. (Prompts of one length:
    HF's processors would also see the pad tokens of a left-padded batch.)"""
    ref, model, eos = pair
    prompts = [PROMPTS[0], [3, 3, 50, 61, 3, 77, 3]]
    cfg = GenerationConfig(num_beams=4, n=2, max_new_tokens=MAX_NEW, temperature=0, **processors)
    ours = beam_search(model, prompts, cfg, [eos])
    theirs = _hf_beams(ref, prompts, eos, 2, num_beams=4, max_new_tokens=MAX_NEW, **processors)
    _assert_equal(ours, theirs)
    if "min_new_tokens" in processors:
        assert all(len(b.tokens) >= 5 for beams in ours for b in beams)


@torch.no_grad()
def test_bad_input_is_a_clear_error(pair: tuple[Any, Transformer, int]) -> None:
    _, model, _ = pair
    cfg = GenerationConfig(num_beams=2, temperature=0)
    cfg.n = 3  # (the config itself refuses n > num_beams when built)
    with pytest.raises(ConfigError, match="n=3 must be <= num_beams=2"):
        beam_search(model, PROMPTS, cfg)
    with pytest.raises(ConfigError, match="empty prompt"):
        beam_search(model, [[]], GenerationConfig(num_beams=2, temperature=0))
    with pytest.raises(ConfigError, match="stop"):
        beam_search(model, PROMPTS, GenerationConfig(num_beams=2, temperature=0, stop=["x"]))


@pytest.mark.slow
@torch.no_grad()
def test_one_beam_is_greedy_on_smollm2(lamina_smollm2: Any) -> None:
    model, tok = lamina_smollm2.model, lamina_smollm2.tokenizer
    eos = lamina_smollm2.generation.eos_token_ids
    prompts = [tok.encode("The capital of France is"), tok.encode("def fibonacci(n):\n    ")]
    beams = beam_search(model, prompts, GenerationConfig(num_beams=1, max_new_tokens=16, temperature=0), eos)
    assert [b[0].tokens for b in beams] == greedy_decode(model, prompts, 16, eos)


@torch.no_grad()
def test_a_beam_request_shares_the_engine_batch_with_sampled_and_greedy_ones(
    pair: tuple[Any, Transformer, int],
) -> None:
    # before: beam search ran its own loop, outside the engine (which refused num_beams > 1)
    _, model, eos = pair
    beams = GenerationConfig(num_beams=3, n=2, max_new_tokens=MAX_NEW, temperature=0)
    sampled = GenerationConfig(temperature=0.8, seed=5, n=2, max_new_tokens=MAX_NEW, ignore_eos=True)
    greedy = GenerationConfig(temperature=0, max_new_tokens=MAX_NEW, ignore_eos=True)  # both run to the end
    ref_beams = beam_search(model, [PROMPTS[0]], beams, [eos])[0]
    alone = {
        "sampled": [s.tokens for s in generate_ids(model, [PROMPTS[1]], sampled, [eos])],
        "greedy": [s.tokens for s in generate_ids(model, [PROMPTS[1]], greedy, [eos])],
    }
    for late in (0, 2):  # the beam request joins at once, or after two steps of the others
        engine = Engine(model, None, [eos], max_batch_size=8)
        seqs = {"sampled": engine.submit(PROMPTS[1], sampled), "greedy": engine.submit(PROMPTS[1], greedy)}
        most, deltas = 0, []
        for _ in range(late):
            deltas += engine.step()
        seqs["beams"] = engine.submit(PROMPTS[0], beams)
        while engine.has_work():
            deltas += engine.step()
            most = max(most, engine.num_running)
        assert most == 2 + 1 + 3  # one batch: two sampled rows, a greedy one, the beam group's three
        for name, want in alone.items():
            assert [s.tokens for s in seqs[name]] == want, (name, late)
        got = seqs["beams"]
        assert [s.tokens for s in got] == [b.tokens for b in ref_beams]
        assert [s.score for s in got] == pytest.approx([b.score for b in ref_beams], abs=1e-5)
        assert [s.finish_reason for s in got] == [b.finish_reason for b in ref_beams]
        ends = [
            d for d in deltas if any(d.seq is s for s in got)
        ]  # each beam: one finishing delta, at the end
        assert len(ends) == 2 and all(d.finished and d.token is None for d in ends)
