"""Chains: steps run in order, each reading named values and adding one.

    from lamina.apps import Chain, LaminaChat, PromptTemplate, Step

    llm = LaminaChat("smollm2", temperature=0)
    chain = Chain([
        Step("outline", prompt=PromptTemplate("Outline a talk on {topic} in 3 points."), llm=llm),
        Step("title", prompt=PromptTemplate("A title for this talk:\\n{outline}"), llm=llm),
        Step("words", fn=lambda title: len(title.split())),
    ])
    chain.inputs                   # ("topic",)
    values = chain.run(topic="tides")   # {"topic": ..., "outline": ..., "title": ..., "words": ...}

A step is a prompt sent to a model (``prompt`` + ``llm``, any ``Callable[[str], str]``), or a function
whose parameter names are the values it reads. What a step reads must be a chain input or an earlier
step's output: checked when the chain is built, so a misspelt name fails before any model runs
(LangChain's ``SequentialChain`` checks the same).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lamina.apps.prompts import PromptTemplate
from lamina.errors import ConfigError

__all__ = ["Chain", "Step"]


@dataclass(frozen=True)
class Step:
    """One step: its ``output`` name, and either ``prompt`` (a ``PromptTemplate`` or template text) with
    ``llm`` (text in, text out), or ``fn`` (called with the values named by its parameters; parameters
    with defaults are read when present). Raises ``ConfigError`` for neither or both."""

    output: str
    prompt: PromptTemplate | str | None = None
    llm: Callable[[str], str] | None = None
    fn: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if (self.fn is None) == (self.prompt is None):
            raise ConfigError(f"step {self.output!r}: give fn=, or prompt= with llm=")
        if self.prompt is not None and self.llm is None:
            raise ConfigError(f"step {self.output!r}: prompt= needs llm= (a model: text in, text out)")
        if isinstance(self.prompt, str):
            object.__setattr__(self, "prompt", PromptTemplate(self.prompt))

    @property
    def inputs(self) -> tuple[str, ...]:
        """The values this step must have."""
        if isinstance(self.prompt, PromptTemplate):
            return self.prompt.variables
        params = inspect.signature(self.fn).parameters.values()  # type: ignore[arg-type]
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return tuple(p.name for p in params if p.kind in kinds and p.default is p.empty)

    @property
    def optional(self) -> tuple[str, ...]:
        """The values this step reads when they exist (parameters with defaults)."""
        if self.fn is None:
            return ()
        params = inspect.signature(self.fn).parameters.values()
        return tuple(p.name for p in params if p.default is not p.empty and p.kind != p.VAR_KEYWORD)

    def __call__(self, values: dict[str, Any]) -> Any:
        if isinstance(self.prompt, PromptTemplate):
            assert self.llm is not None
            return self.llm(self.prompt.format(**{n: values[n] for n in self.prompt.variables}))
        assert self.fn is not None
        args = {n: values[n] for n in (*self.inputs, *self.optional) if n in values}
        return self.fn(**args)


class Chain:
    """``steps`` run in order over a dict of values. ``inputs``: the names ``run`` needs (default: every
    name a step reads that no earlier step writes). Raises ``ConfigError`` when a step reads a name that
    is neither an input nor an earlier output, or two steps write the same name."""

    def __init__(self, steps: Sequence[Step], inputs: Sequence[str] | None = None) -> None:
        if not steps:
            raise ConfigError("a chain needs at least one step")
        written: list[str] = []
        needed: list[str] = []
        for s in steps:
            for name in s.inputs:
                if name not in written and name not in needed:
                    if inputs is not None and name not in inputs:
                        raise ConfigError(
                            f"step {s.output!r} reads {name!r}, which is no chain input ({', '.join(inputs)}) "
                            f"and no earlier step's output ({', '.join(written) or 'none'})"
                        )
                    needed.append(name)
            if s.output in written or (inputs is not None and s.output in inputs):
                raise ConfigError(f"two steps (or an input and a step) write {s.output!r}")
            written.append(s.output)
        self.steps = list(steps)
        self.inputs: tuple[str, ...] = tuple(inputs) if inputs is not None else tuple(needed)

    @property
    def outputs(self) -> tuple[str, ...]:
        """The names the steps write, in order."""
        return tuple(s.output for s in self.steps)

    def run(self, **values: Any) -> dict[str, Any]:
        """Every value: the inputs given and each step's output. Raises ``ConfigError`` naming missing
        inputs; what a step raises propagates."""
        missing = [n for n in self.inputs if n not in values]
        if missing:
            raise ConfigError(
                f"chain inputs missing: {', '.join(missing)} (inputs: {', '.join(self.inputs)})"
            )
        out = dict(values)
        for s in self.steps:
            out[s.output] = s(out)
        return out

    def __call__(self, **values: Any) -> Any:
        """The last step's output."""
        return self.run(**values)[self.steps[-1].output]
