"""An agent: a model calling Python tools in a loop until it answers.

    from lamina.apps import Agent, LaminaChat, Tool

    agent = Agent(LaminaChat("smollm2", temperature=0), [Tool.from_function(add)], max_steps=4)
    result = agent.run("What is 2 + 3?", stream=print)
    result.answer, result.finish_reason   # "5", "answer"
    for step in result.steps: ...        # each reply and the observations its calls produced

Function calling (a ``ChatModel``, e.g. ``LaminaChat``): each step the model either answers in text (the
loop ends) or calls tools; every call's result goes back as a ``role: "tool"`` message. The loop never
raises on a bad step: an unknown tool, arguments that do not validate, a tool that raises and a result
that is not text or JSON each come back to the model as an observation saying so, and the loop goes on.
After ``max_steps`` replies with calls the model is asked once more with ``tool_choice="none"``, so every
run ends with an answer (``finish_reason`` "max_steps"). Model text is parsed as JSON, never evaluated.

ReAct fallback (Yao et al. 2022, "ReAct: Synergizing Reasoning and Acting in Language Models"): a model
without tool support, any ``Callable[[str], str]``, is prompted to write ``Thought:`` / ``Action:`` /
``Action Input:`` lines or a ``Final Answer:``, and the tool results are appended as ``Observation:``
lines (LangChain's zero-shot ReAct format). The same limits and observations apply.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lamina.apps.models import ChatModel, LaminaChat, Reply
from lamina.apps.tools import Tool, ToolCall
from lamina.errors import ConfigError

__all__ = ["Agent", "AgentResult", "AgentStep", "Observation"]


@dataclass
class Observation:
    """What one call gave: ``content`` is what the model sees; ``ok`` is False for an unknown tool,
    invalid arguments, a tool that raised and a result that is not text or JSON (``content`` then says
    which); ``value`` is the tool's return value when it ran."""

    call: ToolCall
    content: str
    ok: bool
    value: Any = None


@dataclass
class AgentStep:
    """One model reply and the observations of its calls (none for the final answer)."""

    reply: Reply
    observations: list[Observation] = field(default_factory=list)


@dataclass
class AgentResult:
    """A run: the ``answer``, every step in order, ``finish_reason`` ("answer": the model answered;
    "max_steps": it was asked for its answer after the step limit) and the conversation's ``messages``
    (function calling; the ReAct transcript as one user message otherwise)."""

    answer: str
    steps: list[AgentStep]
    finish_reason: str
    messages: list[dict[str, Any]]

    @property
    def observations(self) -> list[Observation]:
        """Every observation of the run, in order."""
        return [o for s in self.steps for o in s.observations]


_CUT_CALL = (
    "error: your tool call was cut at the token limit before it ended; call the tool again with shorter "
    "arguments"
)


class Agent:
    """A tool-calling loop over ``model`` (a ``ChatModel``; a ``Callable[[str], str]`` runs ReAct).

    ``tools``: ``Tool`` objects or plain typed functions (``Tool.from_function``). ``system``: the system
    message. ``max_steps``: replies with calls before the model must answer (>= 1). ``tool_choice``:
    "auto" (the model decides) or "required" (every step calls a tool until the limit: deterministic
    loops for tests). ``max_observation_chars``: longer tool results are cut, with a note. ``react``:
    use the ReAct text format even with a ``ChatModel`` (its replies then come without tools).
    """

    def __init__(
        self,
        model: ChatModel | Callable[[str], str],
        tools: Sequence[Tool | Callable[..., Any]],
        system: str | None = None,
        max_steps: int = 6,
        tool_choice: str = "auto",
        parallel_tool_calls: bool = True,
        max_observation_chars: int = 4000,
        react: bool | None = None,
    ) -> None:
        self.model = model
        self.tools = {t.name: t for t in (t if isinstance(t, Tool) else Tool.from_function(t) for t in tools)}
        if len(self.tools) != len(tools):
            raise ConfigError("two tools have the same name")
        if max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {max_steps}")
        if tool_choice not in ("auto", "required"):
            raise ConfigError(f'tool_choice must be "auto" or "required", got {tool_choice!r}')
        self.system, self.max_steps, self.tool_choice = system, max_steps, tool_choice
        self.parallel_tool_calls = parallel_tool_calls
        self.max_observation_chars = max_observation_chars
        self.react = not hasattr(model, "chat") if react is None else react
        try:  # checked now: an observation saying so would reach only the model, never the user
            import jsonschema
        except ImportError:
            raise ConfigError(
                "an Agent validates tool arguments with jsonschema; pip install 'lamina[apps]'"
            ) from None
        for tool in self.tools.values():
            try:
                jsonschema.Draft202012Validator.check_schema(tool.parameters)
            except jsonschema.SchemaError as e:
                raise ConfigError(
                    f"tool {tool.name!r} has an invalid parameters schema: {e.message}"
                ) from None

    def run(
        self,
        task: str,
        history: Sequence[Mapping[str, Any]] = (),
        stream: Callable[[str], None] | None = None,
    ) -> AgentResult:
        """Work on ``task`` (a user message after ``history``, e.g. a memory's ``messages()``) until the
        model answers; ``stream`` receives the final answer's text as it is decoded. Raises only what the
        model itself raises (e.g. ``ConfigError`` for a conversation over its context window)."""
        if self.react:
            return self._react(task, history, stream)
        chat: Any = self.model
        messages: list[dict[str, Any]] = [{"role": "system", "content": self.system}] if self.system else []
        messages += [dict(m) for m in history] + [{"role": "user", "content": task}]
        tools = list(self.tools.values())
        steps: list[AgentStep] = []
        for _ in range(self.max_steps):
            reply = chat.chat(messages, tools, self.tool_choice, self.parallel_tool_calls, stream)
            messages.append(reply.message())
            if not reply.tool_calls and self.tool_choice == "required" and reply.finish_reason == "length":
                steps.append(AgentStep(reply))  # a call cut by the token limit is no answer: say so, go on
                messages.append({"role": "user", "content": _CUT_CALL})
                continue
            if not reply.tool_calls:
                steps.append(AgentStep(reply))
                return AgentResult(reply.content or "", steps, "answer", messages)
            observations = [self.observe(c) for c in reply.tool_calls]
            steps.append(AgentStep(reply, observations))
            for o in observations:
                messages.append(
                    {"role": "tool", "tool_call_id": o.call.id, "name": o.call.name, "content": o.content}
                )
        reply = chat.chat(messages, tools, "none", self.parallel_tool_calls, stream)
        messages.append(reply.message())
        steps.append(AgentStep(reply))
        return AgentResult(reply.content or "", steps, "max_steps", messages)

    def observe(self, call: ToolCall) -> Observation:
        """Run one call and say what happened, never raising (except ``KeyboardInterrupt`` /
        ``SystemExit``): the result as text (JSON for non-strings), or an error observation."""
        tool = self.tools.get(call.name)
        if tool is None:
            names = ", ".join(self.tools)
            return Observation(call, f"error: there is no tool {call.name!r}; the tools are: {names}", False)
        try:
            tool.validate(call.arguments)
        except ConfigError as e:
            return Observation(
                call, f"error: {call.name} was called with {e}; call it again with valid arguments", False
            )
        try:
            value = tool(call.arguments)
        except Exception as e:  # the model sees the tool's failure and may try otherwise
            return Observation(call, f"error: {call.name} raised {type(e).__name__}: {e}", False)
        if isinstance(value, str):
            text = value
        else:
            try:
                text = json.dumps(value, ensure_ascii=False)
            except (TypeError, ValueError):
                kind = type(value).__name__
                return Observation(
                    call,
                    f"error: {call.name} returned a {kind}, which is neither text nor JSON",
                    False,
                    value,
                )
        if len(text) > self.max_observation_chars:
            cut = self.max_observation_chars
            text = text[:cut] + f" [cut at {cut} of {len(text)} characters]"
        return Observation(call, text, True, value)

    # ------------------------------------------------------------------ ReAct text fallback

    def react_prompt(self, task: str, history: Sequence[Mapping[str, Any]] = ()) -> str:
        """The ReAct prompt: the tools, the format, earlier turns and the question."""
        lines = [self.system, ""] if self.system else []
        lines.append("Answer the question as well as you can. You can use these tools:")
        for t in self.tools.values():
            lines.append(f"- {t.name}: {t.description} Arguments (JSON Schema): {json.dumps(t.parameters)}")
        lines += [
            "",
            "Use this format:",
            "Thought: what to do next",
            "Action: the tool to use, one of " + ", ".join(self.tools),
            "Action Input: the tool's arguments as a JSON object",
            "Observation: the tool's result (written for you)",
            "... (Thought, Action, Action Input and Observation can repeat)",
            "Thought: I know the answer",
            "Final Answer: the answer to the question",
            "",
        ]
        lines += [f"{m['role']}: {m.get('content') or ''}" for m in history]
        lines += [f"Question: {task}", "Thought:"]
        return "\n".join(lines)

    def _react(
        self, task: str, history: Sequence[Mapping[str, Any]], stream: Callable[[str], None] | None
    ) -> AgentResult:
        model: Any = self.model
        stop = (
            {"stop": ["\nObservation:"]} if isinstance(model, LaminaChat) else {}
        )  # what is not its to write

        def complete(prompt: str) -> str:
            if not hasattr(model, "chat"):
                return str(model(prompt))
            return model.chat([{"role": "user", "content": prompt}], **stop).content or ""

        transcript = self.react_prompt(task, history)
        steps: list[AgentStep] = []
        for _ in range(self.max_steps):
            text = complete(transcript)
            text = text.split("\nObservation:")[0]  # what the model wrote past its action is not its to write
            answer = _FINAL.search(text)
            if answer:
                return self._react_end(answer.group(1).strip(), text, transcript, steps, "answer", stream)
            call = _react_call(text)
            observation = self.observe(call) if call.name else Observation(call, _REACT_FORMAT_ERROR, False)
            steps.append(AgentStep(Reply(text, [call], "tool_calls"), [observation]))
            transcript += f" {text.strip()}\nObservation: {observation.content}\nThought:"
        text = complete(transcript + " I must answer now.\nFinal Answer:")
        return self._react_end(text.strip(), text, transcript, steps, "max_steps", stream)

    def _react_end(
        self,
        answer: str,
        text: str,
        transcript: str,
        steps: list[AgentStep],
        reason: str,
        stream: Callable[[str], None] | None,
    ) -> AgentResult:
        steps.append(AgentStep(Reply(text, [], "stop")))
        if stream is not None and answer:
            stream(answer)
        messages = [{"role": "user", "content": transcript}, {"role": "assistant", "content": text}]
        return AgentResult(answer, steps, reason, messages)


_FINAL = re.compile(r"Final Answer:\s*(.*)", re.S)
_ACTION = re.compile(r"Action:\s*([^\n]*)\s*\n\s*Action Input:\s*(.*)", re.S)
_REACT_FORMAT_ERROR = (
    "error: write 'Action: <tool>' and 'Action Input: <JSON object>' lines, or 'Final Answer: <answer>'"
)


def _react_call(text: str) -> ToolCall:
    """The call a ReAct step wrote (name "" when it wrote none); arguments stay text when not JSON."""
    m = _ACTION.search(text)
    if m is None:
        return ToolCall("", text.strip())
    name, raw = m.group(1).strip().strip("`'\""), m.group(2).strip()
    try:
        arguments = json.loads(raw) if raw else {}
    except ValueError:
        try:  # a JSON object followed by more text
            arguments, _ = json.JSONDecoder().raw_decode(raw)
        except ValueError:
            arguments = raw
    return ToolCall(name, arguments)
