"""OpenAI tool calling (``tools``, ``tool_choice``, ``parallel_tool_calls``) for ``/v1/chat/completions``.

The tools reach the model through its chat template when the template renders ``tools`` (the
``transformers`` convention); otherwise through a system message in lamina's documented format
(:func:`tools_system_prompt`). Either way the model answers in one form, decoded under a constraint so
that every call parses and its arguments validate against the tool's JSON Schema::

    {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, ...]}

- ``tool_choice="required"``: the output is that object (one call, or several with ``parallel_tool_calls``,
  OpenAI's default); a named function: exactly one call of it; ``"auto"`` (the default with tools): that
  object or plain text that does not start with ``{`` (a Lark grammar); ``"none"``: plain text, and the tools
  are not shown to the model.
- Earlier turns: an assistant message's ``tool_calls`` are written back in the same form (as its
  content, or as the template's own ``tool_calls`` where it renders tools); ``role: "tool"`` messages go
  to the template as they are (with ``tool_call_id``).
- The response: ``message.tool_calls`` with ids ``call_<hex>``, arguments as JSON text, ``content`` None,
  ``finish_reason: "tool_calls"``.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from lamina.apps.tools import call_list, tool_choice_controls
from lamina.apps.tools import tools_system_prompt as _tools_system_prompt
from lamina.serve.errors import bad_request

__all__ = ["ToolPlan", "parse_tool_calls", "plan_tools", "render_tool_messages", "tools_system_prompt"]

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass
class ToolPlan:
    """What a request's tools ask of the decoding: the constraint fields, and whether output may be calls."""

    tools: list[dict[str, Any]]  # the request's tools (OpenAI form)
    controls: dict[str, Any]  # json_schema or grammar for the call (empty for tool_choice="none")
    calls: bool  # the output may hold tool calls


def _functions(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(f, dict):
            raise bad_request(
                f'tools[{i}] must be {{"type": "function", "function": {{"name": ...}}}}', param="tools"
            )
        name = f.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise bad_request(
                f"tools[{i}].function.name must be 1-64 of a-z, A-Z, 0-9, _ and -", param="tools"
            )
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise bad_request(f"tools[{i}].function.parameters must be a JSON Schema object", param="tools")
        out.append({"name": name, "description": f.get("description", ""), "parameters": params})
    if len({f["name"] for f in out}) != len(out):
        raise bad_request("two tools have the same name", param="tools")
    return out


def _specs(functions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``functions`` (``{"name", "description", "parameters"}``) in OpenAI's tool form."""
    return [{"type": "function", "function": f} for f in functions]


def plan_tools(
    tools: list[dict[str, Any]] | None, tool_choice: Any, parallel: bool | None
) -> ToolPlan | None:
    """The plan for a request's ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` (None: no tools).
    Raises a 400 naming the field for a malformed tool, an unknown named function, or tool_choice without
    tools. The constraint fields are lamina.apps.tools.tool_choice_controls' (one call schema and grammar
    for the server and the apps)."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise bad_request("tool_choice needs tools", param="tool_choice")
        return None
    functions = _functions(tools)
    parallel = True if parallel is None else parallel
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolPlan(tools, {}, calls=False)
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if not any(f["name"] == name for f in functions):
            raise bad_request(f"tool_choice names no tool of the request: {name!r}", param="tool_choice")
    elif choice not in ("required", "auto"):
        raise bad_request(
            'tool_choice must be "none", "auto", "required" or a named function', param="tool_choice"
        )
    return ToolPlan(tools, tool_choice_controls(_specs(functions), choice, parallel), calls=True)


def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    """lamina's system-prompt format for models whose template does not render tools (the request's tools
    checked, then lamina.apps.tools.tools_system_prompt)."""
    return _tools_system_prompt(_specs(_functions(tools)))


def _calls_text(tool_calls: list[dict[str, Any]]) -> str:
    """An assistant message's OpenAI ``tool_calls`` in lamina's call form (what the model is to write)."""
    calls = []
    for c in tool_calls:
        f = c.get("function") or {}
        args = f.get("arguments", "{}")
        with contextlib.suppress(ValueError):  # arguments that are not JSON stay text
            args = json.loads(args) if isinstance(args, str) else args
        calls.append({"name": f.get("name"), "arguments": args})
    return json.dumps({"tool_calls": calls}, ensure_ascii=False)


def render_tool_messages(
    messages: list[dict[str, Any]], plan: ToolPlan | None, template_has_tools: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """``messages`` for the template and the ``tools`` argument to give it (None: not the template's).

    Without template support the tools go into the system message (the first one, or a new one) and an
    assistant's ``tool_calls`` become its content in lamina's call form."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls") and not template_has_tools:
            m["content"] = _calls_text(m.pop("tool_calls"))
        out.append(m)
    if plan is None or not plan.calls:
        return out, None
    if template_has_tools:
        return out, _specs(_functions(plan.tools))
    prompt = tools_system_prompt(plan.tools)
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out, None


def parse_tool_calls(text: str) -> list[dict[str, Any]] | None:
    """OpenAI ``tool_calls`` (with new ids) from an output in lamina's call form; None for a text answer."""
    calls = call_list(text)
    if calls is None:
        return None
    return [
        {
            "id": "call_" + uuid.uuid4().hex[:24],
            "type": "function",
            "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)},
        }
        for c in calls
        if isinstance(c, dict) and "name" in c
    ]
