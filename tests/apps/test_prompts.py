"""Prompt templates (lamina/apps/prompts.py): slots, partials, chat messages, few-shot selection and budget."""

from __future__ import annotations

import pytest

from lamina.apps import ChatPromptTemplate, FewShotTemplate, PromptTemplate
from lamina.errors import ConfigError


def test_prompt_template_slots_partials_and_errors() -> None:
    t = PromptTemplate("Translate {text} to {language}; {{literal}} {text}")
    assert t.variables == ("text", "language")
    assert t.format(text="cat", language="French") == "Translate cat to French; {literal} cat"
    french = t.partial(language="French")
    assert french.variables == ("text",) and french.format(text="dog").startswith("Translate dog to French")
    with pytest.raises(ConfigError, match="missing language"):
        t.format(text="cat")
    with pytest.raises(ConfigError, match="unknown langauge"):
        t.format(text="cat", language="x", langauge="y")
    for bad in ["{a.b}", "{a[0]}", "{a!r}", "{a:>5}", "{}", "{unclosed"]:
        with pytest.raises(ConfigError):
            PromptTemplate(bad)
    with pytest.raises(ConfigError, match="no slot"):
        t.partial(lang="x")


def test_chat_prompt_template() -> None:
    t = ChatPromptTemplate([("system", "You are {persona}."), ("user", "{question}")])
    assert t.variables == ("persona", "question")
    assert t.format_messages(persona="terse", question="Why?") == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Why?"},
    ]
    with pytest.raises(ConfigError, match="missing question"):
        t.format_messages(persona="terse")


EXAMPLES = [
    {"word": "hot", "antonym": "cold"},
    {"word": "tall building", "antonym": "short building"},
    {"word": "happy", "antonym": "sad"},
]


def test_few_shot_selection_k_and_token_budget() -> None:
    shots = FewShotTemplate(
        examples=EXAMPLES,
        example=PromptTemplate("Word: {word}\nAntonym: {antonym}"),
        suffix=PromptTemplate("Word: {word}\nAntonym:"),
        prefix="Give the antonym.",
        separator="\n",
    )
    assert shots.format(word="big") == (
        "Give the antonym.\nWord: hot\nAntonym: cold\nWord: tall building\nAntonym: short building\n"
        "Word: happy\nAntonym: sad\nWord: big\nAntonym:"
    )
    near = FewShotTemplate(EXAMPLES, shots.example, shots.suffix, k=1, select="overlap")
    assert (
        near.format(word="tall tree")
        == "Word: tall building\nAntonym: short building\n\nWord: tall tree\nAntonym:"
    )
    words = lambda text: len(text.split())  # noqa: E731 - a token count for the test
    budget = FewShotTemplate(EXAMPLES, shots.example, shots.suffix, max_tokens=10, count=words)
    text = budget.format(word="big")
    assert words(text) <= 10 and "hot" in text and "tall" not in text  # the fewest dropped, from the end
    with pytest.raises(ConfigError, match="without examples has 3 tokens"):
        FewShotTemplate(EXAMPLES, shots.example, shots.suffix, max_tokens=2, count=words).format(word="big")
    last = FewShotTemplate(EXAMPLES, shots.example, shots.suffix, k=1, select=lambda ex, values: ex[::-1])
    assert "happy" in last.format(word="x") and "hot" not in last.format(word="x")
    with pytest.raises(ConfigError, match="example 0 lacks antonym"):
        FewShotTemplate([{"word": "x"}], shots.example, shots.suffix)
    with pytest.raises(ConfigError, match="select"):
        FewShotTemplate(EXAMPLES, shots.example, shots.suffix, select="random")
