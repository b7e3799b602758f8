"""Response synthesis: retrieved passages + a question -> an answer with numbered citations.

The passages are numbered [1]..[n] in rank order and shown to a chat model (through ``lamina.generate``,
the public text API) with the instruction to cite them; the answer's ``[n]`` markers are then read back
and each is mapped to the passage that carried that number in a prompt: its ``doc_id``, character span
(``start``, ``end`` in the document's text) and ``page`` (PDFs). A marker with a number no prompt showed
(a model inventing [7] when it saw five passages) is removed from the answer and counted in
``Answer.dropped_citations``, so every citation left points at a real passage.

Three modes, as LlamaIndex's response synthesizers (``response_mode``):

- ``compact``: one call: the instructions and the question, then as many passages as fit the context
  window (``context_window`` minus ``max_new_tokens``), in rank order (a first passage too long for the
  window alone is cut to fit).
- ``refine``: the passages packed into windows as in compact; the first window is answered, then each
  next window is shown with the answer so far, which the model keeps or improves (one call per window).
- ``tree_summarize``: each window is answered on its own, then the answers are combined (packed the same
  way) until one remains (one call per window per level).

Citation numbers are global across windows (passage 7 is [7] in whichever window shows it). With no
passages (retrieval empty, or nothing above its score threshold) the answer is :data:`NOT_FOUND` and the
model is not called.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from lamina.errors import ConfigError
from lamina.rag.types import Hit

if TYPE_CHECKING:
    from lamina.checkpoint.load import LoadedModel

NOT_FOUND = "Not found in the sources."
RESPONSE_MODES = ("compact", "refine", "tree_summarize")
# a run of markers ([3], [1, 2], [1][2]) with the blanks before it; not right after an identifier character,
# ] or ) (sys.argv[0], args[1], f(x)[2], m[0][1]: indexing, not a citation)
CITATION = re.compile(r"([ \t]*)(?<![\w\])])((?:\[\d+(?:\s*,\s*\d+)*\])+)")
# where [n] is code, not a citation: ``` / ~~~ fences (an unclosed one runs to the end) and `inline` spans
CITATION_CODE = re.compile(
    r"^[ \t]*(`{3,}|~{3,}).*?(?:^[ \t]*\1[`~]*[ \t]*$|\Z)|(`+)(?!`).+?(?<!`)\2(?!`)", re.M | re.S
)

INSTRUCTIONS = (
    "Answer the question using only the numbered sources below. Cite the sources you use with their "
    "numbers in square brackets, like [1]. If the sources do not contain the answer, say so."
)


@dataclass
class SynthesizeConfig:
    """How passages become an answer (see the module docstring for the modes)."""

    # compact (one call), refine (improve the answer window by window) or tree_summarize (answer each
    # window, then combine the answers)
    response_mode: Literal["compact", "refine", "tree_summarize"] = "compact"
    max_new_tokens: int = 256  # answer length limit in tokens (per call)
    context_window: int | None = None  # prompt + answer tokens per call (None: the model's max_seq_len)
    temperature: float = 0.0  # 0: greedy answers (the same on every run); > 0 samples

    def __post_init__(self) -> None:
        if self.response_mode not in RESPONSE_MODES:
            raise ConfigError(
                f"response_mode={self.response_mode!r} must be one of {', '.join(RESPONSE_MODES)}"
            )
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.context_window is not None and self.context_window <= self.max_new_tokens:
            raise ConfigError(
                f"context_window={self.context_window} must exceed max_new_tokens={self.max_new_tokens} "
                "(room for the question and at least one passage)"
            )


@dataclass
class Citation:
    """Passage ``number`` ([number] in the answer): the chunk it came from, its document and where in it
    (``start``/``end``: character offsets in the document's text; ``page``: the PDF page, else None)."""

    number: int
    doc_id: str
    chunk_id: str
    start: int
    end: int
    page: int | None
    title: str
    text: str


@dataclass
class Answer:
    """The answer text (invalid citation markers removed), the passages it cites (``citations``, in order of
    first mention), every passage the prompts showed (``sources``, numbered 1..n), how many markers named a
    passage no prompt showed (``dropped_citations``), whether any passage was found (``found``) and the
    number of model calls."""

    text: str
    citations: list[Citation] = field(default_factory=list)
    sources: list[Citation] = field(default_factory=list)
    dropped_citations: int = 0
    found: bool = True
    calls: int = 0


def synthesize(
    lm: LoadedModel,
    question: str,
    hits: list[Hit],
    cfg: SynthesizeConfig | None = None,
    stream: Callable[[str], None] | None = None,
    **controls: Any,
) -> Answer:
    """Answer ``question`` from ``hits`` (best first) with ``lm`` (a chat model), citing passages as [n].

    ``stream`` receives the final call's text as it is decoded (the only call in compact mode; the last
    refinement; the root of the tree). ``controls`` are further ``GenerationConfig`` fields for every call
    (``repetition_penalty=1.1``, ``seed``). No hits: :data:`NOT_FOUND`, no model call. Raises
    ``ConfigError`` when the question and instructions alone do not fit the context window.
    """
    cfg = cfg or SynthesizeConfig()
    if not hits:
        return Answer(NOT_FOUND, found=False)
    runner = _Runner(lm, cfg, controls)
    sources = [_citation(i + 1, h) for i, h in enumerate(hits)]
    windows = runner.pack(question, sources)
    shown = [s for w in windows for s in w]
    if cfg.response_mode == "compact":
        text = runner.answer(question, windows[0], stream)
        shown = windows[0]
    elif cfg.response_mode == "refine":
        text = runner.answer(question, windows[0], stream if len(windows) == 1 else None)
        for i, w in enumerate(windows[1:], start=2):
            text = runner.refine(question, text, w, stream if i == len(windows) else None)
    else:
        answers = [runner.answer(question, w, stream if len(windows) == 1 else None) for w in windows]
        while len(answers) > 1:
            groups = runner.pack_texts(question, answers)
            last = len(groups) == 1
            answers = [runner.combine(question, g, stream if last else None) for g in groups]
        text = answers[0]
    return cite(text, shown, calls=runner.calls)


def compact_prompt(
    lm: LoadedModel, question: str, hits: list[Hit], cfg: SynthesizeConfig | None = None
) -> tuple[str, list[Citation]]:
    """The one prompt ``compact`` mode sends for ``question`` and ``hits`` (best first, not empty), and the
    passages it shows ([1]..[n], as many as fit ``cfg``'s window; a first one too long alone is cut): for
    callers that run the model themselves (``lamina serve``'s batched engine) and then read the answer's
    markers with :func:`cite`. Raises ``ConfigError`` as :func:`synthesize` does."""
    runner = _Runner(lm, cfg or SynthesizeConfig(), {})
    window = runner.pack(question, [_citation(i + 1, h) for i, h in enumerate(hits)])[0]
    head, tail = _answer_prompt(question, window)
    return head + tail, window


def cite(text: str, shown: list[Citation], calls: int = 0) -> Answer:
    """Read the [n] markers of ``text``: each number of a passage in ``shown`` becomes a citation (in order
    of first mention); a marker naming a number not shown is removed from the text (with the blanks before
    it) and counted. ``[n]`` right after an identifier character, ``]`` or ``)`` (``sys.argv[0]``) and
    ``[n]`` inside code (``inline`` spans, ``` fences) are not markers: left as they are, not counted."""
    by_number = {s.number: s for s in shown}
    cited: dict[int, Citation] = {}
    dropped = 0
    code = [m.span() for m in CITATION_CODE.finditer(text)]

    def keep(m: re.Match[str]) -> str:
        nonlocal dropped
        if any(a <= m.start(2) < b for a, b in code):
            return m.group(0)
        kept = []
        for marker in m.group(2)[1:-1].split("]["):
            numbers = [int(n) for n in marker.split(",")]
            good = [n for n in numbers if n in by_number]
            dropped += len(numbers) - len(good)
            for n in good:
                cited.setdefault(n, by_number[n])
            kept += ["[" + ", ".join(str(n) for n in good) + "]"] if good else []
        if kept:
            return m.group(1) + "".join(kept)
        after = text[m.end() : m.end() + 1]
        return "" if not after or after.isspace() or after in ".,;:!?" else m.group(1)

    clean = CITATION.sub(keep, text)
    return Answer(clean.strip(), list(cited.values()), list(shown), dropped, True, calls)


def _citation(number: int, hit: Hit) -> Citation:
    c = hit.chunk
    page = c.metadata.get("page")
    title = str(c.metadata.get("title") or c.doc_id)
    return Citation(number, c.doc_id, c.chunk_id, c.start, c.end, page, title, c.text)


def source_block(s: Citation) -> str:
    """How passage ``s`` appears in a prompt: ``[n] title (page p)`` then its text."""
    where = f" (page {s.page})" if s.page is not None else ""
    return f"[{s.number}] {s.title}{where}\n{s.text}\n\n"


class _Runner:
    """Prompts, token budgets and model calls for one synthesis."""

    def __init__(self, lm: LoadedModel, cfg: SynthesizeConfig, controls: dict[str, Any]) -> None:
        if lm.tokenizer is None:
            raise ConfigError(f"model {lm.entry.name!r} has no tokenizer: synthesis needs a chat model")
        self.lm, self.cfg, self.controls = lm, cfg, controls
        window = min(cfg.context_window or lm.model.config.max_seq_len, lm.model.config.max_seq_len)
        self.budget = window - cfg.max_new_tokens  # prompt tokens per call
        self.calls = 0

    def tokens(self, text: str) -> int:
        from lamina.generate.text import build_prompt_ids

        return len(build_prompt_ids(self.lm, text))

    def _fit(self, head: str, tail: str, blocks: list[str]) -> int:
        """How many of ``blocks`` (in order) fit between ``head`` and ``tail`` in the prompt budget."""
        assert self.lm.tokenizer is not None
        used = self.tokens(head + tail)
        if used >= self.budget:
            raise ConfigError(
                f"the question and instructions take {used} tokens, the context window leaves {self.budget} "
                "for the prompt: shorten the question or raise context_window"
            )
        n = 0
        for b in blocks:
            cost = len(self.lm.tokenizer.encode(b, add_special_tokens=False))
            if used + cost > self.budget:
                break
            used += cost
            n += 1
        return n

    def pack(self, question: str, sources: list[Citation]) -> list[list[Citation]]:
        """Consecutive windows of passages, each as many as fit one answer prompt (at least one: a passage
        too long alone is cut to fit)."""
        head, tail = _answer_prompt(question, [])
        windows: list[list[Citation]] = []
        rest = list(sources)
        while rest:
            n = self._fit(head, tail, [source_block(s) for s in rest])
            if n == 0:
                rest[0] = self._cut(head, tail, rest[0])
                n = 1
            windows.append(rest[:n])
            rest = rest[n:]
        return windows

    def pack_texts(self, question: str, answers: list[str]) -> list[list[str]]:
        head, tail = _combine_prompt(question, [])
        groups: list[list[str]] = []
        rest = list(answers)
        while rest:
            n = max(self._fit(head, tail, [_answer_block(i, a) for i, a in enumerate(rest)]), 1)
            n = max(n, 2) if len(rest) > 1 else n  # combining one answer alone would never end
            groups.append(rest[:n])
            rest = rest[n:]
        return groups

    def _cut(self, head: str, tail: str, s: Citation) -> Citation:
        """``s`` shortened from its end (its span follows) until its block fits the prompt budget."""
        assert self.lm.tokenizer is not None
        room = self.budget - self.tokens(head + tail)
        text = s.text
        while (
            text
            and len(self.lm.tokenizer.encode(source_block(_with_text(s, text)), add_special_tokens=False))
            > room
        ):
            text = text[: int(len(text) * 0.8)]
        return _with_text(s, text)

    def generate(self, prompt: str, stream: Callable[[str], None] | None) -> str:
        from lamina.generate.text import generate

        self.calls += 1
        controls = {
            "max_new_tokens": self.cfg.max_new_tokens,
            "temperature": self.cfg.temperature,
            **self.controls,
        }
        return generate(self.lm, prompt, stream=stream, **controls).strip()

    def answer(self, question: str, window: list[Citation], stream: Callable[[str], None] | None) -> str:
        head, tail = _answer_prompt(question, window)
        return self.generate(head + tail, stream)

    def refine(
        self, question: str, so_far: str, window: list[Citation], stream: Callable[[str], None] | None
    ) -> str:
        blocks = "".join(source_block(s) for s in window)
        prompt = (
            f"{INSTRUCTIONS}\n\nQuestion: {question}\n\nAnswer so far: {so_far}\n\nMore sources:\n\n{blocks}"
            "Improve the answer so far with the new sources if they help, keeping its citations; otherwise "
            "repeat it unchanged.\n\nQuestion: " + question + "\nAnswer:"
        )
        return self.generate(prompt, stream)

    def combine(self, question: str, answers: list[str], stream: Callable[[str], None] | None) -> str:
        head, tail = _combine_prompt(question, answers)
        return self.generate(head + tail, stream)


def _with_text(s: Citation, text: str) -> Citation:
    return Citation(s.number, s.doc_id, s.chunk_id, s.start, s.start + len(text), s.page, s.title, text)


def _answer_prompt(question: str, window: list[Citation]) -> tuple[str, str]:
    """(head, tail) of an answer prompt; the passages go between them."""
    head = f"{INSTRUCTIONS}\n\nSources:\n\n" + "".join(source_block(s) for s in window)
    return head, f"Question: {question}\nAnswer:"


def _answer_block(i: int, text: str) -> str:
    return f"Answer {i + 1}: {text}\n\n"


def _combine_prompt(question: str, answers: list[str]) -> tuple[str, str]:
    head = (
        "Several partial answers to one question follow, each citing numbered sources like [1]. Combine "
        "them into one answer, keeping the citations.\n\n"
        + "".join(_answer_block(i, a) for i, a in enumerate(answers))
    )
    return head, f"Question: {question}\nAnswer:"
