"""Chat models for the apps: a ``Reply`` (text or tool calls) from messages and tools.

``ChatModel`` is what an ``Agent`` talks to: anything with ``chat(messages, tools, tool_choice, ...)``
returning a ``Reply``. ``LaminaChat`` is lamina's own, over a loaded model and the engine:

    from lamina.apps import LaminaChat
    llm = LaminaChat("smollm2", temperature=0, max_new_tokens=128)
    llm("Name a colour.")                                # text in, text out (templates, chains, memory)
    reply = llm.chat(messages, tools=[add], tool_choice="required")
    reply.tool_calls                                     # [ToolCall(name="add", arguments={"a": 2, "b": 3})]

Tools reach the model as ``lamina serve`` shows them: through the chat template when it renders ``tools``,
otherwise a system message (``tools_system_prompt``). The output is decoded under the constraint of
``tool_choice_controls``, so a call always parses and its arguments validate against the tool's schema.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from lamina.apps.tools import (
    Tool,
    ToolCall,
    function_spec,
    parse_calls,
    tool_choice_controls,
    tools_system_prompt,
)
from lamina.errors import ConfigError

__all__ = ["ChatModel", "LaminaChat", "Reply", "render_messages"]


@dataclass
class Reply:
    """A model's answer: ``content`` (text; None when it called tools) or ``tool_calls``, and why it
    ended (``finish_reason``: "stop", "length" or "tool_calls")."""

    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"

    def message(self) -> dict[str, Any]:
        """The reply as an assistant message in OpenAI's form (for the next turn's ``messages``)."""
        out: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [c.openai() for c in self.tool_calls]
        return out


class ChatModel(Protocol):
    """What an agent talks to (``LaminaChat``; a scripted stand-in in tests)."""

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Tool | Mapping[str, Any] | Callable[..., Any]] | None = None,
        tool_choice: str | Mapping[str, Any] = "auto",
        parallel_tool_calls: bool = True,
        stream: Callable[[str], None] | None = None,
    ) -> Reply:
        """The model's reply to ``messages`` (OpenAI's roles, ``tool_calls`` and ``role: "tool"`` results
        included), given ``tools`` and ``tool_choice``; ``stream`` receives a text answer's deltas."""
        ...


def _calls_text(tool_calls: Sequence[Mapping[str, Any]]) -> str:
    """An assistant message's OpenAI ``tool_calls`` in lamina's call form (what the model writes)."""
    calls = []
    for c in tool_calls:
        f = c.get("function") or {}
        args = f.get("arguments", "{}")
        if isinstance(args, str):
            with contextlib.suppress(ValueError):  # arguments that are not JSON stay text
                args = json.loads(args)
        calls.append({"name": f.get("name"), "arguments": args})
    return json.dumps({"tool_calls": calls}, ensure_ascii=False)


def render_messages(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Tool | Mapping[str, Any] | Callable[..., Any]] | None,
    native: bool,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """``messages`` for the chat template and its ``tools`` argument (None: not the template's).

    ``native``: the template renders tools (an assistant's ``tool_calls`` stay as they are). Otherwise the
    tools go into the first system message (or a new one) and an assistant's ``tool_calls`` become its
    content in lamina's call form. ``role: "tool"`` messages go to the template as they are."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls") and not native:
            m["content"] = _calls_text(m.pop("tool_calls"))
        if m.get("content") is None:
            m["content"] = ""
        out.append(m)
    if not tools:
        return out, None
    if native:
        return out, [{"type": "function", "function": function_spec(t)} for t in tools]
    prompt = tools_system_prompt(tools)
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out, None


_CONSTRAINTS = ("json_schema", "regex", "grammar", "choices", "response_format")  # GenerationConfig's


def _constrains(field: str, value: Any) -> bool:
    """Whether a constraint field's value constrains the output."""
    return value not in (None, "", [], "text")


class _TextGate:
    """Stream an ``auto`` reply's deltas only once it is known to be text (its first non-space character
    is not ``{``, which starts a call)."""

    def __init__(self, stream: Callable[[str], None] | None, calls: bool) -> None:
        self.stream, self.held, self.open = stream, "", not calls

    def __call__(self, delta: str) -> None:
        if self.stream is None:
            return
        if self.open:
            self.stream(delta)
            return
        self.held += delta
        head = self.held.lstrip()
        if head and not head.startswith("{"):
            self.open = True
            self.stream(self.held)
        elif head:
            self.stream = None  # a call: nothing to stream


class LaminaChat:
    """A lamina model as a ``ChatModel`` (and a ``Callable[[str], str]``): replies decoded by lamina's
    engine with ``lamina.generate.chat.chat_config``'s controls (the checkpoint's decoding defaults, else
    ``lamina chat``'s), ``controls`` (any ``GenerationConfig`` field) on top.

    Raises ``ConfigError`` at once for a model that cannot chat (an encoder, or no chat template) or
    invalid controls; ``lamina.errors.ConfigError`` from ``chat`` for a conversation over the context
    window. Tool calls need llguidance (``pip install 'lamina[structured]'``).
    """

    def __init__(self, model: Any, config: Any = None, **controls: Any) -> None:
        from lamina.checkpoint.load import load
        from lamina.generate.chat import chat_config
        from lamina.generate.engine import require_generative

        lm = load(model) if isinstance(model, str) else model
        require_generative(lm.model.config, lm.entry.name)
        if lm.tokenizer is None or lm.tokenizer.chat_template is None:
            raise ConfigError(f"model {lm.entry.name!r} has no chat template; LaminaChat needs a chat model")
        self.lm = lm
        self.tokenizer = lm.tokenizer
        self.config = chat_config(lm, config, **controls)

    @property
    def native_tools(self) -> bool:
        """Whether the model's chat template renders ``tools`` itself (reads the ``tools`` variable)."""
        from lamina.tokenizer.chat_template import template_reads

        return template_reads(self.tokenizer.chat_template or "", "tools")

    def __call__(self, prompt: str) -> str:
        """The reply to one user message ``prompt`` (text in, text out)."""
        return self.chat([{"role": "user", "content": prompt}]).content or ""

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Tool | Mapping[str, Any] | Callable[..., Any]] | None = None,
        tool_choice: str | Mapping[str, Any] = "auto",
        parallel_tool_calls: bool = True,
        stream: Callable[[str], None] | None = None,
        **controls: Any,
    ) -> Reply:
        """The reply to ``messages``; with ``tools`` (``Tool`` objects or OpenAI tool dicts) it may be tool
        calls as ``tool_choice`` allows (``tool_choice_controls``). ``stream`` receives a text answer's
        deltas as they are decoded (nothing for calls). ``controls`` override this model's controls for
        the one reply. Raises ``ConfigError`` for a conversation the model cannot take or a failed step."""
        from lamina.generate.engine import Engine
        from lamina.generate.text import generation_config

        tools = list(tools or [])
        calls = bool(tools) and tool_choice != "none"
        msgs, template_tools = render_messages(messages, tools if calls else None, self.native_tools)
        tok = self.tokenizer
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, tools=template_tools)
        extra = tool_choice_controls(tools, tool_choice, parallel_tool_calls) if calls else {}
        if extra and (
            given := [k for k in _CONSTRAINTS if _constrains(k, controls.get(k, getattr(self.config, k)))]
        ):
            raise ConfigError(f"tool calls are decoded under their own constraint; drop {', '.join(given)}")
        cfg = generation_config(self.lm, self.config, **{**controls, **extra, "n": 1})
        engine = Engine(self.lm.model, tok, self.lm.generation.eos_token_ids, max_batch_size=1)
        (seq,) = engine.submit(ids, cfg)
        gate = _TextGate(stream, calls)
        while engine.has_work():
            for d in engine.step():
                if d.text:
                    gate(d.text)
        if seq.finish_reason == "error":
            raise ConfigError(f"generation stopped at token {len(seq.tokens)}: {seq.error}")
        text = seq.text or ""
        found = parse_calls(text) if calls else None
        if found:
            return Reply(None, found, "tool_calls")
        return Reply(text, [], seq.finish_reason or "stop")
