"""LaminaChat (lamina/apps/models.py) on a tiny random byte-level model: tool calls decoded under the
constraint always parse and validate, whatever the (random) model prefers."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lamina.apps import LaminaChat, Reply, Tool
from lamina.apps.models import render_messages
from lamina.errors import ConfigError

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def weather(city: str, unit: str = "C") -> str:
    """The weather in a city."""
    return f"sunny in {city}"


ASK = [{"role": "user", "content": "What is the weather in Paris? Add 2 and 3."}]


@pytest.fixture(scope="module")
def llm(byte_lm: Any) -> LaminaChat:
    return LaminaChat(byte_lm, temperature=0, max_new_tokens=48)


def test_required_and_named_calls_parse_and_validate(llm: LaminaChat) -> None:
    tools = [Tool.from_function(add), Tool.from_function(weather)]
    schemas = {t.name: t.parameters for t in tools}
    reply = llm.chat(ASK, tools, tool_choice="required")
    assert reply.finish_reason == "tool_calls" and reply.content is None and reply.tool_calls
    for call in reply.tool_calls:
        jsonschema.validate(call.arguments, schemas[call.name])
    named = llm.chat(ASK, tools, tool_choice={"type": "function", "function": {"name": "add"}})
    assert [c.name for c in named.tool_calls] == ["add"]
    jsonschema.validate(named.tool_calls[0].arguments, schemas["add"])
    sampled = [llm.chat(ASK, tools, "required", temperature=1.0, seed=s) for s in range(3)]
    for r in sampled:
        for call in r.tool_calls:
            jsonschema.validate(call.arguments, schemas[call.name])
    message = named.message()  # the assistant turn in OpenAI form
    assert message["content"] is None and json.loads(message["tool_calls"][0]["function"]["arguments"])
    with pytest.raises(ConfigError, match="sub"):
        llm.chat(ASK, tools, tool_choice="sub")
    with pytest.raises(ConfigError, match="drop regex"):  # never silently replaced
        llm.chat(ASK, tools, tool_choice="required", regex="[a-z]+")


def test_none_and_auto_answer_in_text_and_stream_only_text(llm: LaminaChat) -> None:
    deltas: list[str] = []
    reply = llm.chat(ASK, [add], tool_choice="none", stream=deltas.append)
    assert reply.tool_calls == [] and "".join(deltas) == reply.content
    deltas.clear()
    reply = llm.chat(ASK, [add], tool_choice="auto", stream=deltas.append)
    if reply.tool_calls:  # a call streams nothing
        assert deltas == []
    else:
        assert "".join(deltas) == reply.content and not reply.content.lstrip().startswith("{")
    assert llm("hello") == llm.chat([{"role": "user", "content": "hello"}]).content


def test_render_messages_without_template_tools() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1+2?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
    ]
    out, template_tools = render_messages(messages, [Tool.from_function(add)], native=False)
    assert template_tools is None
    assert (
        out[0]["content"].startswith("Be brief.\n\nYou can call these tools")
        and '"name": "add"' in out[0]["content"]
    )
    assert json.loads(out[2]["content"]) == {"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}
    assert out[3] == messages[3]
    out, template_tools = render_messages(messages, [Tool.from_function(add)], native=True)
    assert template_tools is not None and template_tools[0]["function"]["name"] == "add"
    assert out[2]["tool_calls"] == [call] and out[0]["content"] == "Be brief."
    assert Reply("hi").message() == {"role": "assistant", "content": "hi"}
