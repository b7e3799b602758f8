"""Grammar-backed constraints (lamina/generate/grammar.py, llguidance) and the conformance suite: 30 JSON
Schemas x 3 prompts decoded by SmolLM2, greedy and sampled, in one engine batch with regex, grammar,
json_object and choice requests; every output parses and validates (``jsonschema``), matches
(``re.fullmatch``) or parses (a small expression parser), within its ``max_new_tokens``."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from typing import Any

import pytest

from lamina.config import GenerationConfig
from lamina.errors import ConfigError
from lamina.generate.constrain import make_constraint

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

V = 49152  # SmolLM2's vocabulary

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"v": {"const": "fixed"}, "n": {"type": "null"}}, "required": ["v", "n"]},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["score"]},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": -5, "maximum": 5}}, "required": ["n"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3}}, "required": ["tags"]},
    {"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2}}, "required": ["xs"]},
    {"type": "array", "items": {"type": "boolean"}, "maxItems": 4},
    {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}},  # all optional
    {"type": "object", "properties": {"title": {"type": "string", "maxLength": 12}, "year": {"type": "integer"}}, "required": ["title"]},
    {"type": "object", "properties": {"p": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}}, "required": ["x", "y"]}}, "required": ["p"]},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {"id": {"type": "integer"}, "info": {"type": "object", "properties": {"mail": {"type": "string"}}, "required": ["mail"]}}, "required": ["id", "info"]}}, "required": ["user"]},
    {"type": "object", "properties": {"v": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 8}]}}, "required": ["v"]},
    {"anyOf": [{"type": "object", "properties": {"cat": {"type": "string"}}, "required": ["cat"]}, {"type": "object", "properties": {"dog": {"type": "integer"}}, "required": ["dog"]}]},
    {"type": "object", "properties": {"r": {"oneOf": [{"type": "boolean"}, {"type": "null"}]}}, "required": ["r"]},
    {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}, "required": ["x", "y"]}}, "type": "object", "properties": {"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}}, "required": ["a", "b"]},
    {"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}}, "required": ["v"]}}, "$ref": "#/$defs/node"},
    {},  # anything: depth and length bounded only by the budget
    {"type": "object", "properties": {"any": {}}, "required": ["any"]},
    {"type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 3},
    {"type": "object", "properties": {"k": {"type": "string"}}, "required": ["k"], "additionalProperties": False},
    {"type": "object", "properties": {"word": {"type": "string", "enum": ["café", "naïve", "日本語", "😀"]}}, "required": ["word"]},
    {"type": "object", "properties": {"greeting": {"type": "string", "minLength": 2}}, "required": ["greeting"]},
    {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["zip"]},
    {"type": "object", "properties": {"day": {"type": "string", "format": "date"}}, "required": ["day"]},
    {"type": "object", "properties": {"id": {"type": "string", "format": "uuid"}}, "required": ["id"]},
    {"type": "object", "properties": {"m": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}, "maxItems": 2}, "maxItems": 2}}, "required": ["m"]},
    {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}}, "required": ["sku", "qty"]}, "maxItems": 2}}, "required": ["items"]},
    {"type": ["string", "integer"]},
    {"type": "string", "enum": ["yes", "no"]},
    {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}, "c": {"type": "boolean"}, "d": {"type": "null"}}, "required": ["a", "b", "c", "d"]},
]  # fmt: skip

PROMPTS = ["Describe yourself as JSON.", "What is the capital of France?", "hi"]
REGEXES = [r"\d{3}-\d{4}", r"(yes|no|maybe)", r"[A-Z][a-z]{1,6} [0-9]{1,2}", r"[a-z]+@[a-z]+\.(com|org)"]
GBNF = 'root ::= expr\nexpr ::= term ("+" term)*\nterm ::= [0-9]+ | "(" expr ")"\n'
LARK = 'start: "[" item ("," item)* "]"\nitem: /[a-z]+/\n'


def _parses_expr(text: str) -> bool:
    """The GBNF grammar above, by recursive descent."""
    pos = 0

    def term() -> bool:
        nonlocal pos
        if pos < len(text) and text[pos].isdigit():
            while pos < len(text) and text[pos].isdigit():
                pos += 1
            return True
        if pos < len(text) and text[pos] == "(":
            pos += 1
            if not expr() or pos >= len(text) or text[pos] != ")":
                return False
            pos += 1
            return True
        return False

    def expr() -> bool:
        nonlocal pos
        if not term():
            return False
        while pos < len(text) and text[pos] == "+":
            pos += 1
            if not term():
                return False
        return True

    return expr() and pos == len(text)


def _budget(tok: Any, cfg: GenerationConfig, extra: int) -> int:
    """The shortest output's tokens plus ``extra``: short outputs that must be closed by the budget rule."""
    c = make_constraint(dataclasses.replace(cfg, max_new_tokens=10_000), tok, V, [2])
    return len(getattr(c, "closing", [])) + extra


@pytest.mark.slow
def test_every_constrained_output_validates(lamina_smollm2: Any) -> None:
    """One engine batch: 32 schemas x 3 prompts x (greedy, sampled), regexes, a GBNF and a Lark grammar,
    json_object and choices. Budgets are a few tokens past each shortest output, so most outputs are
    closed by the budget rule; every one must validate. (Replaces the two SmolLM2 decoding tests of
    test_constrain.py: json_object and choices ride in the same batch.)"""
    from lamina.generate.engine import generate_ids

    tok = lamina_smollm2.tokenizer
    runs: list[tuple[str, GenerationConfig, Any]] = []  # (prompt, config, what to check against)
    for i, schema in enumerate(SCHEMAS):
        for j, prompt in enumerate(PROMPTS):
            base = GenerationConfig(json_schema=schema)
            budget = _budget(tok, base, 4 + (i + j) % 5)
            for seed in (None, i * 3 + j):
                runs.append((prompt, dataclasses.replace(base, max_new_tokens=budget, seed=seed), schema))
    for k, rx in enumerate(REGEXES):
        runs += [
            (PROMPTS[k % 3], GenerationConfig(regex=rx, max_new_tokens=16, seed=s), rx) for s in (None, k)
        ]
    for g in (GBNF, LARK):
        runs += [(PROMPTS[0], GenerationConfig(grammar=g, max_new_tokens=12, seed=s), g) for s in (None, 5)]
    runs += [(p, GenerationConfig(response_format="json_object", max_new_tokens=b, json_max_depth=3, seed=s), "obj")
             for p, b, s in [(PROMPTS[0], 12, None), (PROMPTS[1], 30, 1)]]  # fmt: skip
    choice_sets = [["yes", "yes please", "no"], ["café ☕", "thé 🍵", "eau"]]
    runs += [("Would you like some tea?", GenerationConfig(choices=c, max_new_tokens=16, seed=s), c)
             for c in choice_sets for s in (None, 0, 1)]  # fmt: skip

    # plain prompts, no chat template: the constraint decides the form, and short prompts keep it fast
    prompts = [tok.encode(p, add_special_tokens=False) for p, _, _ in runs]
    cfgs = [dataclasses.replace(c, temperature=0.0 if c.seed is None else 1.0) for _, c, _ in runs]
    seqs = generate_ids(
        lamina_smollm2.model, prompts, cfgs, lamina_smollm2.generation.eos_token_ids, tokenizer=tok
    )
    bad = []
    for (_, cfg, want), seq in zip(runs, seqs, strict=True):
        text = seq.text or ""
        # "length" is fine where the output may end at any point (a regex or grammar that accepts there)
        ok = seq.finish_reason in ("stop", "length") and len(seq.tokens) <= cfg.max_new_tokens
        if ok and cfg.json_schema is not None:
            try:
                jsonschema.validate(json.loads(text), want, format_checker=jsonschema.FormatChecker())
            except (ValueError, jsonschema.ValidationError) as e:
                ok = f"{type(e).__name__}: {str(e)[:80]}"  # type: ignore[assignment]
        elif ok and cfg.regex:
            ok = re.fullmatch(want, text) is not None
        elif ok and cfg.grammar:
            ok = (
                _parses_expr(text)
                if want == GBNF
                else re.fullmatch(r"\[[a-z]+(,[a-z]+)*\]", text) is not None
            )
        elif ok and cfg.response_format == "json_object":
            ok = isinstance(json.loads(text), dict)
        elif ok and cfg.choices:
            ok = text in cfg.choices
        if ok is not True:
            bad.append((cfg.max_new_tokens, seq.finish_reason, text, ok))
    assert not bad, bad
    assert len(runs) >= 180


def test_random_walks_close_within_the_budget(lamina_smollm2: Any) -> None:
    """Any token the mask allows, picked at random (long tokens preferred), then the budget rule: the
    output always completes within max_new_tokens and validates. No model forward needed."""
    tok = lamina_smollm2.tokenizer
    rng = random.Random(0)
    for i in (0, 6, 12, 16, 17, 18, 28):
        schema = SCHEMAS[i]
        shortest = _budget(tok, GenerationConfig(json_schema=schema), 0)
        for budget in (shortest, shortest + 3, shortest + 15):
            c: Any = make_constraint(GenerationConfig(json_schema=schema, max_new_tokens=budget), tok, V, [2])
            out = _random_walk(c, budget, rng)
            jsonschema.validate(json.loads(tok.decode(out)), schema)


def _random_walk(c: Any, budget: int, rng: random.Random, each: Any = None) -> list[int]:
    """Tokens of constraint ``c`` picked at random among those its mask allows, through ``check`` (the
    budget rule), until it is done, eos (2) or ``budget``; ``each(out)`` after every token."""
    out: list[int] = []
    while not c.done and len(out) < budget:
        allowed = c.allowed(budget - len(out)).nonzero().flatten().tolist()
        token = c.check(rng.choice(allowed), budget - len(out))
        if token == 2:
            break
        c.advance(token)
        out.append(token)
        if each is not None:
            each(out)
    return out


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("json_schema", {"type": "string", "not": {"const": "a"}}, "not"),
        ("json_schema", {"type": "array", "uniqueItems": True}, "uniqueItems"),
        ("json_schema", {"if": {"type": "string"}, "then": {"minLength": 2}}, "if"),
        ("regex", "(unclosed", "regex is invalid: .*unclosed group; fix the regex$"),
        ("grammar", "start: undefined_rule\n", "grammar"),
    ],
)
def test_unsupported_or_broken_constraints_are_refused_up_front(
    lamina_smollm2: Any, field: str, value: Any, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        make_constraint(GenerationConfig(**{field: value}), lamina_smollm2.tokenizer, V, [2])
    assert "\n" not in str(e.value)  # before: a broken regex's error quoted it over six lines


def test_a_budget_below_the_shortest_output_is_refused(lamina_smollm2: Any) -> None:
    schema = SCHEMAS[31]  # four required fields
    with pytest.raises(ConfigError, match=r"max_new_tokens=5 is too small.*fix: max_new_tokens >= \d+"):
        make_constraint(
            GenerationConfig(json_schema=schema, max_new_tokens=5), lamina_smollm2.tokenizer, V, [2]
        )


def test_one_constraint_per_request() -> None:
    with pytest.raises(ConfigError, match="cannot be combined"):
        GenerationConfig(json_schema={"type": "object"}, regex="a+")


def test_schema_and_grammar_fields_read_files(tmp_path: Any) -> None:
    from lamina.fields import build

    (tmp_path / "s.json").write_text('{"type": "integer"}')
    (tmp_path / "g.lark").write_text(LARK)
    cfg = build(GenerationConfig, {"json_schema": str(tmp_path / "s.json")})
    assert cfg.json_schema == {"type": "integer"}
    assert build(GenerationConfig, {"json_schema": '{"type": "string"}'}).json_schema == {"type": "string"}
    assert build(GenerationConfig, {"grammar": str(tmp_path / "g.lark")}).grammar == LARK


def test_beam_search_refuses_grammar_constraints() -> None:
    """Beam search does not apply constraints: refused, never silently dropped."""
    from lamina.generate.beam import check_beam_config

    for field, value in (("json_schema", {"type": "object"}), ("regex", "a+"), ("grammar", 'start: "a"')):
        with pytest.raises(ConfigError, match=field):
            check_beam_config(GenerationConfig(num_beams=2, temperature=0.0, **{field: value}))


def test_kept_closing_paths_still_close(lamina_smollm2: Any) -> None:
    """Far from the budget, check() keeps the previous closing path while it still closes the output (no
    new search): at every step of random walks the path held closes the output (consumed on a copy, the
    matcher accepts) and fits the budget left; the searches run are fewer than the steps; and the outputs
    validate."""
    tok = lamina_smollm2.tokenizer
    rng = random.Random(1)
    steps = searches = 0
    for i in (0, 6, 12, 18):
        schema = SCHEMAS[i]
        budget = _budget(tok, GenerationConfig(json_schema=schema), 60)
        c: Any = make_constraint(GenerationConfig(json_schema=schema, max_new_tokens=budget), tok, V, [2])
        search = c.closer.path

        def counted(m: Any, search: Any = search) -> Any:
            nonlocal searches
            searches += 1
            return search(m)

        c.closer.path = counted

        def held_path_closes(out: list[int], c: Any = c, budget: int = budget) -> None:
            nonlocal steps
            steps += 1
            m = c.matcher.deep_copy()
            assert m.consume_tokens(c.closing) and m.is_accepting(), (tok.decode(out), c.closing)
            assert len(c.closing) <= budget - len(out)

        out = _random_walk(c, budget, rng, held_path_closes)
        jsonschema.validate(json.loads(tok.decode(out)), schema)
    assert searches < steps / 2, (searches, steps)
