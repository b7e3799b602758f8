"""The agent loop (lamina/apps/agents.py): its mechanics with a scripted model; then real decoding (a tiny
random model with calls forced by the constraint, and SmolLM2 with a calculator and a lookup table)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest

from lamina.apps import Agent, LaminaChat, Reply, Tool, ToolCall
from lamina.errors import ConfigError


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first number
        b: the second number
    """
    return a + b


def fail(reason: str) -> str:
    """Always raises."""
    raise RuntimeError(reason)


def opaque() -> object:
    """Returns something that is not JSON."""
    return object()


CAPITALS = {"france": "Paris", "japan": "Tokyo", "peru": "Lima"}


def capital(country: str) -> str:
    """The capital city of a country (a lookup table).

    Args:
        country: the country's English name
    """
    return CAPITALS[country.lower()]


def calculator(expression: str) -> float:
    """Evaluate arithmetic: numbers, + - * / and parentheses.

    Args:
        expression: e.g. "2 * (3 + 4)"
    """
    import ast
    import operator

    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}

    def value(node: ast.AST) -> float:  # a walk over the parsed tree: nothing is evaluated as code
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        raise ValueError(f"not arithmetic: {ast.dump(node)[:40]}")

    return value(ast.parse(expression, mode="eval").body)


class Scripted:
    """A ChatModel that plays back replies and records what it was sent."""

    def __init__(self, replies: list[Reply]) -> None:
        self.replies, self.seen = list(replies), []  # type: ignore[var-annotated]

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Any = None,
        tool_choice: Any = "auto",
        parallel_tool_calls: bool = True,
        stream: Callable[[str], None] | None = None,
    ) -> Reply:
        self.seen.append((json.loads(json.dumps(list(messages))), tool_choice))
        reply = self.replies.pop(0)
        if stream is not None and reply.content:
            for word in reply.content.split(" "):
                stream(word + " ")
        return reply


def calls(*pairs: tuple[str, Any]) -> Reply:
    return Reply(None, [ToolCall(name, args) for name, args in pairs], "tool_calls")


def test_every_bad_step_reaches_the_model_and_the_loop_goes_on() -> None:
    model = Scripted(
        [
            calls(("add", {"a": 2, "b": 3}), ("nope", {})),  # parallel: one good, one unknown tool
            calls(
                ("add", {"a": "2"}), ("add", "not json")
            ),  # invalid arguments, arguments that are no object
            calls(
                ("fail", {"reason": "disk full"}), ("opaque", {})
            ),  # a tool that raises, output that is not JSON
            Reply("The sum is 5."),
        ]
    )
    streamed: list[str] = []
    agent = Agent(model, [add, fail, opaque], system="Use tools.", max_steps=5)
    result = agent.run("What is 2 + 3?", stream=streamed.append)
    assert result.answer == "The sum is 5." and result.finish_reason == "answer" and len(result.steps) == 4
    assert "".join(streamed).strip() == "The sum is 5."
    obs = result.observations
    assert [o.ok for o in obs] == [True, False, False, False, False, False]
    assert obs[0].content == "5" and obs[0].value == 5
    assert "no tool 'nope'; the tools are: add, fail, opaque" in obs[1].content
    assert "at a: '2' is not of type 'integer'" in obs[2].content
    assert "must be a JSON object" in obs[3].content
    assert obs[4].content == "error: fail raised RuntimeError: disk full"
    assert "returned a object, which is neither text nor JSON" in obs[5].content
    # the model saw every observation as a tool message answering its call
    last, choice = model.seen[-1]
    assert choice == "auto" and last[0] == {"role": "system", "content": "Use tools."}
    tool_messages = [m for m in last if m["role"] == "tool"]
    assert [m["content"] for m in tool_messages] == [o.content for o in obs]
    call_ids = [
        c["id"] for m in last if m["role"] == "assistant" and m.get("tool_calls") for c in m["tool_calls"]
    ]
    assert [m["tool_call_id"] for m in tool_messages] == call_ids
    assert result.messages[-1] == {"role": "assistant", "content": "The sum is 5."}


def test_step_limit_asks_for_the_answer_without_tools() -> None:
    model = Scripted([calls(("add", {"a": 1, "b": 1}))] * 2 + [Reply("I stopped at 2.")])
    agent = Agent(
        model, [Tool.from_function(add)], max_steps=2, tool_choice="required", max_observation_chars=3
    )
    result = agent.run(
        "Keep adding.", history=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    )
    assert (
        result.finish_reason == "max_steps" and result.answer == "I stopped at 2." and len(result.steps) == 3
    )
    assert [choice for _, choice in model.seen] == ["required", "required", "none"]
    assert model.seen[0][0][:2] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    long = Agent(Scripted([]), [lambda_free_long], max_observation_chars=5).observe(
        ToolCall("lambda_free_long", {})
    )
    assert long.ok and long.content == "xxxxx [cut at 5 of 50 characters]"
    with pytest.raises(ConfigError, match="max_steps"):
        Agent(model, [add], max_steps=0)
    with pytest.raises(ConfigError, match="same name"):
        Agent(model, [add, add])


def test_a_call_cut_by_the_token_limit_is_no_answer_and_a_bad_schema_is_refused() -> None:
    """Under tool_choice="required" a reply cut at the limit (no parsable call) is a failed step that the
    model hears about, not the final answer; a tool whose schema is invalid is refused when built."""
    model = Scripted([Reply('{"name": "add", "argum', [], "length"), calls(("add", {"a": 1, "b": 2}))])
    model.replies.append(Reply("3"))
    result = Agent(model, [add], max_steps=2, tool_choice="required").run("1 + 2?")
    assert result.answer == "3" and result.finish_reason == "max_steps" and len(result.steps) == 3
    assert "cut at the token limit" in model.seen[1][0][-1]["content"]
    broken = Tool("broken", "d", {"type": "object", "properties": {"x": {"type": 7}}}, add)
    with pytest.raises(ConfigError, match="tool 'broken' has an invalid parameters schema"):
        Agent(model, [broken])


def lambda_free_long() -> str:
    """A long result."""
    return "x" * 50


def test_react_fallback_for_a_text_model() -> None:
    outputs = iter(
        [
            ' I need the capital.\nAction: capital\nAction Input: {"country": "Peru"}\nObservation: (made up)',
            ' Now the sum.\nAction: add\nAction Input: {"a": 1}',
            " Hmm, no action here.",
            " I know it.\nFinal Answer: Lima, and 2.",
        ]
    )
    prompts: list[str] = []

    def text_model(prompt: str) -> str:
        prompts.append(prompt)
        return next(outputs)

    streamed: list[str] = []
    result = Agent(text_model, [capital, add], max_steps=5).run("Capital of Peru?", stream=streamed.append)
    assert (
        result.answer == "Lima, and 2." and result.finish_reason == "answer" and streamed == ["Lima, and 2."]
    )
    obs = result.observations
    assert obs[0].ok and obs[0].content == "Lima"
    assert not obs[1].ok and "'b' is a required property" in obs[1].content
    assert not obs[2].ok and "Final Answer" in obs[2].content
    assert (
        "Observation: Lima\nThought:" in prompts[1] and "(made up)" not in prompts[1]
    )  # the model's own is cut
    assert "- capital: The capital city of a country (a lookup table)." in prompts[0] and prompts[0].endswith(
        "Question: Capital of Peru?\nThought:"
    )
    capped = Agent(lambda p: 'Action: add\nAction Input: {"a": 1, "b": 2}', [add], max_steps=2).run("?")
    assert capped.finish_reason == "max_steps" and [o.content for o in capped.observations] == ["3", "3"]


@pytest.fixture(scope="module")
def tiny_chat(byte_lm: Any) -> LaminaChat:
    return LaminaChat(byte_lm, temperature=0, max_new_tokens=40)


def test_forced_calls_from_a_random_model_run_the_loop(tiny_chat: LaminaChat) -> None:
    pytest.importorskip("llguidance")

    def echo(text: str, times: int) -> str:
        """Repeat a text."""
        return text * max(0, min(times, 3))

    result = Agent(tiny_chat, [echo], max_steps=2, tool_choice="required").run("Echo something.")
    assert result.finish_reason == "max_steps" and len(result.steps) == 3
    call_steps = result.steps[:2]
    assert all(
        s.reply.tool_calls and all(o.ok for o in s.observations) for s in call_steps
    )  # valid every time
    assert result.steps[2].reply.tool_calls == [] and result.answer == result.steps[2].reply.content
    react = Agent(tiny_chat, [echo], max_steps=1, react=True).run("Echo something.")  # random text: no action
    assert react.finish_reason in ("answer", "max_steps") and len(react.steps) <= 2
    assert all(not o.ok for o in react.observations)  # each reported back, never raised


@pytest.mark.slow
def test_smollm2_calls_a_calculator_and_a_lookup_table(lamina_smollm2: Any) -> None:
    """SmolLM2-135M end to end: one step with calls forced, then its answer. Every call validates and every
    result is in the trace; whether the answer is right is reported, not asserted (the model is small)."""
    pytest.importorskip("llguidance")
    llm = LaminaChat(lamina_smollm2, temperature=0, max_new_tokens=40)
    agent = Agent(llm, [calculator, capital], max_steps=1, tool_choice="required")
    result = agent.run("What is the capital of Japan, and what is 12 * 7?")
    assert result.finish_reason == "max_steps" and len(result.steps) == 2
    calls_made = result.steps[0].reply.tool_calls
    assert calls_made and {c.name for c in calls_made} <= {"calculator", "capital"}
    tools = {t.name: t for t in agent.tools.values()}
    for c in calls_made:
        tools[c.name].validate(c.arguments)  # decoded under the schema: always valid
    tool_results = [m["content"] for m in result.messages if m["role"] == "tool"]
    assert tool_results == [o.content for o in result.observations] and len(tool_results) == len(calls_made)
    assert isinstance(result.answer, str) and result.answer
    print("SmolLM2 calls:", [(c.name, c.arguments) for c in calls_made], "answer:", result.answer)
