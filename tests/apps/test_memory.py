"""Conversation memory (lamina/apps/memory.py): token-budgeted windows and a running summary."""

from __future__ import annotations

import pytest

from lamina.apps import SummaryMemory, WindowMemory, token_counter
from lamina.errors import ConfigError


def words(text: str) -> int:
    return len(text.split())


def test_window_keeps_the_newest_whole_turns_within_budget() -> None:
    m = WindowMemory(max_tokens=9, count=words, system="Be kind.")
    m.add_turn("one two three", "four five")
    m.add_turn("six seven", "eight nine ten")
    kept = m.messages()
    assert kept[0] == {"role": "system", "content": "Be kind."}
    assert [x["content"] for x in kept[1:]] == ["six seven", "eight nine ten"]  # 2 + 2 + 3 <= 9
    assert m.tokens(kept) <= 9
    m.max_tokens = 6  # "six seven" no longer fits: the window does not start with a reply
    assert m.messages() == [{"role": "system", "content": "Be kind."}]
    assert len(m.history) == 4
    m.clear()
    assert m.messages() == [{"role": "system", "content": "Be kind."}]
    with pytest.raises(ConfigError, match="max_tokens"):
        WindowMemory(0, words)


def test_summary_folds_the_oldest_turns_with_one_call() -> None:
    prompts: list[str] = []

    def summarize(prompt: str) -> str:
        prompts.append(prompt)
        return f"summary {len(prompts)}"  # 2 words; its system message has 8

    m = SummaryMemory(summarize, max_tokens=20, count=words)
    m.add_turn("my name is Ada", "hello Ada")
    m.add_turn("I like tea very much", "noted tea")
    m.add_turn("what is my name", "Ada")
    assert not prompts and m.summary == "" and len(m.messages()) == 6  # 18 words fit
    m.add_turn("and my drink", "tea of course")  # 21 > 20: one fold, until the rest fits 10
    assert len(prompts) == 1 and "Summary so far:\n(none)" in prompts[0]
    assert "user: my name is Ada\nassistant: hello Ada\nuser: I like tea very much" in prompts[0]
    assert "user: what is my name\nassistant: Ada\n\nNew summary:" in prompts[0] and m.folded == 6
    sent = m.messages()
    assert sent[0] == {"role": "system", "content": "Summary of the conversation so far: summary 1"}
    assert [x["content"] for x in sent[1:]] == ["and my drink", "tea of course"]
    assert m.tokens(sent) == 14
    m.add_turn("bye now", "bye")  # 17: no fold
    m.add_turn("one more question here", "fine")  # 22 > 20: the summary so far goes into the next fold
    assert len(prompts) == 2 and "Summary so far:\nsummary 1" in prompts[1]
    assert m.tokens(m.messages()) <= 20 and m.messages()[-1]["content"] == "fine"
    m.clear()
    assert m.messages() == [] and m.summary == ""


def test_token_counter_counts_tokenizer_tokens() -> None:
    from tiny_chat import tiny_tokenizer

    assert token_counter(tiny_tokenizer())("the cat sat") == 3
