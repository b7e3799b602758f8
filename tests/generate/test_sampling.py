"""The sampler: GenerationConfig validation, each processor against `transformers` or a hand computation,
llama.cpp's DRY / XTC / mirostat / top-n-sigma / dynamic temperature, seeds and batch independence."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers.generation import logits_process as hf

from lamina.config import SAMPLER_NAMES, GenerationConfig, load_yaml, save_yaml
from lamina.errors import ConfigError
from lamina.generate import sampling as S
from lamina.generate.sampling import MirostatState, Sampler

NEG_INF = float("-inf")
SEEDS = range(6)


def _logits_and_ids(seed: int, B: int = 4, V: int = 64, L: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits (B, V) and histories (B, L) with repeats in them (so penalties and n-grams bite)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * 3
    ids = torch.randint(0, V, (B, L), generator=g)
    ids[:, -3:] = ids[:, 3:6]  # the end repeats an earlier trigram
    ids[:, 8] = ids[:, 0]
    return logits, ids


def _kept(logits: torch.Tensor) -> list[set[int]]:
    """The candidates (finite logits) of each row."""
    return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in logits]


def _from_probs(*probs: Sequence[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float()


# ===================================================================================== GenerationConfig


def test_every_field_round_trips_through_yaml(tmp_path: Path) -> None:
    cfg = GenerationConfig(
        max_new_tokens=50, min_new_tokens=3, eos_token_ids=[2], ignore_eos=True, stop=["\n\n"],
        include_stop_str_in_output=True, stop_token_ids=[7], do_sample=True, temperature=0.7,
        dynatemp_range=0.3, dynatemp_exponent=1.5, top_k=40, top_p=0.9, min_p=0.05, typical_p=0.95,
        top_n_sigma=1.5, repetition_penalty=1.1, repetition_penalty_last_n=64, frequency_penalty=0.5,
        presence_penalty=-0.5, dry_multiplier=0.8, dry_base=2.0, dry_allowed_length=3, dry_penalty_last_n=128,
        dry_sequence_breakers=["\n"], xtc_probability=0.5, xtc_threshold=0.2, logit_bias={5: -1.5, 9: NEG_INF},
        bad_words_ids=[[3], [4, 5]], allowed_token_ids=[1, 2, 3, 4, 5, 9], no_repeat_ngram_size=3, n=2, seed=7,
        logprobs=True, top_logprobs=5, prompt_logprobs=2, samplers=list(reversed(SAMPLER_NAMES)),
    )  # fmt: skip
    beams = GenerationConfig(num_beams=4, n=2, length_penalty=0.8, early_stopping=True, temperature=0.0)
    mirostat = GenerationConfig(mirostat=2, mirostat_tau=3.0, mirostat_eta=0.2)
    for c in (cfg, beams, mirostat):
        save_yaml(c, tmp_path / "generation.yaml")
        assert load_yaml(GenerationConfig, tmp_path / "generation.yaml") == c


def test_logit_bias_accepts_json_string_keys_and_int_values() -> None:
    cfg = GenerationConfig(logit_bias={"50": -100, 3: 2})  # type: ignore[dict-item]
    assert cfg.logit_bias == {50: -100.0, 3: 2.0} and all(
        isinstance(v, float) for v in cfg.logit_bias.values()
    )


def test_sampling_resolution() -> None:
    assert GenerationConfig().sampling  # temperature 1.0: sample
    assert not GenerationConfig(temperature=0.0).sampling
    assert not GenerationConfig(do_sample=False).sampling
    assert not GenerationConfig(num_beams=3).sampling  # beam search
    assert GenerationConfig(do_sample=True, temperature=0.5).sampling


INVALID: list[tuple[dict[str, Any], list[str]]] = [
    (dict(max_new_tokens=-1), ["max_new_tokens=-1", ">= 0"]),
    (dict(min_new_tokens=-2), ["min_new_tokens=-2"]),
    (dict(min_new_tokens=9, max_new_tokens=8), ["min_new_tokens=9", "max_new_tokens=8"]),
    (dict(eos_token_ids=[-1]), ["eos_token_ids=[-1]"]),
    (dict(eos_token_ids=[1.5]), ["eos_token_ids", "list[int]"]),
    (dict(ignore_eos="yes"), ["ignore_eos", "bool"]),
    (dict(stop=[""]), ["stop=['']", "empty"]),
    (dict(stop="###"), ["stop", "list[str]"]),
    (dict(include_stop_str_in_output=1), ["include_stop_str_in_output", "bool"]),
    (dict(stop_token_ids=[-4]), ["stop_token_ids=[-4]"]),
    (dict(do_sample="auto"), ["do_sample", "bool or None"]),
    (dict(temperature=-0.5), ["temperature=-0.5", ">= 0"]),
    (dict(temperature=math.inf), ["temperature=inf", "finite"]),
    (dict(dynatemp_range=-1), ["dynatemp_range=-1.0"]),
    (dict(dynatemp_exponent=0), ["dynatemp_exponent=0.0", "> 0"]),
    (dict(top_k=-1), ["top_k=-1", ">= 0"]),
    (dict(top_p=1.5), ["top_p=1.5 must be in (0, 1]"]),
    (dict(top_p=0), ["top_p=0.0 must be in (0, 1]"]),
    (dict(min_p=1.2), ["min_p=1.2", "[0, 1]"]),
    (dict(typical_p=0.0), ["typical_p=0.0", "(0, 1]"]),
    (dict(top_n_sigma=0.0), ["top_n_sigma=0.0", "> 0", "-1"]),
    (dict(top_n_sigma=-2), ["top_n_sigma=-2.0"]),
    (dict(repetition_penalty=0), ["repetition_penalty=0.0", "> 0"]),
    (dict(repetition_penalty_last_n=-2), ["repetition_penalty_last_n=-2", ">= -1"]),
    (dict(frequency_penalty=2.5), ["frequency_penalty=2.5", "[-2, 2]"]),
    (dict(presence_penalty=-3), ["presence_penalty=-3.0", "[-2, 2]"]),
    (dict(dry_multiplier=-0.1), ["dry_multiplier=-0.1"]),
    (dict(dry_base=0.9), ["dry_base=0.9", ">= 1"]),
    (dict(dry_allowed_length=0), ["dry_allowed_length=0", ">= 1"]),
    (dict(dry_penalty_last_n=-5), ["dry_penalty_last_n=-5"]),
    (dict(dry_sequence_breakers=["\n", ""]), ["dry_sequence_breakers", "empty"]),
    (dict(xtc_probability=1.5), ["xtc_probability=1.5", "[0, 1]"]),
    (dict(xtc_threshold=-0.1), ["xtc_threshold=-0.1", "[0, 1]"]),
    (dict(mirostat=3), ["mirostat=3", "0 (off), 1", "2"]),
    (dict(mirostat=True), ["mirostat=True", "int"]),
    (dict(mirostat_tau=0), ["mirostat_tau=0.0", "> 0"]),
    (dict(mirostat_eta=-1), ["mirostat_eta=-1.0", "> 0"]),
    (dict(logit_bias={-1: 2.0}), ["logit_bias", "token ids >= 0"]),
    (dict(logit_bias={1: math.inf}), ["logit_bias", "-inf"]),
    (dict(logit_bias={"x": 1.0}), ["logit_bias", "dict[int, float]"]),
    (dict(bad_words_ids=[[1], []]), ["bad_words_ids", "non-empty"]),
    (dict(bad_words_ids=[1, 2]), ["bad_words_ids", "list[list[int]]"]),
    (dict(allowed_token_ids=[]), ["allowed_token_ids=[]", "non-empty"]),
    (dict(no_repeat_ngram_size=-1), ["no_repeat_ngram_size=-1"]),
    (dict(n=0), ["n=0", ">= 1"]),
    (dict(num_beams=0), ["num_beams=0", ">= 1"]),
    (dict(length_penalty=math.nan), ["length_penalty=nan", "finite"]),
    (dict(early_stopping="never"), ["early_stopping", "bool"]),
    (dict(seed=-1), ["seed=-1", ">= 0"]),
    (dict(logprobs=1), ["logprobs", "bool"]),
    (dict(top_logprobs=-1), ["top_logprobs=-1", ">= 0"]),
    (dict(prompt_logprobs=-1), ["prompt_logprobs=-1"]),
    (dict(samplers=["top_k", "top_k"]), ["samplers", "top_k", "more than once"]),
    (dict(samplers=["top_kk"]), ["samplers", "'top_kk'", "did you mean", "'top_k'"]),
    (dict(samplers=["typ_p"]), ["samplers", "'typ_p'", "did you mean 'typical_p'"]),
    # combinations
    (dict(do_sample=True, temperature=0), ["do_sample=True", "temperature=0"]),
    (dict(num_beams=4, do_sample=True), ["num_beams=4", "do_sample=True"]),
    (dict(num_beams=2, n=3), ["n=3", "num_beams=2"]),
    (dict(mirostat=1, temperature=0), ["mirostat=1", "greedy"]),
    (dict(top_logprobs=3), ["top_logprobs=3", "logprobs=True"]),
    (dict(top_k=40, samplers=["top_p", "temperature"]), ["samplers", "'top_k'", "top_k"]),
    (dict(temperature=0.5, samplers=["top_k"]), ["samplers", "'temperature'"]),
    (dict(frequency_penalty=0.5, samplers=["temperature"]), ["'penalties'", "frequency_penalty"]),
]


@pytest.mark.parametrize(("kwargs", "needles"), INVALID, ids=[",".join(k) for k, _ in INVALID])
def test_invalid_values_are_named(kwargs: dict[str, Any], needles: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        GenerationConfig(**kwargs)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_off_values_are_accepted() -> None:
    GenerationConfig(
        top_n_sigma=-1, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, repetition_penalty_last_n=0
    )
    GenerationConfig(samplers=["temperature"], temperature=0.0)  # greedy never needs the truncation samplers


# Every field and the tests that check what it does (beyond validation and round trip, which cover all).
FIELD_TESTS = {
    "max_new_tokens": "test_invalid_values_are_named (the engine enforces it)",
    "min_new_tokens": "test_min_new_tokens_blocks_eos_and_stop_ids",
    "eos_token_ids": "test_min_new_tokens_blocks_eos_and_stop_ids",
    "ignore_eos": "test_min_new_tokens_blocks_eos_and_stop_ids",
    "stop": "test_every_field_round_trips_through_yaml (the engine matches stop strings)",
    "include_stop_str_in_output": "test_every_field_round_trips_through_yaml (engine)",
    "stop_token_ids": "test_min_new_tokens_blocks_eos_and_stop_ids",
    "do_sample": "test_sampling_resolution, test_greedy_is_the_argmax_after_penalties",
    "temperature": "test_temperature_scales_logits_exactly",
    "dynatemp_range": "test_dynamic_temperature_matches_hand_computation",
    "dynatemp_exponent": "test_dynamic_temperature_matches_hand_computation",
    "top_k": "test_top_k_never_samples_outside_the_k_best",
    "top_p": "test_top_p_min_p_typical_p_keep_exactly_the_right_set",
    "min_p": "test_top_p_min_p_typical_p_keep_exactly_the_right_set",
    "typical_p": "test_top_p_min_p_typical_p_keep_exactly_the_right_set",
    "top_n_sigma": "test_top_n_sigma",
    "repetition_penalty": "test_penalties_change_logits_by_exact_amounts",
    "repetition_penalty_last_n": "test_penalties_change_logits_by_exact_amounts",
    "frequency_penalty": "test_penalties_change_logits_by_exact_amounts",
    "presence_penalty": "test_penalties_change_logits_by_exact_amounts",
    "dry_multiplier": "test_dry_penalty_matches_hand_computation",
    "dry_base": "test_dry_penalty_matches_hand_computation",
    "dry_allowed_length": "test_dry_penalty_matches_hand_computation",
    "dry_penalty_last_n": "test_dry_window_and_breakers",
    "dry_sequence_breakers": "test_dry_breaker_ids_from_strings",
    "xtc_probability": "test_xtc_coin_follows_the_probability",
    "xtc_threshold": "test_xtc_removes_top_choices_but_the_last",
    "mirostat": "test_mirostat_v2_keeps_its_running_mu, test_mirostat_v1_truncates_to_its_k",
    "mirostat_tau": "test_mirostat_v2_keeps_its_running_mu",
    "mirostat_eta": "test_mirostat_v2_keeps_its_running_mu",
    "logit_bias": "test_penalties_change_logits_by_exact_amounts",
    "bad_words_ids": "test_bans_through_the_config",
    "allowed_token_ids": "test_bans_through_the_config",
    "no_repeat_ngram_size": "test_bans_through_the_config",
    "n": "test_n_sequences_get_their_own_streams",
    "num_beams": "test_sampling_resolution, tests/generate/test_beam.py::test_equals_transformers_beam_search",
    "length_penalty": "tests/generate/test_beam.py::test_equals_transformers_beam_search",
    "early_stopping": "tests/generate/test_beam.py::test_equals_transformers_beam_search",
    "seed": "test_same_seed_same_tokens_whatever_the_batch",
    "logprobs": "test_logprobs_helpers",
    "top_logprobs": "test_logprobs_helpers",
    "prompt_logprobs": "test_logprobs_helpers",
    "response_format": "tests/generate/test_constrain_schemas.py::test_every_constrained_output_validates",
    "json_max_depth": "tests/generate/test_constrain.py::test_depth_limit_forbids_opening_past_it",
    "choices": "tests/generate/test_constrain_schemas.py::test_every_constrained_output_validates",
    "json_schema": "tests/generate/test_constrain_schemas.py::test_every_constrained_output_validates",
    "regex": "tests/generate/test_constrain_schemas.py::test_every_constrained_output_validates",
    "grammar": "tests/generate/test_constrain_schemas.py::test_every_constrained_output_validates",
    "samplers": "test_chain_order_follows_samplers",
}


def test_every_field_has_a_test() -> None:
    names = {f.name for f in dataclasses.fields(GenerationConfig)}
    assert names == set(FIELD_TESTS), names ^ set(FIELD_TESTS)
    for covered_by in FIELD_TESTS.values():
        for test in covered_by.split(" (")[0].split(", "):
            if "::" in test:  # a test in another module: "tests/path.py::test_name"
                path, name = test.split("::")
                assert f"\ndef {name}(" in (Path(__file__).parents[2] / path).read_text(), test
            else:
                assert test in globals(), test


# ===================================================================================== equal to transformers


@pytest.mark.parametrize("seed", SEEDS)
def test_processors_equal_transformers(seed: int) -> None:
    logits, ids = _logits_and_ids(seed)
    L = ids.shape[1]
    pairs = [
        (S.apply_repetition_penalty(logits, ids, 1.3), hf.RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())),
        (S.apply_repetition_penalty(logits, ids, 0.7), hf.RepetitionPenaltyLogitsProcessor(0.7)(ids, logits.clone())),
        (S.apply_temperature(logits, 0.6), hf.TemperatureLogitsWarper(0.6)(ids, logits)),
        (S.top_k(logits, 5), hf.TopKLogitsWarper(5)(ids, logits)),
        (S.top_p(logits, 0.8), hf.TopPLogitsWarper(0.8)(ids, logits)),
        (S.top_p(logits, 0.3), hf.TopPLogitsWarper(0.3)(ids, logits)),
        (S.min_p(logits, 0.1), hf.MinPLogitsWarper(0.1)(ids, logits)),
        (S.typical_p(logits, 0.7), hf.TypicalLogitsWarper(0.7)(ids, logits)),
        (S.apply_min_new_tokens(logits, L - 6, 10, [3, 7]), hf.MinNewTokensLengthLogitsProcessor(6, 10, [3, 7])(ids, logits)),
        (S.apply_min_new_tokens(logits, L - 6, 9, [3]), hf.MinNewTokensLengthLogitsProcessor(6, 9, [3])(ids, logits)),
    ]  # fmt: skip
    for n in (1, 2, 3, 4):
        pairs.append(
            (S.apply_no_repeat_ngram(logits, ids, n), hf.NoRepeatNGramLogitsProcessor(n)(ids, logits))
        )
    bad = [[int(ids[0, -1])], [int(ids[1, -2]), int(ids[1, -1]), 5], [int(ids[2, -1]), 9], [3, 4]]
    pairs.append((S.apply_bad_words(logits, ids, bad), hf.NoBadWordsLogitsProcessor(bad)(ids, logits)))
    bias = {(1,): 2.5, (int(ids[2, -1]), 9): -1.5, (int(ids[0, -2]), int(ids[0, -1]), 3): 4.0, (8,): -0.25}
    ref = hf.SequenceBiasLogitsProcessor([[list(k), v] for k, v in bias.items()])(ids, logits)
    pairs.append((S.apply_sequence_bias(logits, ids, bias), ref))
    for i, (ours, theirs) in enumerate(pairs):
        assert torch.equal(ours, theirs), i


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_chain_equals_transformers_processor_list(seed: int) -> None:
    """The whole first stage plus an HF-ordered chain, through ``process_logits``, equals HF's list."""
    logits, ids = _logits_and_ids(seed)
    n_prompt = 10
    cfg = GenerationConfig(
        temperature=0.8, top_k=20, top_p=0.9, min_p=0.02, typical_p=0.95, repetition_penalty=1.2,
        no_repeat_ngram_size=3, bad_words_ids=[[5], [int(ids[0, -1]), 6]], min_new_tokens=8,
        eos_token_ids=[2], samplers=["penalties", "temperature", "top_k", "top_p", "min_p", "typical_p"],
    )  # fmt: skip
    rows = ids.tolist()
    ours = S.process_logits(
        logits, cfg, prompt_ids=[r[:n_prompt] for r in rows], output_ids=[r[n_prompt:] for r in rows]
    )
    procs = hf.LogitsProcessorList([
        hf.NoBadWordsLogitsProcessor(cfg.bad_words_ids), hf.NoRepeatNGramLogitsProcessor(3),
        hf.MinNewTokensLengthLogitsProcessor(n_prompt, 8, [2]), hf.RepetitionPenaltyLogitsProcessor(1.2),
        hf.TemperatureLogitsWarper(0.8), hf.TopKLogitsWarper(20), hf.TopPLogitsWarper(0.9),
        hf.MinPLogitsWarper(0.02), hf.TypicalLogitsWarper(0.95),
    ])  # fmt: skip
    assert torch.equal(ours, procs(ids, logits.clone()))


def test_greedy_is_the_argmax_after_penalties() -> None:
    logits, ids = _logits_and_ids(0)
    ref = hf.RepetitionPenaltyLogitsProcessor(1.5)(ids, logits.clone()).argmax(-1)
    for cfg in (
        GenerationConfig(temperature=0.0, repetition_penalty=1.5, top_k=1),
        GenerationConfig(
            do_sample=False, temperature=3.0, repetition_penalty=1.5, top_p=0.1, xtc_probability=1.0
        ),
    ):
        assert torch.equal(S.sample(logits, cfg, prompt_ids=ids.tolist()), ref)


# ===================================================================================== truncation, by hand


def test_top_k_never_samples_outside_the_k_best() -> None:
    logits, _ = _logits_and_ids(1, B=2, V=100)
    best = [set(row.topk(5).indices.tolist()) for row in logits]
    assert _kept(S.top_k(logits, 5)) == best
    cfg = GenerationConfig(top_k=5, temperature=2.0)  # a high temperature: the tail would be likely
    g = torch.Generator().manual_seed(0)
    drawn: list[set[int]] = [set(), set()]
    for _ in range(300):
        for row, token in enumerate(S.sample(logits, cfg, g).tolist()):
            drawn[row].add(token)
    assert drawn[0] <= best[0] and drawn[1] <= best[1]
    assert drawn == best  # 300 draws from 5 tokens at temperature 2 see them all


def test_top_p_min_p_typical_p_keep_exactly_the_right_set() -> None:
    x = _from_probs([0.5, 0.25, 0.15, 0.1])
    assert _kept(S.top_p(x, 0.7)) == [{0, 1}]  # 0.5 + 0.25 >= 0.7
    assert _kept(S.top_p(x, 0.8)) == [{0, 1, 2}]
    assert _kept(S.top_p(x, 0.45)) == [{0}]
    assert _kept(S.top_p(x, 1.0)) == [{0, 1, 2, 3}]
    assert _kept(S.min_p(x, 0.25)) == [{0, 1, 2}]  # >= 0.125
    assert _kept(S.min_p(x, 0.35)) == [{0, 1}]  # >= 0.175
    assert _kept(S.min_p(x, 1.0)) == [{0}]
    # llama.cpp's typical-p cases: entropy 1.33 nats; the 0.2s (surprise 1.61) are more typical than 0.4
    assert _kept(S.typical_p(_from_probs([0.4, 0.2, 0.2, 0.2]), 0.5)) == [{1, 2, 3}]
    assert _kept(S.typical_p(_from_probs([0.97, 0.01, 0.01, 0.01]), 0.5)) == [{0}]
    # exactly at the boundaries (powers of two are exact in float32), the same as transformers
    b = _from_probs([0.5, 0.25, 0.125, 0.125])
    assert _kept(S.top_p(b, 0.75)) == [{0, 1}]  # the two 0.125s hold mass 0.25 <= 1 - 0.75: they go
    assert _kept(S.typical_p(b, 0.75)) == [{0, 1}]  # 0.25 then 0.5 are the most typical; 0.75 < 0.75 stops
    assert _kept(S.min_p(_from_probs([0.5, 0.25, 0.25]), 0.5)) == [{0, 1, 2}]  # 0.25 >= 0.5 * 0.5 stays
    ids = torch.zeros(1, 1, dtype=torch.long)
    assert torch.equal(S.top_p(b, 0.75), hf.TopPLogitsWarper(0.75)(ids, b))
    assert torch.equal(S.typical_p(b, 0.75), hf.TypicalLogitsWarper(0.75)(ids, b))
    # through the config: the chain applies them in order (top_p, then min_p on what is left)
    cfg = GenerationConfig(top_p=0.8, min_p=0.35)
    assert _kept(S.process_logits(x, cfg)) == [{0, 1}]


def test_top_n_sigma() -> None:
    x = _from_probs([0.1, 0.2, 0.3, 0.4])  # llama.cpp's case: log-probs mean -1.508, std 0.521
    assert _kept(S.top_n_sigma(x, 1.0)) == [{2, 3}]
    assert _kept(S.top_n_sigma(x, 3.0)) == [{0, 1, 2, 3}]
    assert _kept(S.top_n_sigma(x, -1.0)) == [{0, 1, 2, 3}]  # off
    # banned tokens do not count in the statistics
    y = torch.tensor([[0.0, 1.0, 2.0, 3.0, NEG_INF, NEG_INF]])
    std = torch.tensor([0.0, 1.0, 2.0, 3.0]).std(unbiased=False).item()  # 1.118
    assert _kept(S.top_n_sigma(y, 1.0)) == [{t for t in range(4) if t >= 3 - std}]  # {2, 3}
    assert _kept(S.process_logits(y, GenerationConfig(top_n_sigma=2.0))) == [{1, 2, 3}]
    z = torch.tensor([[0.0, 1.0, 2.0, 3.0] + [NEG_INF] * 4])  # std 1.118 (1.346 if the -infs counted as 0s)
    assert _kept(S.top_n_sigma(z, 2.6)) == [{1, 2, 3}]


def test_temperature_scales_logits_exactly() -> None:
    logits, _ = _logits_and_ids(2)
    assert torch.equal(S.process_logits(logits, GenerationConfig(temperature=0.5)), logits / 0.5)
    assert torch.equal(S.process_logits(logits, GenerationConfig(temperature=1.0)), logits)
    # temperature 0 is greedy, whatever do_sample=None would say
    assert torch.equal(S.sample(logits, GenerationConfig(temperature=0.0)), logits.argmax(-1))
    # the sampled distribution is the softmax at that temperature: frequencies follow it
    x = torch.tensor([[0.0, math.log(3.0)]])
    g = torch.Generator().manual_seed(1)
    tokens = torch.cat([S.sample(x, GenerationConfig(temperature=2.0), g) for _ in range(2000)])
    p1 = math.sqrt(3) / (1 + math.sqrt(3))  # softmax of [0, log 3] / 2
    assert abs(tokens.float().mean().item() - p1) < 0.035


def test_dynamic_temperature_matches_hand_computation() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, NEG_INF], [3.0, NEG_INF, NEG_INF, NEG_INF, NEG_INF]])
    t, r, e = 0.8, 0.5, 1.7
    out = S.apply_temperature(logits, t, r, e)
    x = logits[0, :4].double()
    p = x.softmax(-1)
    entropy = -(p * p.log()).sum().item()
    dyn = (t - r) + 2 * r * (entropy / math.log(4)) ** e
    assert torch.allclose(out[0, :4].double(), x / dyn, rtol=1e-6)
    assert out[0, 4] == NEG_INF
    assert torch.equal(out[1], logits[1])  # one candidate: left alone (llama.cpp)
    # the range below zero clamps at 0: a one-sided low temperature that can reach greedy
    peaked = torch.tensor([[200.0, 0.0, 0.0]])  # entropy 0 in float32: temperature max(0, 0.2 - 0.5) = 0
    assert _kept(S.apply_temperature(peaked, 0.2, 0.5, 1.0)) == [{0}]
    cfg = GenerationConfig(temperature=t, dynatemp_range=r, dynatemp_exponent=e)
    assert torch.equal(S.process_logits(logits, cfg), out)


# ===================================================================================== penalties, by hand


def test_penalties_change_logits_by_exact_amounts() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5, 3.0, -0.5, 0.0]])
    prompt, output = [0, 1, 7], [2, 3, 2, 2]  # prompt tokens 0 (positive logit), 1 (negative)
    # repetition (HF): positive / 2, negative * 2, over prompt and output
    cfg = GenerationConfig(repetition_penalty=2.0)
    out = S.process_logits(logits, cfg, prompt_ids=[prompt], output_ids=[output])
    want = torch.tensor([[1.0, -4.0, 0.5, -2.0, 0.5, 3.0, -0.5, 0.0]])
    assert torch.equal(out, want)
    # the window: the last 3 tokens of prompt + output [0, 1, 7, 2, 3, 2, 2] are [3, 2, 2]
    cfg = GenerationConfig(repetition_penalty=2.0, repetition_penalty_last_n=3)
    out = S.process_logits(logits, cfg, prompt_ids=[prompt], output_ids=[output])
    assert torch.equal(out, torch.tensor([[2.0, -2.0, 0.5, -2.0, 0.5, 3.0, -0.5, 0.0]]))
    cfg = GenerationConfig(repetition_penalty=2.0, repetition_penalty_last_n=0)  # off
    assert torch.equal(S.process_logits(logits, cfg, prompt_ids=[prompt], output_ids=[output]), logits)
    # frequency / presence: counts of generated tokens only (token 2 three times, 3 once; 0 and 1 not at all)
    cfg = GenerationConfig(frequency_penalty=0.5, presence_penalty=0.25)
    out = S.process_logits(logits, cfg, prompt_ids=[prompt], output_ids=[output])
    want = logits.clone()
    want[0, 2] -= 3 * 0.5 + 0.25
    want[0, 3] -= 1 * 0.5 + 0.25
    assert torch.equal(out, want)
    cfg = GenerationConfig(frequency_penalty=-1.0)  # negative: encourages
    out = S.process_logits(logits, cfg, prompt_ids=[prompt], output_ids=[output])
    assert out[0, 2].item() == 1.0 + 3.0 and out[0, 0].item() == 2.0
    # logit_bias: added as is
    cfg = GenerationConfig(logit_bias={4: 1.5, 6: -100.0, 7: NEG_INF})
    out = S.process_logits(logits, cfg)
    assert out[0].tolist() == [2.0, -2.0, 1.0, -1.0, 2.0, 3.0, -100.5, NEG_INF]
    with pytest.raises(ConfigError, match=r"logit_bias.*\[9\].*8 tokens"):
        S.process_logits(logits, GenerationConfig(logit_bias={9: 1.0}))
    # batched: each row its own history
    two = logits.repeat(2, 1)
    out = S.process_logits(two, GenerationConfig(frequency_penalty=1.0), output_ids=[[5], [5, 5, 4]])
    assert out[0, 5].item() == 2.0 and out[1, 5].item() == 1.0 and out[1, 4].item() == -0.5


def test_bans_through_the_config() -> None:
    logits = torch.zeros(1, 10)
    assert _kept(S.process_logits(logits, GenerationConfig(allowed_token_ids=[2, 5]))) == [{2, 5}]
    cfg = GenerationConfig(bad_words_ids=[[3], [7, 8, 9], [1, 4]])
    # [3] always; [7, 8, 9] bans 9 after "7 8"; [1, 4] bans 4 only after 1
    assert _kept(S.process_logits(logits, cfg, prompt_ids=[[0, 7, 8]])) == [set(range(10)) - {3, 9}]
    assert _kept(S.process_logits(logits, cfg, prompt_ids=[[7, 8, 1]])) == [set(range(10)) - {3, 4}]
    # no_repeat_ngram_size=2 over prompt + output: "5 6" and "6 5" occurred; the text ends in 5 -> ban 6
    cfg = GenerationConfig(no_repeat_ngram_size=2)
    assert _kept(S.process_logits(logits, cfg, prompt_ids=[[5, 6, 5]], output_ids=[[6, 1, 5]])) == [
        set(range(10)) - {6}
    ]
    cfg = GenerationConfig(no_repeat_ngram_size=3)  # "1 5" never occurred before -> nothing banned
    assert _kept(S.process_logits(logits, cfg, prompt_ids=[[5, 6, 5]], output_ids=[[6, 1, 5]])) == [
        set(range(10))
    ]
    with pytest.raises(ConfigError, match="no token is left"):
        S.sample(logits, GenerationConfig(allowed_token_ids=[3], bad_words_ids=[[3]]))
    # padding of a shorter row never forms an n-gram
    three = S.process_logits(logits.repeat(3, 1), cfg, prompt_ids=[[4], [4, 4, 4], []])
    assert _kept(three) == [set(range(10)), set(range(10)) - {4}, set(range(10))]


def test_min_new_tokens_blocks_eos_and_stop_ids() -> None:
    logits = torch.zeros(1, 6)
    cfg = GenerationConfig(min_new_tokens=3, eos_token_ids=[5], stop_token_ids=[4])
    for n_out, kept in [(0, {0, 1, 2, 3}), (2, {0, 1, 2, 3}), (3, set(range(6)))]:
        assert _kept(S.process_logits(logits, cfg, output_ids=[[1] * n_out])) == [kept]
    cfg = GenerationConfig(min_new_tokens=3, eos_token_ids=[5], stop_token_ids=[4], ignore_eos=True)
    assert _kept(S.process_logits(logits, cfg, output_ids=[[]])) == [{0, 1, 2, 3, 5}]  # eos does not stop
    # and sampling really never picks eos before min_new_tokens, even when it is the likely one
    cfg = GenerationConfig(min_new_tokens=1, eos_token_ids=[5])
    s = Sampler(cfg, [0], dry_breakers=[])
    assert s.sample(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 20.0])) != 5
    assert s.sample(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 20.0])) == 5  # now one token is out


# ===================================================================================== DRY


def test_dry_penalty_matches_hand_computation() -> None:
    tokens = [7, 8, 9, 1, 2, 3, 4, 7, 8, 9, 1, 2, 3]
    pen = S.dry_penalties(tokens, multiplier=0.8, base=1.75, allowed_length=2)
    # the end "7 8 9 1 2 3" also stands at 0..5, followed by 4: a repeat of length 6 -> 0.8 * 1.75 ** (6 - 2)
    assert pen == {4: pytest.approx(0.8 * 1.75**4)}
    # a shorter repeat: "5 6 | 0 | 5 6": the end "5 6" occurred, followed by 0: length 2 -> 0.8 * 1.75 ** 0
    assert S.dry_penalties([5, 6, 0, 5, 6], 0.8, 1.75, 2) == {0: pytest.approx(0.8)}
    assert S.dry_penalties([5, 6, 0, 5, 6], 0.8, 1.75, 3) == {}  # too short to count
    assert S.dry_penalties([5, 6, 0, 5, 6], 0.0, 1.75, 2) == {}  # off
    # two candidates, each with its longest repeat
    pen = S.dry_penalties([1, 2, 3, 9, 2, 3, 8, 1, 2, 3], 1.0, 2.0, 2)
    assert pen == {
        9: pytest.approx(2.0**1),
        8: pytest.approx(1.0),
    }  # "1 2 3" -> 9 (len 3); "2 3" -> 8 (len 2)
    # llama.cpp's test-sampling cases (logits = log p, DRY, softmax)
    cases = [
        ([0.25] * 4, [0, 1], [0.25] * 4, 1.0, 1.1, 2, 4, []),
        ([0.25] * 4, [0, 1, 2, 0, 1], [0.296923, 0.296923, 0.109232, 0.296923], 1.0, 1.1, 2, 5, []),
        ([0.2] * 5, [0, 1, 3, 4, 0, 1], [0.2] * 5, 1.0, 1.1, 2, 6, [[3]]),
        ([0.2] * 5, [0, 1, 2, 0, 1], [0.241818, 0.241818, 0.032727, 0.241818, 0.241818], 2.0, 1.1, 2, 5, []),
        ([0.2] * 5, [0, 1, 2, 3, 4, 0, 1], [0.2] * 5, 1.0, 1.1, 4, 7, []),
    ]
    for probs, tokens, want, mult, base, allowed, last_n, breakers in cases:
        out = S.apply_dry(_from_probs(probs), [tokens], mult, base, allowed, last_n, breakers).softmax(-1)
        assert torch.allclose(out[0], torch.tensor(want), atol=1e-5), (tokens, out)
    # through the config
    cfg = GenerationConfig(dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2)
    out = S.process_logits(torch.zeros(1, 10), cfg, prompt_ids=[[5, 6, 0]], output_ids=[[5, 6]])
    assert out[0, 0].item() == pytest.approx(-0.8) and (out[0, 1:] == 0).all()


def test_dry_window_and_breakers() -> None:
    tokens = [1, 2, 3, 4, 9, 9, 1, 2, 3]
    assert S.dry_penalties(tokens, 1.0, 2.0, 2) == {4: pytest.approx(2.0)}  # "1 2 3" -> 4
    assert S.dry_penalties(tokens, 1.0, 2.0, 2, last_n=5) == {}  # window [9 9 1 2 3]: no earlier "2 3"
    assert S.dry_penalties(tokens, 1.0, 2.0, 2, last_n=9) == {4: pytest.approx(2.0)}
    # a breaker inside the repeated part caps its length: 2 is a breaker -> the repeat is only "3" (< 2)
    assert S.dry_penalties(tokens, 1.0, 2.0, 2, breakers=[[2]]) == {}
    # a two-token breaker "9 1" occurs right before "2 3": the repeat "2 3" (length 2) still counts
    assert S.dry_penalties(tokens, 1.0, 2.0, 2, breakers=[[9, 1]]) == {4: pytest.approx(1.0)}
    # a breaker that ends the context stops everything (its tail may reach the very last token)
    assert S.dry_penalties([5, 9, 1, 7, 5, 9, 1], 1.0, 2.0, 2) == {7: 2.0}
    assert S.dry_penalties([5, 9, 1, 7, 5, 9, 1], 1.0, 2.0, 2, breakers=[[9, 1]]) == {}
    # a single-token breaker is never penalized itself
    assert S.dry_penalties([5, 6, 0, 5, 6], 1.0, 2.0, 2, breakers=[[0]]) == {}
    # the exponent is clamped (llama.cpp) so the penalty stays a float32
    long = list(range(200)) * 2
    (value,) = S.dry_penalties(long[:-1], 1.0, 2.0, 2).values()
    assert value == 2.0 ** int(88.7228391 / math.log(2.0))
    cfg = GenerationConfig(dry_multiplier=1.0, dry_base=2.0, dry_penalty_last_n=5)
    assert torch.equal(S.process_logits(torch.zeros(1, 10), cfg, prompt_ids=[tokens]), torch.zeros(1, 10))


class _ToyTokenizer:
    """Greedy longest-match tokenizer over a tiny vocabulary."""

    def __init__(self, vocab: list[str]) -> None:
        self.vocab = vocab

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.vocab[i] for i in ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        out = []
        while text:
            i = max(
                (i for i, t in enumerate(self.vocab) if text.startswith(t)), key=lambda i: len(self.vocab[i])
            )
            out.append(i)
            text = text[len(self.vocab[i]) :]
        return out


def test_dry_breaker_ids_from_strings() -> None:
    tok = _ToyTokenizer(["a", "b", "ab", "xa", "c", "\n", "c\nd"])
    # "ab": in token 2; token 0 "a" and token 3 "xa" end with its start "a", followed by "b" = [1]
    # "\n": in tokens 5 and 6
    assert S.dry_breaker_ids(tok, ("ab", "\n")) == [[0, 1], [2], [3, 1], [5], [6]]
    cfg = GenerationConfig(dry_multiplier=1.0, dry_sequence_breakers=["ab"])
    assert Sampler(cfg, tokenizer=tok).dry_breakers == [[0, 1], [2], [3, 1]]
    with pytest.raises(ConfigError, match="dry_sequence_breakers as token ids"):
        Sampler(cfg)
    # the breakers take effect: "c ab c" ... with "a b" a breaker, "c" followed by... nothing is penalized
    s = Sampler(cfg, [4, 0, 1, 4], tokenizer=tok)
    assert torch.equal(s.process(torch.zeros(7)), torch.zeros(7))
    s = Sampler(dataclasses.replace(cfg, dry_sequence_breakers=["\n"]), [4, 0, 1, 4, 0], tokenizer=tok)
    assert s.process(torch.zeros(7))[1].item() == -1.0  # "c a" repeats -> b is penalized


# ===================================================================================== XTC


def test_xtc_removes_top_choices_but_the_last() -> None:
    x = _from_probs([0.4, 0.3, 0.2, 0.1])
    on = torch.tensor([True])
    assert _kept(S.xtc(x, 0.09, on)) == [{3}]  # llama.cpp's cases
    assert _kept(S.xtc(x, 0.19, on)) == [{2, 3}]
    assert _kept(S.xtc(x, 0.29, on)) == [{1, 2, 3}]
    assert _kept(S.xtc(x, 0.39, on)) == [{0, 1, 2, 3}]  # only one above: nothing to remove
    assert _kept(S.xtc(x, 0.19, torch.tensor([False]))) == [{0, 1, 2, 3}]  # the coin said no
    assert _kept(S.xtc(x, 0.6, on)) == [{0, 1, 2, 3}]  # > 0.5: never
    # probabilities among the candidates left by earlier samplers
    y = torch.tensor([[2.0, 1.0, 1.0, NEG_INF]])  # p = 0.58, 0.21, 0.21
    assert _kept(S.xtc(y, 0.2, on)) == [{1, 2}]  # ties with the last one above the threshold stay
    assert _kept(S.xtc(torch.tensor([[5.0, NEG_INF]]), 0.1, on)) == [{0}]  # one candidate: kept


def test_xtc_coin_follows_the_probability() -> None:
    x = _from_probs([0.4, 0.3, 0.2, 0.1]).repeat(400, 1)
    cfg = GenerationConfig(xtc_probability=0.3, xtc_threshold=0.25, samplers=["xtc"])
    gens = [torch.Generator().manual_seed(i) for i in range(400)]
    tokens = S.sample(x, cfg, gens)
    # when XTC fires, 0 is gone (1 kept as the last above the threshold); otherwise 0 is drawn 40% of the time
    # P(token 0) = 0.7 * 0.4 = 0.28
    assert abs((tokens == 0).float().mean().item() - 0.28) < 0.07
    always = dataclasses.replace(cfg, xtc_probability=1.0)
    assert not (S.sample(x, always, gens) == 0).any()


# ===================================================================================== mirostat


def test_mirostat_v2_keeps_its_running_mu() -> None:
    probs = [0.5, 0.25, 0.125, 0.125]  # surprises 1, 2, 3, 3 bits
    logits = _from_probs(probs)
    cfg = GenerationConfig(mirostat=2, mirostat_tau=1.0, mirostat_eta=0.5)
    s = Sampler(cfg)
    assert s.mirostat is not None and s.mirostat.mu == 2.0  # 2 * tau
    mu = 2.0
    for _ in range(12):
        before = s.mirostat.mu
        assert before == pytest.approx(mu)
        token = s.sample(logits)
        kept = [p for p in probs if -math.log2(p) <= mu] or [probs[0]]
        assert token < len(kept)  # only tokens with surprise <= mu (at least the top one)
        p = probs[token] / sum(kept)
        mu -= 0.5 * (-math.log2(p) - 1.0)
        assert s.mirostat.mu == pytest.approx(mu, abs=1e-5)
    # a fresh sampler with the same seed retraces the same tokens and mu
    states = [MirostatState(2.0)]
    g = torch.Generator().manual_seed(s.seed)
    again = [int(S.sample(logits, cfg, g, mirostat=states)[0]) for _ in range(12)]
    assert again == s.output_ids and states[0].mu == pytest.approx(s.mirostat.mu)


def test_mirostat_v1_truncates_to_its_k() -> None:
    V, zipf_s = 1000, 1.2
    ranks = torch.arange(1, V + 1, dtype=torch.float64)
    logits = (-zipf_s * ranks.log()).float()[None]  # exact Zipf: s_hat = s
    tau, eta = 3.0, 0.1
    mu = 2 * tau
    eps = zipf_s - 1
    k = int(((eps * 2**mu) / (1 - V ** (-eps))) ** (1 / zipf_s))
    state = MirostatState(mu)
    g = torch.Generator().manual_seed(0)
    tokens = [
        int(S.mirostat_v1(logits, [state], torch.rand(1, generator=g, dtype=torch.float64), tau, eta)[0])
    ]
    assert tokens[0] < k
    p_kept = torch.softmax(logits[0, :k].double(), -1)[tokens[0]].item()
    assert state.mu == pytest.approx(mu - eta * (-math.log2(p_kept) - tau), rel=1e-4)
    s = Sampler(GenerationConfig(mirostat=1, mirostat_tau=tau, mirostat_eta=eta, seed=3))
    for _ in range(30):
        assert s.mirostat is not None
        mu = s.mirostat.mu
        k = max(1, int(((eps * 2**mu) / (1 - V ** (-eps))) ** (1 / zipf_s)))
        assert s.sample(logits) < k + 1  # +1: float32 vs float64 in the k estimate


# ===================================================================================== seeds and batches


def test_same_seed_same_tokens_whatever_the_batch() -> None:
    V, steps = 50, 12
    g = torch.Generator().manual_seed(123)
    logits = [torch.randn(4, V, generator=g) for _ in range(steps)]
    a = GenerationConfig(seed=1, top_k=20, repetition_penalty=1.2)
    others = [
        GenerationConfig(seed=2, top_p=0.5, xtc_probability=0.5, xtc_threshold=0.05),
        GenerationConfig(seed=3, top_k=20, repetition_penalty=1.2),  # same settings as a: same group
        GenerationConfig(mirostat=2, seed=4),
    ]

    def run(cfgs: list[GenerationConfig], rows: list[int]) -> list[list[int]]:
        samplers = [Sampler(c, [1, 2, 3], dry_breakers=[]) for c in cfgs]
        for step in range(steps):
            S.sample_batch(logits[step][rows], samplers)
        return [s.output_ids for s in samplers]

    alone = run([a], [0])[0]
    in_batch = run([others[0], a, others[1], others[2]], [1, 0, 2, 3])
    assert in_batch[1] == alone
    assert run([a], [0])[0] == alone  # reproducible
    assert run([dataclasses.replace(a, seed=99)], [0])[0] != alone  # another seed, other tokens
    # same settings and logits but different seeds in one group: different tokens
    twins = run([a, dataclasses.replace(a, seed=5)], [0, 0])
    assert twins[0] == alone and twins[1] != alone


def test_n_sequences_get_their_own_streams() -> None:
    cfg = GenerationConfig(seed=11, n=3)
    seeds = [S.sequence_seed(cfg.seed, i) for i in range(3)]
    assert seeds[0] == 11 and len(set(seeds)) == 3
    logits = torch.zeros(3, 1000)
    samplers = [Sampler(cfg, index=i) for i in range(3)]
    tokens = [S.sample_batch(logits, samplers).tolist() for _ in range(3)]
    assert len({tuple(s.output_ids) for s in samplers}) == 3
    assert [s.output_ids[0] for s in samplers] == tokens[0]
    # unseeded requests follow torch's global generator
    torch.manual_seed(0)
    first = Sampler(GenerationConfig()).sample(logits[0])
    torch.manual_seed(0)
    assert Sampler(GenerationConfig()).sample(logits[0]) == first


def test_draw_is_an_exact_inverse_cdf() -> None:
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.25, 0.25, 0.0]])
    for u, want in [(0.0, 1), (0.49, 1), (0.5, 3), (0.74, 3), (0.75, 4), (0.999999, 4), (1.0, 4)]:
        assert S.draw(probs, torch.tensor([u], dtype=torch.float64)).item() == want, u


# ===================================================================================== chain order and logprobs


def test_chain_order_follows_samplers() -> None:
    x = _from_probs([0.5, 0.3, 0.2])
    # min_p 0.5 then top_p 0.55: min_p keeps {0, 1} (0.3 >= 0.25), renormalized 0.625 / 0.375 -> top_p keeps {0}
    # top_p 0.55 first keeps {0, 1} (0.5 < 0.55), min_p then keeps both
    first = GenerationConfig(min_p=0.5, top_p=0.55, samplers=["min_p", "top_p"])
    second = GenerationConfig(min_p=0.5, top_p=0.55, samplers=["top_p", "min_p"])
    assert _kept(S.process_logits(x, first)) == [{0}]
    assert _kept(S.process_logits(x, second)) == [{0, 1}]
    # temperature last (the default) vs first changes what min_p sees
    y = torch.tensor([[2.0, 1.0, 0.0]])
    late = GenerationConfig(temperature=3.0, min_p=0.3)
    early = GenerationConfig(temperature=3.0, min_p=0.3, samplers=["temperature", "min_p"])
    assert _kept(S.process_logits(y, late)) == [{0, 1}]
    assert _kept(S.process_logits(y, early)) == [{0, 1, 2}]
    # mirostat replaces the truncation samplers, greedy runs only the penalties
    assert S.active_samplers(GenerationConfig(mirostat=1, top_k=3)) == ["penalties", "dry", "temperature"]
    assert S.active_samplers(GenerationConfig(temperature=0.0)) == ["penalties", "dry"]


def test_logprobs_helpers() -> None:
    logits, _ = _logits_and_ids(4, B=3, V=30)
    chosen = torch.tensor([int(logits[0].argmax()), 5, 7])
    lp = S.token_logprobs(logits, chosen, top_k=4)
    ref = torch.log_softmax(logits, -1)
    assert torch.equal(lp.logprobs, ref[torch.arange(3), chosen])
    assert lp.ranks[0].item() == 1
    assert lp.ranks[1].item() == int((ref[1] > ref[1, 5]).sum()) + 1
    assert torch.equal(lp.top_ids, ref.topk(4).indices) and torch.equal(lp.top_logprobs, ref.topk(4).values)
    assert S.token_logprobs(logits, chosen).top_ids.shape == (3, 0)
    # prompt logprobs: logits[t] predicts token t + 1
    prompt = torch.tensor([3, 9, 4])
    plp = S.prompt_logprobs(logits, prompt, top_k=2)
    assert torch.equal(plp.logprobs, torch.stack([ref[0, 9], ref[1, 4]]))
    # the processed distribution, for those who want it: renormalized over the kept, -inf for the rest
    s = Sampler(GenerationConfig(top_k=2, logprobs=True, top_logprobs=2))
    best, worst = int(logits[0].argmax()), int(logits[0].argmin())
    processed = S.token_logprobs(s.process(logits[0])[None], torch.tensor([best, worst]).view(2)[:1], top_k=2)
    assert processed.logprobs.item() > lp.logprobs[0].item()
    assert S.token_logprobs(s.process(logits[0])[None], torch.tensor([worst])).logprobs.item() == NEG_INF


# -- the registry: one entry per logits processor, everything else derived ----------------------------------

# a setting that switches each processor on, and bites on `_logits_and_ids` histories
SWITCH_ON: dict[str, dict[str, Any]] = {
    "logit_bias": dict(logit_bias={1: 5.0}),
    "bad_words_ids": dict(bad_words_ids=[[5]]),
    "allowed_token_ids": dict(allowed_token_ids=[1, 2, 3]),
    "no_repeat_ngram_size": dict(no_repeat_ngram_size=2),
    "min_new_tokens": dict(min_new_tokens=3, eos_token_ids=[4], max_new_tokens=8),
    "penalties": dict(repetition_penalty=1.5),
    "dry": dict(dry_multiplier=0.8, dry_allowed_length=1),
    "top_n_sigma": dict(top_n_sigma=0.5),
    "top_k": dict(top_k=3),
    "typical_p": dict(typical_p=0.5),
    "top_p": dict(top_p=0.5),
    "min_p": dict(min_p=0.2),
    "xtc": dict(xtc_probability=1.0, xtc_threshold=0.01),
    "temperature": dict(temperature=0.5),
}
# a setting other than the default for each field the sampler never reads
NOT_READ: dict[str, Any] = dict(
    max_new_tokens=5, stop=["x"], include_stop_str_in_output=True, n=2, num_beams=2, length_penalty=0.5,
    early_stopping=True, seed=3, logprobs=True, top_logprobs=2, prompt_logprobs=1,
    response_format="json_object", json_max_depth=3, choices=["a"], json_schema={"type": "object"}, regex="a",
    grammar='start: "a"',
)  # fmt: skip


def test_the_registry_names_every_field_once_and_the_derived_lists_agree() -> None:
    from lamina.config import LOGITS_PROCESSORS, PICK_FIELDS

    names = {f.name for f in dataclasses.fields(GenerationConfig)}
    read = [f for p in LOGITS_PROCESSORS for f in p.fields]
    assert set(read) | set(PICK_FIELDS) | S.NOT_PROCESSING == names  # every field has its place
    assert len(read) == len(set(read)) and not set(read) & set(PICK_FIELDS)  # ... and only one
    assert not (set(read) | set(PICK_FIELDS)) & S.NOT_PROCESSING
    assert set(NOT_READ) == S.NOT_PROCESSING and set(SWITCH_ON) == {p.name for p in LOGITS_PROCESSORS}
    chain = [p.name for p in LOGITS_PROCESSORS if p.stage != "first"]
    assert list(SAMPLER_NAMES) == chain == GenerationConfig().samplers
    assert set(S.PENALTY_SAMPLERS) | set(S.TRUNCATION_SAMPLERS) | {"temperature"} == set(chain)
    for p in LOGITS_PROCESSORS:
        assert not p.on(GenerationConfig()), p.name  # every processor is off by default


@pytest.mark.parametrize("name", sorted(SWITCH_ON))
def test_each_processor_switches_on_changes_logits_and_leaves_the_greedy_fast_path(name: str) -> None:
    from lamina.config import LOGITS_PROCESSORS

    (p,) = [p for p in LOGITS_PROCESSORS if p.name == name]
    logits, ids = _logits_and_ids(1)
    history = {"prompt_ids": ids.tolist(), "dry_breakers": [], "xtc_coins": torch.zeros(4)}
    for temperature in (1.0, 0.0):
        settings = {"temperature": temperature, **SWITCH_ON[name]}
        if temperature == 0.0 and p.stage in ("truncation", "temperature"):
            continue  # they run only when sampling
        cfg = GenerationConfig(**settings)
        assert p.on(cfg)
        assert not torch.equal(S.process_logits(logits, cfg, **history), logits.float()), (name, temperature)
        if temperature == 0.0:
            assert not S.greedy_is_argmax(cfg)  # greedy, but a processor changes the logits first
    if p.stage in ("truncation", "temperature"):  # greedy skips them: the argmax is still bare
        assert S.greedy_is_argmax(GenerationConfig(**{**SWITCH_ON[name], "temperature": 0.0}))
    assert S.greedy_is_argmax(GenerationConfig(temperature=0.0))
    if p.stage != "first":  # a switched-on sampler must be in the chain
        with pytest.raises(ConfigError, match=f"leaves out '{name}'"):
            GenerationConfig(**{**SWITCH_ON[name], "samplers": [s for s in SAMPLER_NAMES if s != name]})


@pytest.mark.parametrize("field", sorted(NOT_READ))
def test_fields_the_sampler_never_reads_do_not_change_logits_or_batching(field: str) -> None:
    logits, ids = _logits_and_ids(2)
    base = GenerationConfig(temperature=0.0, repetition_penalty=1.3, top_k=5)
    extra: dict[str, Any] = {field: NOT_READ[field]}
    if field == "top_logprobs":
        extra["logprobs"] = True
    if field == "n":
        extra["num_beams"] = 2
    cfg = dataclasses.replace(base, **extra)
    history = {"prompt_ids": ids.tolist()}
    assert torch.equal(S.process_logits(logits, cfg, **history), S.process_logits(logits, base, **history))
    assert Sampler(cfg).batch_key == Sampler(base).batch_key
