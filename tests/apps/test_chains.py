"""Chains (lamina/apps/chains.py): named values through steps; wiring checked before anything runs."""

from __future__ import annotations

import pytest

from lamina.apps import Chain, PromptTemplate, Step
from lamina.errors import ConfigError


def test_steps_pass_named_outputs() -> None:
    prompts: list[str] = []

    def llm(prompt: str) -> str:
        prompts.append(prompt)
        return prompt.upper()

    chain = Chain(
        [
            Step("outline", prompt=PromptTemplate("Outline {topic}."), llm=llm),
            Step("title", prompt="Title of {outline} for {audience}", llm=llm),
            Step("words", fn=lambda title, sep=" ": len(title.split(sep))),
        ]
    )
    assert chain.inputs == ("topic", "audience") and chain.outputs == ("outline", "title", "words")
    values = chain.run(topic="tides", audience="kids")
    assert values["outline"] == "OUTLINE TIDES." and values["title"] == "TITLE OF OUTLINE TIDES. FOR KIDS"
    assert values["words"] == 6 and prompts == ["Outline tides.", "Title of OUTLINE TIDES. for kids"]
    assert chain(topic="x", audience="y") == 6
    with pytest.raises(ConfigError, match="missing: audience"):
        chain.run(topic="tides")


def test_wiring_errors_are_found_when_built() -> None:
    echo = str
    with pytest.raises(
        ConfigError, match=r"reads 'outlne'.*no chain input \(topic\).*earlier step's output \(outline\)"
    ):
        Chain(
            [Step("outline", fn=lambda topic: topic), Step("title", prompt="{outlne}", llm=echo)],
            inputs=["topic"],
        )
    with pytest.raises(ConfigError, match="write 'a'"):
        Chain([Step("a", fn=lambda x: x), Step("a", fn=lambda a: a)])
    with pytest.raises(ConfigError, match="give fn="):
        Step("a")
    with pytest.raises(ConfigError, match="needs llm="):
        Step("a", prompt="{x}")
