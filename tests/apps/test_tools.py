"""Tool.from_function (lamina/apps/tools.py): JSON Schema from type hints and docstrings, argument checks,
the call object's schema and tool_choice's constraint fields."""

from __future__ import annotations

import enum
import json
from typing import Annotated, Any, Literal

import pytest

from lamina.apps import Tool, calls_schema, parse_calls, tool_choice_controls
from lamina.errors import ConfigError

jsonschema = pytest.importorskip("jsonschema")


class Unit(enum.Enum):
    C = "celsius"
    F = "fahrenheit"


def forecast(
    city: str,
    days: int,
    unit: Unit = Unit.C,
    hours: list[int] | None = None,
    mode: Literal["brief", "full"] = "brief",
    where: tuple[float, float] = (0.0, 0.0),
    tags: dict[str, str] | None = None,
    note: Annotated[str, "free text for the forecaster"] = "",
) -> dict[str, Any]:
    """Forecast the weather.

    More detail that is not the summary.

    Args:
        city: the city's name,
            in English
        days (int): how many days ahead
        unit: the temperature unit
    """
    return {"city": city, "days": days, "unit": unit, "where": where}


def test_schema_from_hints_and_google_docstring() -> None:
    tool = Tool.from_function(forecast)
    assert tool.name == "forecast" and tool.description == "Forecast the weather."
    p = tool.parameters
    assert p["required"] == ["city", "days"] and p["additionalProperties"] is False
    props = p["properties"]
    assert props["city"] == {"type": "string", "description": "the city's name, in English"}
    assert props["days"] == {"type": "integer", "description": "how many days ahead"}
    assert props["unit"] == {
        "enum": ["celsius", "fahrenheit"],
        "description": "the temperature unit",
        "default": "celsius",
    }
    assert props["hours"]["anyOf"] == [{"type": "array", "items": {"type": "integer"}}, {"type": "null"}]
    assert props["mode"] == {"enum": ["brief", "full"], "default": "brief"}
    assert props["where"]["prefixItems"] == [{"type": "number"}, {"type": "number"}]
    assert props["tags"]["anyOf"][0] == {"type": "object", "additionalProperties": {"type": "string"}}
    assert props["note"]["description"] == "free text for the forecaster"
    jsonschema.Draft202012Validator.check_schema(p)
    out = tool({"city": "Oslo", "days": 2, "unit": "fahrenheit", "where": [59.9, 10.7]})
    assert out["unit"] is Unit.F and out["where"] == (59.9, 10.7)  # converted from their JSON form


def test_sphinx_docstring_and_overrides() -> None:
    def scale(x: float, by: float = 2.0) -> float:
        """Scale a number.

        :param x: the number
        :param float by: the factor
        """
        return x * by

    tool = Tool.from_function(scale, name="times", description="Multiply.")
    assert (tool.name, tool.description) == ("times", "Multiply.")
    assert tool.parameters["properties"]["by"] == {
        "type": "number",
        "description": "the factor",
        "default": 2.0,
    }
    assert tool.spec() == {
        "type": "function",
        "function": {"name": "times", "description": "Multiply.", "parameters": tool.parameters},
    }


@pytest.mark.parametrize(
    "arguments, problem",
    [
        ({"city": "Oslo"}, "'days' is a required property"),
        ({"city": "Oslo", "days": "2"}, "invalid arguments: at days: '2' is not of type 'integer'"),
        ({"city": "Oslo", "days": 1, "colour": "red"}, "Additional properties"),
        ({"city": "Oslo", "days": 1, "unit": "kelvin"}, "at unit"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_invalid_arguments_are_named(arguments: Any, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        Tool.from_function(forecast)(arguments)


def test_functions_without_a_schema_form_are_refused() -> None:
    def untyped(x):  # type: ignore[no-untyped-def]
        return x

    def star(*args: int) -> int:
        return 0

    def odd(x: complex) -> None:
        return None

    with pytest.raises(ConfigError, match="'x' needs a type hint"):
        Tool.from_function(untyped)
    with pytest.raises(ConfigError, match=r"\*args"):
        Tool.from_function(star)
    with pytest.raises(ConfigError, match=r"parameter 'x'.*no JSON Schema form"):
        Tool.from_function(odd)
    with pytest.raises(ConfigError, match="tool name"):
        Tool.from_function(forecast, name="has space")


def test_call_object_schema_choice_controls_and_parsing() -> None:
    tools = [Tool.from_function(forecast), {"type": "function", "function": {"name": "now"}}]
    schema = calls_schema(tools)
    good = {
        "tool_calls": [
            {"name": "now", "arguments": {}},
            {"name": "forecast", "arguments": {"city": "x", "days": 1}},
        ]
    }
    jsonschema.validate(good, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"tool_calls": [{"name": "forecast", "arguments": {"city": "x"}}]}, schema)
    with pytest.raises(jsonschema.ValidationError):  # one call only
        jsonschema.validate(good, calls_schema(tools, parallel=False))
    assert "grammar" in tool_choice_controls(tools, "auto")
    assert tool_choice_controls(tools, "none") == {}
    named = tool_choice_controls(tools, "now")["json_schema"]
    assert named["properties"]["tool_calls"]["maxItems"] == 1
    with pytest.raises(ConfigError, match="forecast, now"):
        tool_choice_controls(tools, {"type": "function", "function": {"name": "later"}})
    calls = parse_calls(json.dumps(good))
    assert (
        calls is not None
        and [c.name for c in calls] == ["now", "forecast"]
        and calls[0].id.startswith("call_")
    )
    assert (
        parse_calls("Sunny.") is None and parse_calls("{not json") is None and parse_calls('{"a": 1}') is None
    )
    assert parse_calls('{"tool_calls": [{"name": "now", "arguments": "oops"}]}')[0].arguments == "oops"  # type: ignore[index]
