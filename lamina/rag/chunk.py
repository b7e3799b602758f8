"""Documents -> chunks: token-aware recursive splitting with overlap, counting the metadata that is embedded
with each chunk.

    chunker = Chunker(lm.tokenizer, chunk_size=256, chunk_overlap=32)
    chunks = chunker.chunk(doc)                 # chunk.text == doc.text[chunk.start:chunk.end]
    texts = [chunker.embedded_text(c) for c in chunks]   # what the embedding model sees

The budget ``chunk_size`` is in the embedding model's tokens and covers everything the model reads: the
special tokens ([CLS], [SEP]), the metadata prefix (the document title and the chunk's Markdown headings,
see :meth:`Chunker.prefix`) and the chunk's text, so an embedded chunk never exceeds the model's
``max_seq_len`` and is never truncated (llama_index #12200: metadata left out of the budget). A section
that fits is one chunk; otherwise it is split at paragraphs (blank lines), then sentences (or lines), then
tokens, and the pieces are merged greedily up to the budget, each new chunk starting with up to
``chunk_overlap`` tokens of whole pieces from the end of the previous one (LangChain's
``RecursiveCharacterTextSplitter`` with a token length function, measured on spans of one tokenization of
the document). Markdown documents are first cut at their headings; each chunk keeps the heading path
(``["Install", "From source"]``) in its metadata and prefix. PDF chunks get the ``page`` where they start.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lamina.errors import ConfigError
from lamina.rag.types import Chunk, Document
from lamina.tokenizer import Tokenizer

__all__ = ["ChunkConfig", "Chunker", "markdown_sections"]

_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.MULTILINE)
_FENCE = re.compile(r"^(```|~~~)", re.MULTILINE)
_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")
_SENTENCE = re.compile(r"(?<=[.!?:;])\s+|\n")


@dataclass
class ChunkConfig:
    """How documents are cut into chunks."""

    chunk_size: int = 256  # most tokens an embedded chunk takes: special tokens, metadata prefix and text
    chunk_overlap: int = 32  # tokens of whole pieces a chunk repeats from the end of the one before

    def __post_init__(self) -> None:
        if self.chunk_size < 16:
            raise ConfigError(f"chunk_size={self.chunk_size} must be >= 16 tokens")
        if not 0 <= self.chunk_overlap < self.chunk_size // 2:
            raise ConfigError(
                f"chunk_overlap={self.chunk_overlap} must be >= 0 and under half of chunk_size={self.chunk_size}"
            )


class Chunker:
    """Cuts documents into chunks that fit ``chunk_size`` tokens of ``tokenizer`` once prefixed.

    Raises ``ConfigError`` when ``chunk_size`` exceeds ``max_seq_len`` (the model's limit, when given).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        chunk_size: int = ChunkConfig.chunk_size,
        chunk_overlap: int = ChunkConfig.chunk_overlap,
        max_seq_len: int | None = None,
    ) -> None:
        ChunkConfig(chunk_size, chunk_overlap)
        if max_seq_len is not None and chunk_size > max_seq_len:
            raise ConfigError(
                f"chunk_size={chunk_size} is more than the embedding model takes (max_seq_len={max_seq_len}); "
                f"pass chunk_size <= {max_seq_len}"
            )
        self.backend = tokenizer.backend
        self.chunk_size, self.chunk_overlap = chunk_size, chunk_overlap
        self.special = self.backend.num_special_tokens_to_add(is_pair=False)

    def count(self, text: str) -> int:
        """Tokens of ``text`` without special tokens."""
        return len(self.backend.encode(text, add_special_tokens=False).ids)

    @staticmethod
    def prefix(title: str, headings: Sequence[str] = (), text: str = "") -> str:
        """The metadata embedded before a chunk: its title (unless the chunk starts with it) and its
        heading path, then a blank line; empty when there is nothing to add."""
        lines = []
        if title and not text.startswith(title):
            lines.append(title)
        if headings:
            lines.append(" > ".join(headings))
        return "\n".join(lines) + "\n\n" if lines else ""

    def embedded_text(self, chunk: Chunk) -> str:
        """What the embedding model reads for ``chunk``: the prefix, then its text."""
        meta = chunk.metadata
        return self.prefix(str(meta.get("title", "")), meta.get("headings") or (), chunk.text) + chunk.text

    def chunk(self, doc: Document) -> list[Chunk]:
        """``doc`` as chunks in order, ``chunk_id`` ``f"{doc_id}#{i}"``; each chunk's ``text`` is
        ``doc.text[start:end]`` (whitespace at its edges left out).

        A document whose metadata names a ``lead`` span ``[start, end]`` (the built-in stdlib-docs corpus
        sets it to the docstring's summary paragraph) gets one more entry after its chunks, ``kind``
        ``"lead"``, ``chunk_id`` ``f"{doc_id}#lead"``: that span alone (when it fits ``chunk_size`` and is
        not the whole text), so its embedding is not diluted by the rest of the chunk that holds it."""
        text = doc.text
        title = str(doc.metadata.get("title", ""))
        sections = markdown_sections(text) if doc.metadata.get("kind") == "markdown" else [(0, len(text), [])]
        enc = self.backend.encode(text, add_special_tokens=False)
        starts = [s for s, e in enc.offsets]
        pages = doc.metadata.get("pages") or []
        spans: list[tuple[int, int, list[str]]] = []
        for s, e, headings in sections:
            budget = self.chunk_size - self.special - self.count(self.prefix(title, headings))
            if budget < 8:
                raise ConfigError(
                    f"chunk_size={self.chunk_size} leaves {budget} tokens for text after the title and headings "
                    f"of {doc.doc_id!r}; raise chunk_size"
                )
            spans.extend((a, b, headings) for a, b in _split(text, s, e, starts, budget, self.chunk_overlap))
        chunks = []
        for i, (a, b, headings) in enumerate(spans):
            meta: dict[str, Any] = {"path": doc.metadata.get("path", doc.doc_id), "title": title}
            if headings:
                meta["headings"] = list(headings)
            if pages:
                at = bisect.bisect_right([p[0] for p in pages], a) - 1
                meta["page"] = pages[max(at, 0)][1]
            chunks.append(Chunk(f"{doc.doc_id}#{i}", doc.doc_id, text[a:b], a, b, meta))
        lead = doc.metadata.get("lead")
        if lead and len(chunks) and self._fits(title, text, lead):
            a, b = int(lead[0]), int(lead[1])
            meta = {"path": doc.metadata.get("path", doc.doc_id), "title": title}
            chunks.append(Chunk(f"{doc.doc_id}#lead", doc.doc_id, text[a:b], a, b, meta, "lead"))
        return chunks

    def _fits(self, title: str, text: str, lead: Sequence[int]) -> bool:
        """Whether the ``lead`` span is a proper part of ``text`` that fits the budget with its prefix."""
        a, b = int(lead[0]), int(lead[1])
        if not 0 <= a < b <= len(text) or (a, b) == (0, len(text)):
            return False
        piece = text[a:b]
        return self.special + self.count(self.prefix(title, (), piece) + piece) <= self.chunk_size


def markdown_sections(text: str) -> list[tuple[int, int, list[str]]]:
    """``(start, end, heading path)`` of each section of a Markdown text, cut before each heading line
    (``#`` lines inside fenced code blocks are not headings); text before the first heading has no path."""
    fences = [m.start() for m in _FENCE.finditer(text)]
    cuts: list[tuple[int, int, str]] = []
    for m in _HEADING.finditer(text):
        if bisect.bisect_left(fences, m.start()) % 2:  # an odd number of fences before: inside code
            continue
        cuts.append((m.start(), len(m.group(1)), m.group(2).strip()))
    sections: list[tuple[int, int, list[str]]] = []
    path: list[tuple[int, str]] = []
    bounds = [c[0] for c in cuts] + [len(text)]
    if not cuts or cuts[0][0] > 0:
        sections.append((0, bounds[0], []))
    for (at, level, name), end in zip(cuts, bounds[1:], strict=False):
        path = [p for p in path if p[0] < level] + [(level, name)]
        sections.append((at, end, [n for _, n in path]))
    return sections


def _trim(text: str, a: int, b: int) -> tuple[int, int]:
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b


def _split(
    text: str, a: int, b: int, starts: list[int], budget: int, overlap: int, level: int = 0
) -> list[tuple[int, int]]:
    """Spans of ``text[a:b]`` of at most ``budget`` tokens each: the whole when it fits, else pieces at
    this level's separators merged greedily with ``overlap`` tokens carried over, over-budget pieces split
    at the next level (paragraphs, sentences, tokens)."""
    a, b = _trim(text, a, b)
    if a >= b:
        return []

    def tokens(s: int, e: int) -> int:
        return bisect.bisect_left(starts, e) - bisect.bisect_left(starts, s)

    if tokens(a, b) <= budget:
        return [(a, b)]
    if level < 2:
        sep = _PARAGRAPH if level == 0 else _SENTENCE
        cuts = [m.end() for m in sep.finditer(text, a, b)]
        bounds = [a] + [c for c in cuts if a < c < b] + [b]
    else:  # one piece per token
        i, j = bisect.bisect_left(starts, a), bisect.bisect_left(starts, b)
        bounds = [a] + [s for s in starts[i:j] if s > a] + [b]
    pieces = [(s, e) for s, e in itertools.pairwise(bounds) if s < e]
    if len(pieces) == 1 and level < 2:
        return _split(text, a, b, starts, budget, overlap, level + 1)
    # runs of pieces that fit are merged; an over-budget piece is split at the next level on its own
    out: list[tuple[int, int]] = []
    run: list[tuple[int, int]] = []
    for s, e in pieces:
        if tokens(s, e) <= budget:
            run.append((s, e))
            continue
        out.extend(_merge(text, run, tokens, budget, overlap))
        run = []
        out.extend(_split(text, s, e, starts, budget, overlap, level + 1))
    out.extend(_merge(text, run, tokens, budget, overlap))
    return out


def _merge(
    text: str, pieces: list[tuple[int, int]], tokens: Callable[[int, int], int], budget: int, overlap: int
) -> list[tuple[int, int]]:
    """Consecutive pieces merged greedily into spans of at most ``budget`` tokens; each span after the
    first starts with the whole pieces that end the previous one, up to ``overlap`` tokens."""
    out: list[tuple[int, int]] = []
    i = 0
    while i < len(pieces):
        j = i + 1
        while j < len(pieces) and tokens(pieces[i][0], pieces[j][1]) <= budget:
            j += 1
        span = _trim(text, pieces[i][0], pieces[j - 1][1])
        if span[0] < span[1]:
            out.append(span)
        if j >= len(pieces):
            break
        k = j
        while (
            k - 1 > i
            and tokens(pieces[k - 1][0], pieces[j - 1][1]) <= overlap
            and tokens(pieces[k - 1][0], pieces[j][1]) <= budget
        ):
            k -= 1
        i = k
    return out
