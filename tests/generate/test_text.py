"""Text in, text out (lamina.generate.text) on a tiny chat model: token ids checked against the vocabulary
at the one edge, models that cannot generate refused in one line, n choices, logprobs, counts and the
checkpoint's own decoding defaults."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from tiny_chat import tiny_lm

import lamina
from lamina.config import TOKEN_IDS, GenerationConfig
from lamina.errors import ConfigError
from lamina.generate.engine import Engine, generate_ids
from lamina.generate.text import complete, generation_config, model_defaults

# every token-id field, and a value for it that names an id past the tiny model's 19 tokens
OUT_OF_VOCAB: dict[str, Any] = {
    "logit_bias": {50256: -100},
    "stop_token_ids": [3, 50256],
    "bad_words_ids": [[4, 50256]],
    "allowed_token_ids": [50256],
    "eos_token_ids": [50256],
}


def test_every_token_id_field_is_marked_and_covered() -> None:
    marked = {f.name for f in dataclasses.fields(GenerationConfig) if f.metadata == TOKEN_IDS}
    by_name = {f.name for f in dataclasses.fields(GenerationConfig) if f.name.endswith("_ids")}
    assert by_name | {"logit_bias"} == marked == set(OUT_OF_VOCAB)


@pytest.mark.parametrize("field", sorted(OUT_OF_VOCAB))
def test_token_ids_outside_the_vocabulary_are_refused_naming_field_id_and_size(field: str, tiny: Any) -> None:
    # before: logit_bias {50256: -100} on a smaller vocabulary returned '' (the error was swallowed per row)
    words = [field, "50256", "vocabulary of 19 tokens"]
    with pytest.raises(ConfigError) as e:
        lamina.generate(tiny, "hello", max_new_tokens=3, **{field: OUT_OF_VOCAB[field]})
    assert all(w in str(e.value) for w in words), e.value
    cfg = GenerationConfig(temperature=0.0, **{field: OUT_OF_VOCAB[field]})
    with pytest.raises(ConfigError, match=field):  # the engine checks at submit, for the server too
        Engine(tiny.model, tiny.tokenizer).submit([5, 6], cfg)
    with pytest.raises(ConfigError, match=field):
        generate_ids(tiny.model, [[5, 6]], cfg)


def test_ids_inside_the_vocabulary_pass(tiny: Any) -> None:
    cfg = GenerationConfig(logit_bias={18: -100}, stop_token_ids=[18], allowed_token_ids=[5, 6])
    cfg.check_token_ids(19)
    assert lamina.generate(tiny, "hello", max_new_tokens=3, allowed_token_ids=[5, 6]).split() != []


def test_a_generation_that_fails_at_a_step_raises_instead_of_returning_empty(tiny: Any) -> None:
    with pytest.raises(ConfigError, match="no token is left"):  # every token banned at the second step
        lamina.generate(tiny, "hello", max_new_tokens=4, allowed_token_ids=[5], no_repeat_ngram_size=1)


@pytest.mark.parametrize(
    ("model", "words"),
    [
        ({"arch": "encoder"}, ["encoder", "lamina fill-mask", "lamina embed"]),
        ({"arch": "encoder", "head": "none"}, ["encoder", "lamina embed"]),
        ({"head": "classify", "n_labels": 2}, ["head='classify'", "cannot generate"]),
    ],
)
def test_a_model_that_cannot_generate_is_refused_in_one_line(model: dict[str, Any], words: list[str]) -> None:
    lm = tiny_lm(**model)
    for call in (
        lambda: lamina.generate(lm, "hello"),
        lambda: complete(lm, "hello"),
        lambda: generation_config(lm),
        lambda: Engine(lm.model),
    ):
        with pytest.raises(ConfigError) as e:
            call()
        assert all(w in str(e.value) for w in words) and "\n" not in str(e.value), e.value


def test_n_choices_with_logprobs_counts_and_summary(tiny: Any) -> None:
    with pytest.raises(ConfigError, match=r"lamina.complete\(...\).choices"):
        lamina.generate(tiny, "hello", n=2)
    r = complete(tiny, "hello", n=3, seed=1, max_new_tokens=4, ignore_eos=True, logprobs=True, top_logprobs=2,
                 prompt_logprobs=1)  # fmt: skip
    assert r.config.sampling  # n > 1 without a temperature asks for sampling, as any sampling control does
    assert [c.index for c in r.choices] == [0, 1, 2] and len({tuple(c.tokens) for c in r.choices}) > 1
    assert all(len(c.tokens) == 4 and c.logprobs and len(c.logprobs) == 4 for c in r.choices)
    assert all(len(lp.top) == 2 for c in r.choices for lp in c.logprobs or [])
    assert r.prompt_logprobs is not None and r.prompt_logprobs[0] is None
    assert len(r.prompt_logprobs) == r.prompt_tokens
    assert r.completion_tokens == 12 and r.decode_tokens == 9  # the prefill step picked the first tokens
    line = r.summary()
    assert f"prompt {r.prompt_tokens} tokens" in line and "generated 12 tokens in 3 choices" in line
    assert "tokens/s" in line and "all cut at max_new_tokens=4" in line
    same = lamina.complete(tiny, "hello", n=2, temperature=0, max_new_tokens=3)  # greedy n: identical
    assert same.choices[0].tokens == same.choices[1].tokens
    beams = complete(tiny, "hello", num_beams=3, n=2, max_new_tokens=3)
    assert len(beams.choices) == 2 and beams.text == beams.choices[0].text
    with pytest.raises(ConfigError, match="beam search"):
        complete(tiny, "hello", num_beams=2, logprobs=True)


def test_the_summary_says_what_cut_a_reply(tiny: Any) -> None:
    """A reply stopped by a full context window is not said to be cut at max_new_tokens (it was cut
    sooner); one generated token is "1 token"; the prompt's rate is given when the prompt ran, also
    for a reply that ended at its first token (a stop token, not in ``tokens``), and not when it did
    not (``max_new_tokens=0``: no prefill time either)."""
    window = tiny.model.config.max_seq_len
    long = complete(tiny, "hello", max_new_tokens=window + 5, ignore_eos=True)
    assert long.prompt_tokens + len(long.choices[0].tokens) == window
    assert long.summary().endswith("; cut by the context window") and "max_new_tokens" not in long.summary()
    one = complete(tiny, "hello", max_new_tokens=1, ignore_eos=True)
    assert "generated 1 token," in one.summary() and one.summary().endswith("; cut at max_new_tokens=1")
    none = complete(tiny, "hello", max_new_tokens=0)  # the prompt never runs: no time, no rate for it
    assert none.prefill_seconds == 0.0 and "tokens/s)" not in none.summary().split(" | ")[0]
    stopped = complete(tiny, "hello", max_new_tokens=3, stop_token_ids=one.choices[0].tokens)
    assert stopped.completion_tokens == 0 and stopped.choices[0].finish_reason == "stop"
    assert stopped.summary().split(" | ")[0].endswith(" tokens/s)")  # its prompt ran


def test_streamed_text_is_the_first_choice(tiny: Any) -> None:
    deltas: list[str] = []
    r = complete(tiny, "hello", max_new_tokens=5, ignore_eos=True, stream=deltas.append)
    assert "".join(deltas) == r.text == lamina.generate(tiny, "hello", max_new_tokens=5, ignore_eos=True)


def test_the_checkpoint_decoding_defaults_are_used_when_it_has_them() -> None:
    plain = tiny_lm()
    assert model_defaults(plain) is None  # eos ids only: greedy
    assert not generation_config(plain).sampling and generation_config(plain, top_p=0.9).temperature == 1.0
    own = GenerationConfig(eos_token_ids=[2], temperature=0.3, top_p=0.8, max_new_tokens=7)
    lm = tiny_lm(generation=own)
    assert model_defaults(lm) is own
    cfg = generation_config(lm, seed=4)
    assert (cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.seed) == (0.3, 0.8, 7, 4)
    assert generation_config(lm, temperature=0).sampling is False
    torch.manual_seed(0)
    r = complete(lm, "hello", seed=5, ignore_eos=True)
    assert r.config.temperature == 0.3 and len(r.choices[0].tokens) == 7


def test_a_sampling_control_the_decoding_skips_is_one_warning_line(recwarn: Any) -> None:
    # before: beam search and greedy decoding dropped temperature / top_p without a word
    plain = tiny_lm()
    with pytest.warns(UserWarning) as caught:
        cfg = generation_config(plain, num_beams=2, temperature=0.7, top_p=0.5)
    assert cfg.num_beams == 2 and not cfg.sampling
    (line,) = [str(w.message) for w in caught]
    assert (
        line.startswith("top_p=0.5, temperature=0.7 have no effect: num_beams=2 is beam search")
        and "\n" not in line
    )
    with pytest.warns(UserWarning, match=r"top_k=5 has no effect: temperature=0.0 decodes greedily"):
        generation_config(plain, temperature=0, top_k=5)
    with pytest.warns(UserWarning, match=r"min_p=0.1 has no effect: mirostat=2 replaces"):
        generation_config(plain, mirostat=2, min_p=0.1)
    recwarn.clear()
    lm = tiny_lm(generation=GenerationConfig(eos_token_ids=[2], temperature=0.3, top_p=0.8))
    generation_config(lm, temperature=0)  # the model's own top_p stays set: not the caller's doing
    generation_config(plain, num_beams=2, temperature=1.0, repetition_penalty=1.2)  # both still apply
    generation_config(plain, top_p=0.5)  # asks for sampling: applies
    assert [str(w.message) for w in recwarn] == []
