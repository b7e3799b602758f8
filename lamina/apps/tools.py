"""Tools: Python functions a model may call, described by a JSON Schema of their arguments.

    from lamina.apps import Tool

    def add(a: int, b: int) -> int:
        \"\"\"Add two integers.

        Args:
            a: the first addend
            b: the second addend
        \"\"\"
        return a + b

    tool = Tool.from_function(add)
    tool.parameters  # {"type": "object", "properties": {"a": {"type": "integer", "description": ...}, ...}}
    tool({"a": 2, "b": 3})  # 5: arguments validated against the schema, then the call

The schema comes from the type hints (``str``, ``int``, ``float``, ``bool``, ``None``, ``list[X]``,
``tuple[X, ...]``, ``dict[str, X]``, ``Literal[...]``, ``Enum`` subclasses, ``X | Y``, ``Optional[X]``,
``Annotated[X, "description"]``) and the docstring (its first paragraph describes the tool; Google-style
``Args:`` entries or Sphinx ``:param name:`` lines describe the arguments), the same way LangChain's
``@tool`` and OpenAI's function-calling guides derive one. A parameter with a default is optional.

The wire form of calls is lamina's (the same as ``lamina serve``'s tool calling, lamina/serve/tools.py)::

    {"tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 3}}, ...]}

:func:`calls_schema` is its JSON Schema over a set of tools, so that a model decoding under it can only
write calls whose arguments validate; :func:`tool_choice_controls` turns OpenAI's ``tool_choice``
(``"none"``, ``"auto"``, ``"required"``, a named function) into the engine's constraint fields.
"""

from __future__ import annotations

import enum
import inspect
import json
import re
import types
import typing
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lamina.errors import ConfigError

__all__ = [
    "Tool",
    "ToolCall",
    "calls_schema",
    "parse_calls",
    "tool_choice_controls",
    "tools_system_prompt",
]

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's function names


@dataclass
class ToolCall:
    """One call a model asked for: ``arguments`` as the model wrote them (a dict when they parsed as a JSON
    object; otherwise the raw text, which the agent reports back as an invalid call)."""

    name: str
    arguments: Any
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def openai(self) -> dict[str, Any]:
        """The call in OpenAI's form (``tool_calls`` entries of an assistant message)."""
        args = self.arguments if isinstance(self.arguments, str) else json.dumps(self.arguments)
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": args}}


@dataclass(frozen=True)
class Tool:
    """A function a model may call: its ``name``, a ``description`` for the model, ``parameters`` (the JSON
    Schema of its keyword arguments, an object schema) and ``fn``.

    ``Tool.from_function`` builds all four from a typed, documented function. Calling the tool with a
    mapping of arguments validates them (``validate``) and calls ``fn(**arguments)``.
    """

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]
    _convert: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ConfigError(f"tool name {self.name!r} must be 1-64 of a-z, A-Z, 0-9, _ and -")
        if self.parameters.get("type") != "object":
            raise ConfigError(
                f"tool {self.name!r}: parameters must be an object schema ({{'type': 'object'}})"
            )

    @classmethod
    def from_function(
        cls, fn: Callable[..., Any], name: str | None = None, description: str | None = None
    ) -> Tool:
        """The tool of ``fn``: its name (or ``name``), the docstring's first paragraph (or
        ``description``) and the JSON Schema of its parameters from their type hints and the docstring's
        argument descriptions. Raises ``ConfigError`` for a parameter without a type hint, ``*args`` /
        ``**kwargs``, and a hint with no JSON Schema form (the message names the parameter)."""
        tool_name = str(name or getattr(fn, "__name__", ""))
        doc = inspect.getdoc(fn) or ""
        summary, arg_docs = _parse_docstring(doc)
        hints = typing.get_type_hints(fn, include_extras=True)
        properties: dict[str, Any] = {}
        required: list[str] = []
        convert: dict[str, Callable[[Any], Any]] = {}
        for p in inspect.signature(fn).parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise ConfigError(
                    f"tool {tool_name!r}: *{p.name} / **{p.name} cannot be described to a model"
                )
            if p.name not in hints:
                raise ConfigError(f"tool {tool_name!r}: parameter {p.name!r} needs a type hint")
            try:
                schema, conv = _schema(hints[p.name])
            except ConfigError as e:
                raise ConfigError(f"tool {tool_name!r}, parameter {p.name!r}: {e}") from None
            if p.name in arg_docs and "description" not in schema:
                schema = {**schema, "description": arg_docs[p.name]}
            if p.default is p.empty:
                required.append(p.name)
            elif _is_json(p.default):
                schema = {
                    **schema,
                    "default": p.default.value if isinstance(p.default, enum.Enum) else p.default,
                }
            properties[p.name] = schema
            if conv is not None:
                convert[p.name] = conv
        parameters: dict[str, Any] = {"type": "object", "properties": properties, "required": required}
        parameters["additionalProperties"] = False
        return cls(tool_name, description if description is not None else summary, parameters, fn, convert)

    def spec(self) -> dict[str, Any]:
        """The tool in OpenAI's form: ``{"type": "function", "function": {name, description, parameters}}``
        (what ``tools=`` of the chat API takes and a chat template renders)."""
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": function}

    def validate(self, arguments: Any) -> None:
        """Raise ``ConfigError`` naming the problems (up to three) when ``arguments`` do not validate
        against ``parameters`` (the ``jsonschema`` package's Draft 2020-12 validator)."""
        try:
            import jsonschema
        except ImportError:
            raise ConfigError(
                "validating tool arguments needs jsonschema; fix: pip install 'lamina[apps]'"
            ) from None
        if not isinstance(arguments, dict):
            raise ConfigError(f"arguments must be a JSON object, got {json.dumps(arguments)[:200]}")
        validator = jsonschema.Draft202012Validator(self.parameters)
        errors = sorted(validator.iter_errors(arguments), key=lambda e: list(map(str, e.absolute_path)))
        if errors:
            said = []
            for e in errors[:3]:
                where = "/".join(str(p) for p in e.absolute_path)
                said.append(f"{'at ' + where + ': ' if where else ''}{e.message}")
            raise ConfigError(f"invalid arguments: {'; '.join(said)}")

    def __call__(self, arguments: Mapping[str, Any]) -> Any:
        """``fn(**arguments)`` after ``validate`` (``Enum`` and ``tuple`` parameters converted from their
        JSON form). Raises ``ConfigError`` for invalid arguments; whatever ``fn`` raises propagates."""
        self.validate(arguments)
        args = dict(arguments)
        for k, conv in self._convert.items():
            if k in args and args[k] is not None:
                args[k] = conv(args[k])
        return self.fn(**args)


def _is_json(value: Any) -> bool:
    if isinstance(value, enum.Enum):
        value = value.value
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


_PRIMITIVES: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _schema(hint: Any) -> tuple[dict[str, Any], Callable[[Any], Any] | None]:
    """The JSON Schema of a type hint, and the conversion from its JSON value (None: as it is)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _PRIMITIVES:
        return {"type": _PRIMITIVES[hint]}, None
    if hint is type(None) or hint is None:
        return {"type": "null"}, None
    if hint is Any:
        return {}, None
    if origin is typing.Annotated:
        schema, conv = _schema(args[0])
        notes = [a for a in args[1:] if isinstance(a, str)]
        return ({**schema, "description": " ".join(notes)} if notes else schema), conv
    if origin is typing.Literal:
        if not all(_is_json(a) for a in args):
            raise ConfigError("Literal values must be JSON values")
        return {"enum": list(args)}, None
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return {"enum": [m.value for m in hint]}, hint
    if origin in (typing.Union, types.UnionType):
        parts = [_schema(a) for a in args]
        convs = [c for _, c in parts if c is not None]
        if len(convs) > 1:
            raise ConfigError("a union may hold at most one Enum or tuple type")
        return {"anyOf": [s for s, _ in parts]}, (convs[0] if convs else None)
    if origin in (list, Sequence, set, frozenset) or hint in (list, set):
        items = _schema(args[0])[0] if args else {}
        schema = {"type": "array", "items": items}
        return (schema, set) if origin in (set, frozenset) or hint is set else (schema, None)
    if origin is tuple or hint is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": _schema(args[0])[0]}, tuple
        if args:
            n = len(args)
            prefix = [_schema(a)[0] for a in args]
            return {"type": "array", "prefixItems": prefix, "minItems": n, "maxItems": n}, tuple
        return {"type": "array"}, tuple
    if origin in (dict, Mapping) or hint is dict:
        if args and args[0] is not str:
            raise ConfigError("dict keys must be str (JSON object keys are strings)")
        values = _schema(args[1])[0] if args else {}
        return {"type": "object", "additionalProperties": values}, None
    raise ConfigError(
        f"type {hint!r} has no JSON Schema form here (use str, int, float, bool, list, dict, Literal, Enum)"
    )


_ARGS_HEADER = re.compile(r"^(Args|Arguments|Parameters):\s*$")
_GOOGLE_ARG = re.compile(r"^\s+(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_SPHINX_ARG = re.compile(r"^:param\s+(?:[^:]*\s)?(\w+):\s*(.*)$")


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """The first paragraph of a docstring and its argument descriptions (Google ``Args:`` or Sphinx
    ``:param x:``; a description's continuation lines are joined)."""
    lines = doc.splitlines()
    summary = []
    for line in lines:
        if not line.strip() or _ARGS_HEADER.match(line) or line.startswith(":"):
            break
        summary.append(line.strip())
    described: dict[str, str] = {}
    current: str | None = None
    in_args = False
    for line in lines:
        if _ARGS_HEADER.match(line):
            in_args, current = True, None
            continue
        if m := _SPHINX_ARG.match(line.strip()):
            current = m.group(1)
            described[current] = m.group(2).strip()
            continue
        if in_args:
            if line and not line[0].isspace():  # the next section
                in_args, current = False, None
                continue
            if (
                (m := _GOOGLE_ARG.match(line))
                and line.startswith(("    ", "\t"))
                and not line.startswith("        ")
            ):
                current = m.group(1).lstrip("*")
                described[current] = m.group(2).strip()
                continue
        if current is not None and line.strip() and line[:1].isspace():
            described[current] = f"{described[current]} {line.strip()}".strip()
        elif not line.strip():
            current = None
    return " ".join(summary), described


def function_spec(tool: Tool | Mapping[str, Any] | Callable[..., Any]) -> dict[str, Any]:
    """``{"name", "description", "parameters"}`` of a ``Tool``, an OpenAI tool dict or a typed function."""
    if isinstance(tool, Tool):
        return tool.spec()["function"]
    if not isinstance(tool, Mapping):
        return Tool.from_function(tool).spec()["function"]
    function = tool.get("function")
    if tool.get("type") != "function" or not isinstance(function, Mapping) or "name" not in function:
        raise ConfigError('a tool must be a Tool or {"type": "function", "function": {"name": ...}}')
    params = function.get("parameters", {"type": "object", "properties": {}})
    return {"name": function["name"], "description": function.get("description", ""), "parameters": params}


def calls_schema(
    tools: Sequence[Tool | Mapping[str, Any] | Callable[..., Any]], parallel: bool = True
) -> dict[str, Any]:
    """The JSON Schema of lamina's call object over ``tools``: ``{"tool_calls": [...]}`` with one or more
    calls (exactly one unless ``parallel``), each ``{"name": <a tool's name>, "arguments": <valid for
    it>}``. Decoding under it (``GenerationConfig.json_schema``) makes every call parse and validate."""
    one = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in map(function_spec, tools)
    ]
    if not one:
        raise ConfigError("calls_schema needs at least one tool")
    items = one[0] if len(one) == 1 else {"anyOf": one}
    calls: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
    if not parallel:
        calls["maxItems"] = 1
    return {
        "type": "object",
        "properties": {"tool_calls": calls},
        "required": ["tool_calls"],
        "additionalProperties": False,
    }


def tool_choice_controls(
    tools: Sequence[Tool | Mapping[str, Any] | Callable[..., Any]],
    tool_choice: str | Mapping[str, Any] = "auto",
    parallel: bool = True,
) -> dict[str, Any]:
    """``GenerationConfig`` fields for OpenAI's ``tool_choice`` over ``tools``: ``"none"`` nothing (plain
    text); ``"required"`` a ``json_schema`` of calls; a named function (``{"type": "function", "function":
    {"name": ...}}`` or just its name) one call of it; ``"auto"`` a Lark ``grammar``: calls, or text that
    does not start with ``{`` or white space. Raises ``ConfigError`` for an unknown choice or name."""
    functions = [function_spec(t) for t in tools]
    if not functions or tool_choice == "none":
        return {}
    if isinstance(tool_choice, Mapping) or tool_choice not in ("auto", "required"):
        name = (
            (tool_choice.get("function") or {}).get("name")
            if isinstance(tool_choice, Mapping)
            else tool_choice
        )
        chosen = [f for f in functions if f["name"] == name]
        if not chosen:
            names = ", ".join(f["name"] for f in functions)
            raise ConfigError(
                f'tool_choice {tool_choice!r} is not "none", "auto", "required" or a tool ({names})'
            )
        return {"json_schema": calls_schema([{"type": "function", "function": chosen[0]}], parallel=False)}
    specs = [{"type": "function", "function": f} for f in functions]
    if tool_choice == "required":
        return {"json_schema": calls_schema(specs, parallel)}
    schema = json.dumps(calls_schema(specs, parallel))
    return {"grammar": f"start: TEXT | %json{schema}\nTEXT: /[^{{\\s](.|\\n)*/\n"}


def tools_system_prompt(tools: Sequence[Tool | Mapping[str, Any] | Callable[..., Any]]) -> str:
    """The system-prompt text that shows ``tools`` to a model whose chat template does not render them
    (the same format ``lamina serve`` uses)."""
    lines = [json.dumps(function_spec(t), ensure_ascii=False) for t in tools]
    return (
        "You can call these tools (one JSON object per line: name, description, JSON Schema of the "
        "arguments):\n" + "\n".join(lines) + "\nTo call tools, answer with only a JSON object: "
        '{"tool_calls": [{"name": <tool name>, "arguments": {<arguments>}}]}. Otherwise answer in text.'
    )


def call_list(text: str) -> list[Any] | None:
    """The ``tool_calls`` list of a model's output in lamina's call form, entries as written; None when the
    output is a text answer (it does not start with ``{``, or is not a ``{"tool_calls": [...]}`` object).
    Never evaluates the text: JSON only. (``parse_calls`` here and ``lamina serve`` read calls with it.)"""
    if not text.lstrip().startswith("{"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    calls = value.get("tool_calls") if isinstance(value, dict) else None
    return calls if isinstance(calls, list) else None


def parse_calls(text: str) -> list[ToolCall] | None:
    """The calls in a model's output in lamina's call form; None when the output is a text answer (see
    :func:`call_list`). A call whose ``arguments`` are not an object keeps them as written (the agent
    reports it)."""
    calls = call_list(text)
    if calls is None:
        return None
    out = []
    for c in calls:
        if isinstance(c, dict) and isinstance(c.get("name"), str):
            out.append(ToolCall(c["name"], c.get("arguments", {})))
    return out
