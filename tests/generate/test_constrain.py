"""Constrained decoding (lamina/generate/constrain.py): the JSON automaton against ``json.loads``, token masks
against a brute-force check on a hand-made vocabulary, choices, and SmolLM2 decoding under the constraints."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import models

from lamina.config import GenerationConfig
from lamina.errors import ConfigError, LaminaError
from lamina.generate.constrain import (
    AutomatonConstraint,
    ChoiceAutomaton,
    JsonAutomaton,
    TokenMasker,
    TokenTrie,
    make_constraint,
    token_bytes,
)
from lamina.tokenizer import Tokenizer

JSON_CFG = GenerationConfig(response_format="json_object", temperature=0.0)


# ===================================================================================== helpers


def _run(automaton: Any, data: bytes) -> Any:
    """The automaton's state after ``data``, or None once it dies."""
    state = automaton.start()
    for byte in data:
        state = automaton.step(state, byte)
        if state is None:
            return None
    return state


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [*value, *(s for v in value.values() for s in _strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def _reject(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def reference_ok(data: bytes, max_depth: int) -> bool:
    """What JSON mode accepts, by ``json.loads``: one object, strict UTF-8, no lone surrogates, nesting at
    most ``max_depth``, at most 2 whitespace bytes in a row, nothing after the closing brace."""
    try:
        text = data.decode("utf-8")
        value = json.loads(text, parse_constant=_reject)
        for s in _strings(value):
            s.encode("utf-8")  # a lone surrogate (\ud800 alone) fails here
    except (ValueError, RecursionError):
        return False
    outside_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    return (
        isinstance(value, dict)
        and text.endswith("}")
        and _depth(value) <= max_depth
        and not re.search(r"[ \t\n\r]{3}", outside_strings)
    )


def _random_value(rng: random.Random, depth: int) -> Any:
    kind = rng.randrange(8 if depth > 0 else 6)
    if kind == 0:
        return rng.choice([True, False, None])
    if kind == 1:
        return rng.choice([0, -7, 12345, 10**20, -(10**3)])
    if kind == 2:
        return rng.choice([0.5, -1.25e-7, 3e21, 1.0, -0.0, 6.02214076e23])
    if kind in (3, 4, 5):
        alphabet = ["a", "Z", " ", '"', "\\", "/", "\n", "\t", "\x01", "\x7f", "é", "€", "😀", "\u2028", "中"]
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(6)))
    if kind == 6:
        return [_random_value(rng, depth - 1) for _ in range(rng.randrange(4))]
    return {_random_value(rng, 0) if rng.random() < 0.3 else f"k{i}": _random_value(rng, depth - 1)
            for i in range(rng.randrange(4))}  # fmt: skip


def _random_object_text(rng: random.Random, depth: int) -> bytes:
    obj = {f"k{i}": _random_value(rng, depth - 1) for i in range(rng.randrange(4))}
    separators = rng.choice([(",", ":"), (", ", ": "), (" , ", " : "), (",  ", ":\n")])
    indent = rng.choice([None, None, None, 1, "\t", 2])
    text = json.dumps(obj, ensure_ascii=rng.random() < 0.5, separators=separators, indent=indent)
    return (rng.choice(["", " ", "\n", "   "]) + text).encode("utf-8")


# A small vocabulary: every byte JSON mode needs, plus multi-byte tokens that cross structure boundaries.
SINGLE = [
    bytes([b]) for b in [*range(0x20, 0x7F), *range(0x80, 0xC0), *b"\n\t\r\x01", 0xC3, 0xE2, 0xED, 0xF0]
]
MULTI = [
    b'{"', b'":', b'",', b'"}', b'"]', b'}}', b']]', b'}]', b'],', b'},', b'[[', b'[{', b'{}', b'[]', b': "',
    b'", "', b' {"', b'": [', b'"}}', b'\n  ', b'  ', b'   ', b'\n\n', b'\\u', b'\\n', b'\\"', b'\\ud83d',
    b'\\ude00', b'\\uD800', b'\xc3\xa9', b'\xe2\x82\xac', b'\xed\xa0\x80', b'\xf0\x9f\x98\x80', b'\xc3\xa9"',
    b' true', b'true', b'fals', b'e}', b' null', b'nul', b'123', b'1.5', b'e+', b'-0', b'01', b'.5e-3',
    b'name', b' name', b'\x00', b'"a":1}', b'}},', b'{"a":{"b":[[', b'"\n}',
]  # fmt: skip
EOS = len(SINGLE) + len(MULTI)
SMALL_VOCAB: list[bytes | None] = [*SINGLE, *MULTI, None]  # the last id: eos (no bytes)


def _masker(max_depth: int = 4, vocab: Sequence[bytes | None] = SMALL_VOCAB) -> TokenMasker:
    trie = TokenTrie(vocab)
    return TokenMasker(trie, JsonAutomaton(max_depth, lookahead=trie.max_count(b"{}[]")), [EOS])


def _close(automaton: Any, state: Any) -> bytes:
    """A shortest completion, one byte at a time, each lowering the distance by 1."""
    out = b""
    while not automaton.accepts(state):
        d = automaton.distance(state)
        byte, state = next(
            (b, s) for b in range(256) if (s := automaton.step(state, b)) is not None and automaton.distance(s) == d - 1
        )  # fmt: skip
        out += bytes([byte])
    return out


# ===================================================================================== the JSON automaton


def test_text_needs_no_constraint(lamina_smollm2: Any) -> None:
    assert make_constraint(GenerationConfig(), lamina_smollm2.tokenizer, 49152) is None


@pytest.mark.parametrize("seed", range(4))
def test_json_automaton_agrees_with_json_loads(seed: int) -> None:
    """Random objects in several layouts, then random one-byte edits of them: accepted exactly when
    ``reference_ok`` (``json.loads`` plus the depth and whitespace limits) accepts."""
    rng = random.Random(seed)
    automaton = JsonAutomaton(max_depth=4)
    checked = {True: 0, False: 0}
    edits = b'{}[]":,\\ u0123456789.eE+-tfnlrsa\n\t\x01\x7f' + bytes(
        [0xC3, 0xA9, 0xED, 0xA0, 0x80, 0xF0, 0xFF]
    )
    for _ in range(150):
        text = _random_object_text(rng, depth=rng.randrange(1, 6))
        variants = [text]
        for _ in range(8):
            i, kind = rng.randrange(len(text) + 1), rng.randrange(3)
            byte = bytes([rng.choice(edits)])
            variants.append(
                text[:i] + byte + text[i:] if kind == 0 else text[:i] + byte + text[i + 1 :] if kind == 1
                else text[:i] + text[i + 1 :]
            )  # fmt: skip
        for data in variants:
            state = _run(automaton, data)
            ours = state is not None and automaton.accepts(state)
            assert ours == reference_ok(data, 4), data
            checked[ours] += 1
    assert min(checked.values()) > 100, checked  # both outcomes well represented


@pytest.mark.parametrize(
    ("text", "dies_at"),
    [
        (b'{"a" 1}', 5), (b'{,}', 1), (b'{"a":01}', 6), (b'{"a":tru}', 8), (b'{"\x01"}', 2), (b'{"\\q"}', 3),
        (b'{"a":[1,]}', 8), (b'{"a":1,}', 7), (b'[1]', 0), (b'{"a":1}}', 7), (b'{"a":1} ', 7), (b'{"a":-}', 6),
        (b'{"a":1.}', 7), (b'{"a":1e}', 7), (b'{"a":.5}', 5), (b'{"\\u12g4"}', 6), (b'{"\\udc00"}', 5),
        (b'{"\\ud800x"}', 8), (b'{"\\ud800\\u0041"}', 10), (b'{"\xed\xa0\x80"}', 3), (b'{"\xc3("}', 3),
        (b'{"\xc0\x80"}', 2), (b'{"a":   1}', 7), (b'   {}', 2), (b"{'a':1}", 1), (b'{"a":NaN}', 5),
        (b'{"a":[[[[1]]]]}', 8), (b'{"a":1 2}', 7), (b'{"a":"b" "c"}', 9), (b'{"a":{"b":1]}', 11),
    ],
)  # fmt: skip
def test_json_automaton_rejects_at_the_first_wrong_byte(text: bytes, dies_at: int) -> None:
    """Each text is a valid prefix up to ``dies_at`` and dead right after it (depth limit 4)."""
    automaton = JsonAutomaton(max_depth=4)
    assert _run(automaton, text[:dies_at]) is not None
    assert _run(automaton, text[: dies_at + 1]) is None
    assert not reference_ok(text, 4)


def test_depth_limit_forbids_opening_past_it() -> None:
    masker = _masker(max_depth=4)
    constraint = AutomatonConstraint(masker)
    for token in (b'{"', b"a", b'": [', b"[", b"["):  # {"a": [[[  -> 4 open containers
        constraint.advance(SMALL_VOCAB.index(token))
    allowed = {SMALL_VOCAB[i] for i in constraint.allowed(100).nonzero().flatten().tolist()}
    assert not {b"[", b"{", b"[[", b"[{", b"{}", b"[]", b' {"', b'{"'} & allowed  # ('": [' is a string)
    assert {b"]", b"1", b'"', b"]]", b"}]"} & allowed == {
        b"]",
        b"1",
        b'"',
        b"]]",
    }  # "}]" closes the wrong kind
    deeper = AutomatonConstraint(_masker(max_depth=5), constraint.state).allowed(100)
    assert deeper[SMALL_VOCAB.index(b"[")] and not deeper[SMALL_VOCAB.index(b"[[")]  # one more level only
    state = _run(JsonAutomaton(max_depth=2), b'{"a":[')
    assert state is not None and JsonAutomaton(max_depth=2).step(state, ord("[")) is None


# ===================================================================================== masks by brute force


@pytest.mark.parametrize("max_depth", [3, 9])
def test_masks_equal_a_brute_force_check_of_every_token(max_depth: int) -> None:
    """Random walks over the hand-made vocabulary: at every step, a token is allowed exactly when running
    its bytes from the full state keeps the automaton alive and completable within the budget (no trie,
    memo or shortcut), and every allowed token's output can be completed to text ``json.loads`` takes.
    With ``max_depth=9`` the walks favour opening brackets, so stacks grow deeper than the part of them a
    mask key keeps (``lookahead + 1`` = 5 here)."""
    masker = _masker(max_depth=max_depth)
    automaton = masker.automaton
    rng = random.Random(max_depth)
    steps, deepest = 0, 0
    for walk in range(40):
        budget = rng.choice([2, 3, 5, 8, 40])
        constraint, text = AutomatonConstraint(masker), b""
        for used in range(budget):
            remaining = budget - used
            mask = constraint.allowed(remaining)
            state, want = constraint.state, []
            for token, data in enumerate(SMALL_VOCAB):
                after = masker.run(state, token) if data else None
                want.append(after is not None and automaton.distance(after) <= remaining - 1)
            assert mask.tolist() == want, (text, remaining)
            allowed = mask.nonzero().flatten().tolist()
            for token in allowed if walk < 5 else ():
                after = masker.run(state, token)
                data = text + (SMALL_VOCAB[token] or b"")
                assert reference_ok(data + _close(automaton, after), max_depth), data
            opening = [t for t in allowed if max_depth > 3 and b"[" in (SMALL_VOCAB[t] or b"")]
            token = rng.choice(opening if opening and rng.random() < 0.5 else allowed)
            constraint.advance(token)
            text += SMALL_VOCAB[token] or b""
            deepest = max(deepest, len(constraint.state[1]))
            steps += 1
            if constraint.done:
                break
        assert constraint.done and reference_ok(text, max_depth), text
    assert masker.walks < steps  # the memo served some steps
    assert max_depth == 3 or deepest > 5  # deeper than a mask key sees


@pytest.mark.parametrize("budget", [2, 3, 4, 6, 10, 30])
def test_random_decoding_always_parses_within_the_budget(budget: int) -> None:
    masker = _masker(max_depth=3)
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        constraint, text = AutomatonConstraint(masker), b""
        for used in range(budget):
            logits = torch.randn(len(SMALL_VOCAB), generator=g) * 3
            logits[~constraint.allowed(budget - used)] = float("-inf")
            token = int(torch.multinomial(logits.softmax(-1), 1, generator=g))
            constraint.advance(token)
            text += SMALL_VOCAB[token] or b""
            if constraint.done:
                break
        assert constraint.done, text
        assert isinstance(json.loads(text), dict) and reference_ok(text, 3), text


def test_advancing_a_forbidden_token_raises() -> None:
    constraint = AutomatonConstraint(_masker())
    with pytest.raises(LaminaError, match="cannot continue"):
        constraint.advance(SMALL_VOCAB.index(b"["))
    with pytest.raises(LaminaError, match="cannot continue"):
        constraint.advance(EOS)


# ===================================================================================== choices


def _choice_constraint(choices: list[str], vocab: list[bytes | None]) -> AutomatonConstraint:
    trie = TokenTrie(vocab)
    return AutomatonConstraint(TokenMasker(trie, ChoiceAutomaton(choices, trie), [len(vocab) - 1]))


def test_choices_with_shared_prefixes() -> None:
    vocab: list[bytes | None] = [
        b"y",
        b"e",
        b"s",
        b"yes",
        b" ",
        b"p",
        b" please",
        b"no",
        b"n",
        b"o",
        b"x",
        None,
    ]
    ids = {t: i for i, t in enumerate(vocab) if t is not None}
    eos = len(vocab) - 1

    def names(mask: torch.Tensor) -> set[bytes | None]:
        return {vocab[i] for i in mask.nonzero().flatten().tolist()}

    c = _choice_constraint(["yes", "yes please", "no"], vocab)
    assert names(c.allowed(10)) == {b"y", b"yes", b"no", b"n"}
    assert names(c.allowed(1)) == {b"yes", b"no"}  # one token left: only choices of one token
    c.advance(ids[b"yes"])
    assert not c.done
    # go on, or end with eos; " " leads nowhere: this vocabulary cannot spell "please" after it
    assert names(c.allowed(10)) == names(c.allowed(1)) == {b" please", None}
    c2 = c.copy()
    c.advance(ids[b" please"])
    assert c.done
    c2.advance(eos)
    assert c2.done
    c3 = _choice_constraint(["yes", "yes please", "no"], vocab)
    for t in (b"n", b"o"):
        c3.advance(ids[t])
    assert c3.done  # "no": no longer choice extends it
    with pytest.raises(LaminaError):
        _choice_constraint(["yes", "no"], vocab).advance(ids[b"x"])


def test_choice_distances_count_tokens() -> None:
    vocab: list[bytes | None] = [bytes([b]) for b in range(256)] + [b"yes", b" please", b"caf\xc3\xa9", None]
    trie = TokenTrie(vocab)
    automaton = ChoiceAutomaton(["yes please", "café", "no"], trie)
    assert automaton.distance(automaton.start()) == 1  # "café" is one token
    assert automaton.distance(_run(automaton, b"yes")) == 1
    assert automaton.distance(_run(automaton, b"caf\xc3")) == 1
    assert automaton.distance(_run(automaton, b"y")) == 3  # "e", "s", " please"


def test_impossible_requests_are_config_errors(lamina_smollm2: Any) -> None:
    words = {"a": 0, "b": 1, "ab": 2, "<eos>": 3, "<unk>": 4}
    tiny = Tokenizer(
        Backend(models.WordLevel(words, unk_token="<unk>")), eos_token="<eos>", unk_token="<unk>"
    )
    assert token_bytes(tiny) == [b"a", b"b", b"ab", None, None]
    with pytest.raises(ConfigError, match="'zz' cannot be written"):
        make_constraint(GenerationConfig(choices=["ab", "zz"]), tiny, 5)
    with pytest.raises(ConfigError, match="one-byte token"):
        make_constraint(GenerationConfig(response_format="json_object"), tiny, 5)
    assert make_constraint(GenerationConfig(choices=["ab", "ba"]), tiny, 5) is not None
    with pytest.raises(ConfigError, match="only an end-of-sequence token can end it"):
        make_constraint(GenerationConfig(choices=["a", "ab"], ignore_eos=True), tiny, 5)
    tok = lamina_smollm2.tokenizer
    with pytest.raises(ConfigError, match="max_new_tokens=1 is too small"):
        make_constraint(GenerationConfig(response_format="json_object", max_new_tokens=1), tok, 49152)
    with pytest.raises(ConfigError, match="max_new_tokens=1 is too small"):
        make_constraint(GenerationConfig(choices=["x7q9 zz", "qqq wvw"], max_new_tokens=1), tok, 49152)


def test_any_of_the_models_eos_ids_ends_a_constrained_output() -> None:
    """Choices and JSON end at any end-of-generation id of the model (eos, end of turn, ...), not only at
    the tokenizer's eos: a chat model whose turn ends with <eot> must be able to stop there."""
    words = {"a": 0, "b": 1, "ab": 2, "<eos>": 3, "<unk>": 4, "<eot>": 5}
    tok = Tokenizer(Backend(models.WordLevel(words, unk_token="<unk>")), eos_token="<eos>", unk_token="<unk>")

    def after_a(c: AutomatonConstraint | None) -> set[int]:
        assert c is not None
        c.advance(words["a"])
        return set(c.allowed(5).nonzero().flatten().tolist())

    # "a" is complete but "ab" goes on: "b" or an end-of-generation id
    assert after_a(make_constraint(GenerationConfig(choices=["a", "ab"], eos_token_ids=[3, 5]), tok, 6)) == {
        1,
        3,
        5,
    }
    assert after_a(make_constraint(GenerationConfig(choices=["a", "ab"]), tok, 6, eos_token_ids=[5, 3])) == {
        1,
        3,
        5,
    }
    assert after_a(make_constraint(GenerationConfig(choices=["a", "ab"]), tok, 6)) == {1, 3}
    ignore = GenerationConfig(choices=["a", "ab"], ignore_eos=True, stop_token_ids=[4])
    assert after_a(make_constraint(ignore, tok, 6, eos_token_ids=[5])) == {1, 4}


def test_a_chat_model_stops_a_choice_at_its_end_of_turn() -> None:
    """Through the engine: with the tokenizer's eos and the longer choice's next word banned, "cat" still
    ends, at the model's second eos id."""
    from tiny_chat import tiny_lm

    from lamina.generate.engine import generate_ids

    lm = tiny_lm()
    tok = lm.tokenizer
    eos, eot, sat = (tok.token_to_id(t) for t in ("<|im_end|>", "<|im_start|>", "sat"))
    ban = {eos: float("-inf"), sat: float("-inf")}
    cfg = GenerationConfig(choices=["cat", "catsat"], temperature=0, logit_bias=ban, max_new_tokens=5)
    (seq,) = generate_ids(
        lm.model, [tok.encode("the dog", add_special_tokens=False)], cfg, [eos, eot], tokenizer=tok
    )
    assert seq.tokens == [tok.token_to_id("cat")] and seq.finish_reason == "stop"


def test_smollm2_token_bytes_spell_the_text(lamina_smollm2: Any) -> None:
    tok = lamina_smollm2.tokenizer
    spelled = token_bytes(tok)
    assert len(spelled) == 49152 and spelled[tok.eos_token_id] is None and spelled[0] is None
    for text in ['{"name": "Zoë", "price": 3.5}', "  naïve café ☕ 😀 中文\n\t}", '\\u00e9 "quoted"']:
        ids = tok.encode(text, add_special_tokens=False)
        assert b"".join(spelled[i] or b"?" for i in ids) == text.encode("utf-8")


# ===================================================================================== SmolLM2 decoding


Run = tuple[str, GenerationConfig, int | None]  # prompt, config, seed (None: greedy)


def _decode(loaded: Any, runs: Sequence[Run]) -> tuple[list[str], list[bool]]:
    """Decode ``runs`` as one batch with the engine (greedy when the seed is None, else sampled at
    temperature 1 with that seed). Returns each row's text and whether its output finished ("stop")."""
    from lamina.generate.engine import generate_ids

    model, tok = loaded.model, loaded.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
               for p, _, _ in runs]  # fmt: skip
    cfgs = [
        dataclasses.replace(cfg, temperature=0.0 if seed is None else 1.0, seed=seed) for _, cfg, seed in runs
    ]
    seqs = generate_ids(model, prompts, cfgs, loaded.generation.eos_token_ids, tokenizer=tok)
    return [s.text or "" for s in seqs], [s.finish_reason == "stop" for s in seqs]


def test_json_masks_are_memoised_per_tokenizer(lamina_smollm2: Any) -> None:
    """Two constraints with the same settings share one masker; its memo turns repeat states into lookups."""
    tok = lamina_smollm2.tokenizer
    a = make_constraint(JSON_CFG, tok, 49152)
    b = make_constraint(JSON_CFG, tok, 49152)
    assert a is not None and b is not None and a.masker is b.masker
    for token in tok.encode('{"a": "x', add_special_tokens=False):
        a.allowed(100)
        a.advance(token)
    walks = a.masker.walks
    for token in tok.encode('{"a": "x', add_special_tokens=False):
        b.allowed(100)
        b.advance(token)
    assert a.masker.walks == walks  # no new trie walk: every mask came from the memo
    assert a.state == b.state
