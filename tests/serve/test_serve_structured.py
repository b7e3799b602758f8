"""Structured output through the server (lamina/serve/params.py): OpenAI's ``response_format`` json_schema
and vLLM's ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``, with the official
``openai`` client; refusals name the request field."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "population": {"type": "integer", "minimum": 0},
    },
    "required": ["city", "population"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client(make_server: Any) -> Any:
    server = make_server()
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_response_format_json_schema_in_chat(client: Any) -> None:
    r = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Name a big city and its population."}],
        max_tokens=24,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": SCHEMA, "strict": True},
        },
    )
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    assert r.choices[0].finish_reason == "stop"


def test_vllm_guided_fields(client: Any) -> None:
    cases: list[tuple[dict[str, Any], Any]] = [
        ({"guided_json": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
        ({"guided_json": json.dumps(SCHEMA)}, lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
        ({"guided_regex": r"[0-9]{3}-[0-9]{4}"}, lambda t: re.fullmatch(r"[0-9]{3}-[0-9]{4}", t) or 1 / 0),
        ({"guided_choice": ["red", "green"]}, lambda t: t in ("red", "green") or 1 / 0),
        (
            {"guided_grammar": 'start: "(" NUM ")"\nNUM: /[0-9]+/\n'},
            lambda t: re.fullmatch(r"\([0-9]+\)", t) or 1 / 0,
        ),
    ]
    for extra, check in cases:
        r = client.completions.create(
            model="smollm2", prompt="Answer:", max_tokens=20, temperature=1.0, seed=3, extra_body=extra
        )
        check(r.choices[0].text)


@pytest.mark.parametrize(
    ("kwargs", "param", "words"),
    [
        (
            {"extra_body": {"guided_json": {"type": "array", "uniqueItems": True}}},
            "guided_json",
            "uniqueItems",
        ),
        ({"extra_body": {"guided_json": "{not json"}}, "guided_json", "not valid JSON"),
        ({"extra_body": {"guided_regex": "(unclosed"}}, "guided_regex", "regex"),
        ({"extra_body": {"guided_grammar": "start: nothing_defined\n"}}, "guided_grammar", "grammar"),
        (
            {"extra_body": {"guided_json": SCHEMA}, "max_tokens": 3},
            "guided_json",
            "max_new_tokens=3 is too small",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
            "response_format",
            "not",
        ),
        ({"extra_body": {"guided_json": SCHEMA, "guided_regex": "a"}}, "guided_regex", "cannot be combined"),
    ],
)
def test_refusals_name_the_field(client: Any, kwargs: dict[str, Any], param: str, words: str) -> None:
    kwargs = {"max_tokens": 20, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "x"}], **kwargs)
    body = e.value.body
    assert body["param"] == param, body
    assert words in body["message"], body
