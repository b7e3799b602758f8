"""Prompt templates: text with named slots, chat message lists, and few-shot prompts with example selection.

    from lamina.apps import FewShotTemplate, PromptTemplate

    ask = PromptTemplate("Translate to {language}: {text}")
    ask.variables                                  # ("language", "text")
    ask.format(language="French", text="cat")      # "Translate to French: cat"
    french = ask.partial(language="French")        # a template over "text" only

    shots = FewShotTemplate(
        examples=[{"word": "hot", "antonym": "cold"}, {"word": "tall", "antonym": "short"}],
        example=PromptTemplate("Word: {word}\\nAntonym: {antonym}"),
        suffix=PromptTemplate("Word: {word}\\nAntonym:"),
        prefix="Give the antonym of every word.",
        k=1, select="overlap",
    )

Slots are Python's ``str.format`` fields (``{name}``; ``{{`` and ``}}`` are literal braces), with names
only: no attribute access, indexing or conversions, so a template never reaches into the values' objects
(LangChain's "f-string" templates, without their format specs).
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lamina.errors import ConfigError

__all__ = ["ChatPromptTemplate", "FewShotTemplate", "PromptTemplate"]

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class PromptTemplate:
    """A text with ``{name}`` slots. ``variables`` are its slot names in order of first use; ``partials``
    are values already given (``partial``). Raises ``ConfigError`` at construction for a malformed
    template (an unmatched brace, ``{}`` without a name, ``{a.b}``, ``{a[0]}``, ``{a!r}``, ``{a:>5}``)."""

    template: str
    partials: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            parsed = list(string.Formatter().parse(self.template))
        except ValueError as e:
            raise ConfigError(
                f"prompt template {self.template[:60]!r}: {e} (write {{{{ and }}}} for braces)"
            ) from None
        for _, name, spec, conversion in parsed:
            if name is None:
                continue
            if not _IDENT.fullmatch(name) or spec or conversion:
                shown = (
                    "{" + name + ("!" + conversion if conversion else "") + (":" + spec if spec else "") + "}"
                )
                raise ConfigError(
                    f"prompt template slot {shown} must be a plain name like {{question}} (write {{{{ for a brace)"
                )

    @property
    def variables(self) -> tuple[str, ...]:
        """The slots still to fill, in order of first use."""
        names = [n for _, n, _, _ in string.Formatter().parse(self.template) if n]
        return tuple(n for n in dict.fromkeys(names) if n not in self.partials)

    def format(self, **values: Any) -> str:
        """The text with every slot filled (``str()`` of each value). Raises ``ConfigError`` naming the
        missing slots, and the unknown names given (a typo would otherwise leave a slot's default)."""
        missing = [n for n in self.variables if n not in values]
        unknown = [n for n in values if n not in self.variables and n not in self.partials]
        if missing or unknown:
            parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
                [f"unknown {', '.join(unknown)}"] if unknown else []
            )
            raise ConfigError(f"prompt template over ({', '.join(self.variables)}): {'; '.join(parts)}")
        return self.template.format(**{**self.partials, **values})

    def partial(self, **values: Any) -> PromptTemplate:
        """This template with some slots filled now (the rest by ``format``)."""
        unknown = [n for n in values if n not in self.variables]
        if unknown:
            raise ConfigError(
                f"prompt template has no slot {', '.join(unknown)} (slots: {', '.join(self.variables)})"
            )
        return PromptTemplate(self.template, {**self.partials, **values})


@dataclass(frozen=True)
class ChatPromptTemplate:
    """Chat messages with slots: ``[("system", "You are {persona}."), ("user", "{question}")]`` ->
    ``format_messages(persona=..., question=...)``, a list of ``{"role", "content"}`` dicts."""

    messages: Sequence[tuple[str, str]]

    @property
    def variables(self) -> tuple[str, ...]:
        """The slots of every message, in order of first use."""
        names = [n for _, text in self.messages for n in PromptTemplate(text).variables]
        return tuple(dict.fromkeys(names))

    def format_messages(self, **values: Any) -> list[dict[str, str]]:
        """The messages with their slots filled. Raises ``ConfigError`` as ``PromptTemplate.format``."""
        unknown = [n for n in values if n not in self.variables]
        if unknown:
            raise ConfigError(f"chat prompt template has no slot {', '.join(unknown)}")
        out = []
        for role, text in self.messages:
            t = PromptTemplate(text)
            out.append(
                {"role": role, "content": t.format(**{k: values[k] for k in t.variables if k in values})}
            )
        return out


Selector = Callable[[Sequence[Mapping[str, Any]], Mapping[str, Any]], Sequence[Mapping[str, Any]]]


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def overlap_order(
    examples: Sequence[Mapping[str, Any]], values: Mapping[str, Any]
) -> list[Mapping[str, Any]]:
    """``examples`` from most to least like ``values``: by the Jaccard overlap of their lower-cased word
    sets (ties keep the given order)."""
    query = _words(" ".join(str(v) for v in values.values()))

    def score(example: Mapping[str, Any]) -> float:
        words = _words(" ".join(str(v) for v in example.values()))
        union = query | words
        return len(query & words) / len(union) if union else 0.0

    return sorted(examples, key=score, reverse=True)


@dataclass(frozen=True)
class FewShotTemplate:
    """``prefix``, then chosen ``examples`` (each written with ``example``), then ``suffix`` filled with
    the values, joined by ``separator``.

    Selection: ``select`` "first" (the given order), "overlap" (most word overlap with the values first:
    ``overlap_order``) or a function ``(examples, values) -> examples in order``; then at most ``k``
    (None: all); then, with ``max_tokens`` and ``count`` (a text's token count, e.g. ``len(tok.encode(t))``),
    the fewest dropped from the end so that the whole prompt fits (the prompt without examples must fit:
    ``ConfigError`` otherwise). Raises ``ConfigError`` at construction when an example lacks a slot of
    ``example`` or ``select`` is unknown.
    """

    examples: Sequence[Mapping[str, Any]]
    example: PromptTemplate
    suffix: PromptTemplate
    prefix: str = ""
    separator: str = "\n\n"
    k: int | None = None
    select: str | Selector = "first"
    max_tokens: int | None = None
    count: Callable[[str], int] | None = None

    def __post_init__(self) -> None:
        for i, ex in enumerate(self.examples):
            missing = [n for n in self.example.variables if n not in ex]
            if missing:
                raise ConfigError(f"few-shot example {i} lacks {', '.join(missing)}")
        if isinstance(self.select, str) and self.select not in ("first", "overlap"):
            raise ConfigError(f'select must be "first", "overlap" or a function, got {self.select!r}')
        if self.max_tokens is not None and self.count is None:
            raise ConfigError("max_tokens needs count= (a function giving a text's token count)")

    @property
    def variables(self) -> tuple[str, ...]:
        """The suffix's slots (what ``format`` takes)."""
        return self.suffix.variables

    def choose(self, **values: Any) -> list[Mapping[str, Any]]:
        """The examples ``format`` shows for ``values``, in order (before the token budget)."""
        if self.select == "first":
            chosen = list(self.examples)
        elif self.select == "overlap":
            chosen = overlap_order(self.examples, values)
        else:
            chosen = list(self.select(self.examples, values))  # type: ignore[operator]
        return chosen if self.k is None else chosen[: self.k]

    def format(self, **values: Any) -> str:
        """The prompt for ``values`` (the suffix's slots). Raises ``ConfigError`` as
        ``PromptTemplate.format``, and when even no example leaves the prompt within ``max_tokens``."""
        tail = self.suffix.format(**values)
        shots = [
            self.example.format(**{n: ex[n] for n in self.example.variables}) for ex in self.choose(**values)
        ]

        def text(n: int) -> str:
            return self.separator.join([p for p in [self.prefix] if p] + shots[:n] + [tail])

        n = len(shots)
        if self.max_tokens is not None and self.count is not None:
            while n >= 0 and self.count(text(n)) > self.max_tokens:
                n -= 1
            if n < 0:
                raise ConfigError(
                    f"the prompt without examples has {self.count(text(0))} tokens, over max_tokens={self.max_tokens}"
                )
        return text(n)
