"""OpenAI tool calling through ``lamina serve`` (lamina/serve/tools.py), with the official ``openai`` client and
SmolLM2 (whose template does not render tools: lamina's system-prompt format)."""

from __future__ import annotations

import json
from typing import Any

import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"],
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris? Also add 2 and 3."}]


@pytest.fixture(scope="module")
def client(make_server: Any) -> Any:
    server = make_server()
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def _valid(calls: Any) -> list[str]:
    names = []
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])
        names.append(c.function.name)
    return names


@pytest.mark.slow
def test_required_named_and_parallel_calls_validate(client: Any) -> None:
    kw = {"model": "smollm2", "messages": ASK, "tools": TOOLS, "max_tokens": 60, "temperature": 0}
    r = client.chat.completions.create(tool_choice="required", **kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert _valid(choice.message.tool_calls)
    r = client.chat.completions.create(tool_choice={"type": "function", "function": {"name": "add"}}, **kw)
    assert _valid(r.choices[0].message.tool_calls) == ["add"]
    r = client.chat.completions.create(tool_choice="required", parallel_tool_calls=False, **kw)
    assert len(r.choices[0].message.tool_calls) == 1
    # two calls in one answer, as the model chooses them: six seeded samples in one batched request (n=6),
    # every one valid, at least one with two calls
    r = client.chat.completions.create(tool_choice="required", n=6, **{**kw, "temperature": 1.0, "seed": 0})
    calls = [_valid(c.message.tool_calls) for c in r.choices]
    assert len(calls) == 6 and max(len(c) for c in calls) >= 2


@pytest.mark.slow
def test_streamed_deltas_concatenate_to_the_call(client: Any) -> None:
    kw = {
        "model": "smollm2",
        "messages": ASK,
        "tools": TOOLS,
        "max_tokens": 60,
        "temperature": 0,
        "tool_choice": "required",
    }
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls
    parts: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            finish = ch.finish_reason or finish
            for d in ch.delta.tool_calls or []:
                p = parts.setdefault(d.index, {"name": "", "arguments": ""})
                p["name"] += d.function.name or ""
                p["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls"
    assert [(p["name"], json.loads(p["arguments"])) for _, p in sorted(parts.items())] == [
        (c.function.name, json.loads(c.function.arguments)) for c in whole
    ]


@pytest.mark.slow
def test_auto_and_none_can_answer_in_text_and_tool_results_go_back(client: Any) -> None:
    kw = {"model": "smollm2", "tools": TOOLS, "max_tokens": 12, "temperature": 0}
    r = client.chat.completions.create(
        messages=[{"role": "user", "content": "Say hello."}], tool_choice="none", **kw
    )
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    r = client.chat.completions.create(
        messages=[{"role": "user", "content": "Say hello."}], tool_choice="auto", **kw
    )
    m = r.choices[0].message
    assert (m.content and r.choices[0].finish_reason in ("stop", "length")) or _valid(m.tool_calls)
    turns = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]
    r = client.chat.completions.create(messages=turns, tool_choice="none", **kw)
    assert r.choices[0].message.content


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "array", "uniqueItems": True}},
                    }
                ],
                "tool_choice": "required",
            },
            "tools",
        ),
    ],
)
def test_bad_tool_requests_name_the_field(client: Any, kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=30, **kwargs)
    assert e.value.body["param"] == param, e.value.body


def test_tool_rendering_and_parsing_without_a_model() -> None:
    """A template that renders tools gets them (and the calls as they are); one that does not gets lamina's
    system prompt and the calls as JSON content. parse_tool_calls reads the call form back with new ids."""
    from lamina.serve.tools import parse_tool_calls, plan_tools, render_tool_messages

    plan = plan_tools(TOOLS, "required", None)
    assert (
        plan is not None and plan.controls["json_schema"]["properties"]["tool_calls"].get("maxItems") is None
    )
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    turns = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    native, tools = render_tool_messages(turns, plan, template_has_tools=True)
    assert tools is not None and [t["function"]["name"] for t in tools] == ["get_weather", "add"]
    assert native[1]["tool_calls"] == [call]
    plain, tools = render_tool_messages(turns, plan, template_has_tools=False)
    assert tools is None and plain[0]["role"] == "system" and '"get_weather"' in plain[0]["content"]
    assert json.loads(plain[2]["content"]) == {"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}
    calls = parse_tool_calls('{"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}')
    assert calls is not None and calls[0]["function"] == {"name": "add", "arguments": '{"a": 1, "b": 2}'}
    assert parse_tool_calls("Hello there") is None
    none = plan_tools(TOOLS, "none", None)
    assert (
        none is not None and not none.calls and render_tool_messages(turns[:1], none, False)[0] == turns[:1]
    )
    named = plan_tools(TOOLS, {"type": "function", "function": {"name": "add"}}, True)
    assert named is not None and named.controls["json_schema"]["properties"]["tool_calls"]["maxItems"] == 1
