"""Conversation memory: what of a long conversation goes back to the model, within a token budget.

    from lamina.apps import LaminaChat, SummaryMemory, WindowMemory, token_counter

    llm = LaminaChat("smollm2", temperature=0)
    memory = WindowMemory(max_tokens=512, count=token_counter(llm.lm.tokenizer))
    for question in questions:
        reply = llm.chat([*memory.messages(), {"role": "user", "content": question}]).content
        memory.add_turn(question, reply)

``WindowMemory`` keeps the newest turns that fit the budget (LangChain's ``ConversationTokenBufferMemory``).
``SummaryMemory`` folds the oldest turns into a running summary written by a model, and keeps the newest
turns word for word (LangChain's ``ConversationSummaryBufferMemory``). Token counts are the message texts'
(``count``), without the template's per-message markers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lamina.apps.prompts import PromptTemplate
from lamina.errors import ConfigError

__all__ = ["SummaryMemory", "WindowMemory", "token_counter"]

Message = dict[str, Any]


def token_counter(tokenizer: Any) -> Callable[[str], int]:
    """A text's token count under ``tokenizer`` (a lamina ``Tokenizer``), without special tokens."""
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


class WindowMemory:
    """The newest messages within ``max_tokens`` (by ``count``; also at most ``max_messages`` when given),
    whole turns only: a window never starts with an assistant message (its question dropped).
    ``system``, when given, is always the first message and counts against the budget."""

    def __init__(
        self,
        max_tokens: int,
        count: Callable[[str], int],
        max_messages: int | None = None,
        system: str | None = None,
    ) -> None:
        if max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {max_tokens}")
        self.max_tokens, self.count, self.max_messages, self.system = max_tokens, count, max_messages, system
        self.history: list[Message] = []  # every message added, oldest first

    def add(self, role: str, content: str) -> None:
        """Remember one message."""
        self.history.append({"role": role, "content": content})
        self._added()

    def add_turn(self, user: str, assistant: str) -> None:
        """Remember a user message and the reply."""
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        self._added()

    def _added(self) -> None:
        """What happens after messages are added (nothing: the window is taken when asked)."""

    def clear(self) -> None:
        """Forget the conversation."""
        self.history.clear()

    def tokens(self, messages: list[Message]) -> int:
        """The token count of ``messages``' contents."""
        return sum(self.count(str(m.get("content") or "")) for m in messages)

    def _window(self, messages: list[Message], budget: int) -> list[Message]:
        kept: list[Message] = []
        used = 0
        for m in reversed(messages):
            n = self.count(str(m.get("content") or ""))
            if used + n > budget or (self.max_messages is not None and len(kept) >= self.max_messages):
                break
            kept.insert(0, m)
            used += n
        while kept and kept[0]["role"] == "assistant":
            kept.pop(0)
        return kept

    def _head(self) -> list[Message]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def messages(self) -> list[Message]:
        """The messages to send: ``system``, then the newest that fit."""
        head = self._head()
        return head + self._window(self.history, self.max_tokens - self.tokens(head))


SUMMARY_PROMPT = PromptTemplate(
    "Progressively summarize the conversation, adding to the summary so far.\n\n"
    "Summary so far:\n{summary}\n\nNew lines of the conversation:\n{lines}\n\nNew summary:"
)
"""The prompt that folds turns into the summary (LangChain's progressive summary prompt, shortened)."""


class SummaryMemory(WindowMemory):
    """``WindowMemory`` whose oldest turns are folded into a running summary instead of dropped.

    When the messages outgrow ``max_tokens``, the oldest are folded (``summarize(SUMMARY_PROMPT...)``, one
    model call: any ``Callable[[str], str]``, e.g. a ``LaminaChat``) until the rest fit half the budget, so
    a fold happens every few turns, not every turn. ``messages()`` then starts with a system message
    holding the summary. The summary counts against the budget; one longer than half of it loses its
    oldest words until it fits (never silently over budget).
    """

    def __init__(
        self,
        summarize: Callable[[str], str],
        max_tokens: int,
        count: Callable[[str], int],
        system: str | None = None,
        prompt: PromptTemplate = SUMMARY_PROMPT,
    ) -> None:
        super().__init__(max_tokens, count, None, system)
        if set(prompt.variables) != {"summary", "lines"}:
            raise ConfigError("a summary prompt has the slots {summary} and {lines}")
        self.summarize, self.prompt = summarize, prompt
        self.summary = ""
        self.folded = 0  # messages folded into the summary so far

    def _head(self) -> list[Message]:
        text = "\n\n".join(
            p
            for p in [
                self.system,
                f"Summary of the conversation so far: {self.summary}" if self.summary else "",
            ]
            if p
        )
        return [{"role": "system", "content": text}] if text else []

    def _added(self) -> None:
        """Fold the oldest messages into the summary when over budget (one model call)."""
        if self.tokens(self._head() + self.history) <= self.max_tokens:
            return
        # the newest turn stays word for word when it fits the budget, even if over half of it
        keep = self._window(self.history, self.max_tokens // 2) or self._window(
            self.history[-2:], self.max_tokens
        )
        old = self.history[: len(self.history) - len(keep)]
        if not old:
            return
        lines = "\n".join(f"{m['role']}: {m['content']}" for m in old)
        self.summary = self.summarize(
            self.prompt.format(summary=self.summary or "(none)", lines=lines)
        ).strip()
        self.history = keep
        self.folded += len(old)
        budget = self.max_tokens - self.count(self.system or "")
        while self.summary and self.count(self.summary) > budget // 2:
            self.summary = " ".join(self.summary.split()[1:])  # the oldest words go first

    def clear(self) -> None:
        """Forget the conversation and the summary."""
        super().clear()
        self.summary, self.folded = "", 0
