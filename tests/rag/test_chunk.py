"""Chunking: spans map back to the text, the budget counts special tokens and the metadata prefix,
Markdown headings, overlap, PDF pages."""

from __future__ import annotations

import itertools

import pytest

from lamina.checkpoint.load import load_tokenizer
from lamina.errors import ConfigError
from lamina.rag.chunk import Chunker, markdown_sections
from lamina.rag.ingest import text_hash
from lamina.rag.types import Document


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


def doc(text: str, **meta) -> Document:
    return Document("d", text, text_hash(text), {"path": "d", "title": "d", **meta})


SENTENCES = " ".join(f"Sentence number {i} talks about topic {i % 7} in some detail." for i in range(60))
LONG = f"{SENTENCES}\n\nA short paragraph.\n\n" + " ".join(f"word{i}" for i in range(400)) + "\n\nThe end."


def covered(d: Document, chunks) -> bool:
    mask = [False] * len(d.text)
    for c in chunks:
        mask[c.start : c.end] = [True] * (c.end - c.start)
    return all(m or ch.isspace() for m, ch in zip(mask, d.text, strict=True))


@pytest.mark.parametrize("title", ["d", "A much longer title " * 8])
def test_spans_budget_and_coverage(tokenizer, title):
    chunker = Chunker(tokenizer, chunk_size=64, chunk_overlap=8)
    d = doc(LONG, title=title)
    chunks = chunker.chunk(d)
    assert len(chunks) > 5
    for i, c in enumerate(chunks):
        assert c.text == d.text[c.start : c.end] and c.text == c.text.strip()
        assert c.chunk_id == f"d#{i}" and c.doc_id == "d" and c.metadata["title"] == title
        embedded = chunker.embedded_text(c)
        assert embedded.endswith(c.text)
        assert len(tokenizer.backend.encode(embedded).ids) <= 64  # [CLS] prefix text [SEP]
    assert covered(d, chunks)
    if title != "d":  # the prefix takes budget: more chunks than with the short title
        assert len(chunks) > len(Chunker(tokenizer, 64, 8).chunk(doc(LONG)))


def test_split_prefers_paragraphs_then_sentences_with_overlap(tokenizer):
    chunker = Chunker(tokenizer, chunk_size=48, chunk_overlap=16)
    d = doc(SENTENCES + "\n\nA short paragraph.")
    chunks = chunker.chunk(d)
    assert chunks[-1].text == "A short paragraph."  # a paragraph boundary is a cut
    body = chunks[:-1]
    assert all(c.text.endswith(".") for c in body)  # sentence boundaries, never mid-sentence
    assert all(b.start < a.end for a, b in itertools.pairwise(body))  # overlapping neighbours
    no_overlap = Chunker(tokenizer, chunk_size=48, chunk_overlap=0).chunk(d)
    assert all(b.start >= a.end for a, b in itertools.pairwise(no_overlap))


def test_short_document_is_one_chunk(tokenizer):
    d = doc("  json.loads(s)\n\nDeserialize s.\n")
    [c] = Chunker(tokenizer).chunk(d)
    assert (c.start, c.end, c.text) == (2, 31, "json.loads(s)\n\nDeserialize s.")
    assert Chunker.prefix("json.loads", (), c.text) == ""  # the text starts with its title: not repeated
    assert Chunker(tokenizer).chunk(doc("   \n")) == []


def test_markdown_headings(tokenizer):
    text = "Intro.\n\n# Install\n\nRun pip.\n\n```\n# not a heading\n```\n\n## From source\n\nClone.\n\n# Use\n\nCall it.\n"
    assert [h for _, _, h in markdown_sections(text)] == [
        [],
        ["Install"],
        ["Install", "From source"],
        ["Use"],
    ]
    chunker = Chunker(tokenizer)
    chunks = chunker.chunk(doc(text, kind="markdown", title="Guide"))
    assert [c.metadata.get("headings") for c in chunks] == [
        None,
        ["Install"],
        ["Install", "From source"],
        ["Use"],
    ]
    assert "# not a heading" in chunks[1].text
    assert chunker.embedded_text(chunks[2]).startswith("Guide\nInstall > From source\n\n## From source")


def test_pdf_chunks_know_their_page(tokenizer):
    text = "Page one text. " * 30 + "\n\n" + "Page two text. " * 30
    split = text.index("\n\n") + 2
    chunks = Chunker(tokenizer, chunk_size=32, chunk_overlap=0).chunk(doc(text, pages=[[0, 1], [split, 2]]))
    assert {c.metadata["page"] for c in chunks} == {1, 2}
    assert all(c.metadata["page"] == (1 if c.start < split else 2) for c in chunks)


def test_bad_sizes(tokenizer):
    with pytest.raises(ConfigError, match="chunk_overlap"):
        Chunker(tokenizer, chunk_size=64, chunk_overlap=40)
    with pytest.raises(ConfigError, match="max_seq_len=256"):
        Chunker(tokenizer, chunk_size=512, max_seq_len=256)
    with pytest.raises(ConfigError, match="raise chunk_size"):
        Chunker(tokenizer, chunk_size=16, chunk_overlap=0).chunk(doc("text", title="a very long title " * 5))


def test_a_lead_span_becomes_one_more_entry(tokenizer):
    text = "f(a, b)\n\nAdd two numbers.\n\n" + " ".join(f"detail{i}" for i in range(200))
    chunker = Chunker(tokenizer, chunk_size=64, chunk_overlap=8)
    chunks = chunker.chunk(doc(text, lead=[9, 25]))
    *body, lead = chunks
    assert lead.kind == "lead" and lead.chunk_id == "d#lead" and lead.text == "Add two numbers."
    assert (lead.start, lead.end) == (9, 25) and all(c.kind == "chunk" for c in body) and len(body) > 1
    assert [c.chunk_id for c in body] == [c.chunk_id for c in chunker.chunk(doc(text))]
    # the whole text, an empty or out-of-range span, or one over the budget: no lead entry
    for bad in ([0, len(text)], [5, 5], [9, len(text) + 1], [25, len(text)]):
        assert all(c.kind == "chunk" for c in chunker.chunk(doc(text, lead=bad))), bad
