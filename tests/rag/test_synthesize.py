"""Synthesis: citations map to passages that were in the prompt (spans, pages), invented numbers are dropped
and counted, passages are packed into the context window in rank order, refine / tree_summarize make the
calls they should, and no hits means "not found" without a model call."""

from __future__ import annotations

from typing import Any

import pytest
from rag_fakes import hit
from tiny_chat import WORDS, tiny_lm

from lamina.errors import ConfigError
from lamina.generate import text as gen_text
from lamina.generate.text import build_prompt_ids
from lamina.rag.synthesize import NOT_FOUND, Citation, SynthesizeConfig, cite, synthesize
from lamina.rag.types import Chunk, Hit


@pytest.fixture(scope="module")
def lm() -> Any:
    return tiny_lm(max_seq_len=256)


def passages(n: int, words: int = 20) -> list[Hit]:
    """n hits on documents d0..d{n-1}, each a passage of ``words`` words at offset 100*i of its document."""
    out = []
    for i in range(n):
        text = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(words))
        meta = {"title": f"doc {i}", "page": i + 1 if i % 2 else None}
        out.append(
            Hit(Chunk(f"d{i}#0", f"d{i}", text, 100 * i, 100 * i + len(text), meta), 1.0 - i / 100, i + 1)
        )
    return out


class FakeGenerate:
    """Stands in for lamina.generate.text.generate: records prompts, answers from a script."""

    def __init__(self, answers: list[str]) -> None:
        self.answers, self.prompts, self.streamed = list(answers), [], []  # type: ignore[var-annotated]

    def __call__(self, lm: Any, prompt: str, stream: Any = None, **controls: Any) -> str:
        self.prompts.append(prompt)
        self.streamed.append(stream is not None)
        out = self.answers.pop(0) if self.answers else "the answer [1]"
        if stream is not None:
            stream(out)
        return out


def shown_numbers(prompt: str, n: int) -> list[int]:
    return [i for i in range(1, n + 1) if f"[{i}] doc {i - 1}" in prompt]


def test_cite_maps_numbers_and_drops_the_invented_ones() -> None:
    shown = [Citation(i, f"d{i}", f"d{i}#0", 10 * i, 10 * i + 5, None, f"d{i}", "x") for i in (1, 2, 3)]
    a = cite("Use A [1] and B [2, 9], not [7].", shown)
    assert [c.number for c in a.citations] == [1, 2]
    assert a.dropped_citations == 2
    assert a.text == "Use A [1] and B [2], not."
    assert a.citations[1].doc_id == "d2" and (a.citations[1].start, a.citations[1].end) == (20, 25)


def test_no_passages_is_not_found_without_a_model_call(lm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeGenerate([])
    monkeypatch.setattr(gen_text, "generate", fake)
    a = synthesize(lm, "what?", [])
    assert a.text == NOT_FOUND and not a.found and a.calls == 0 and fake.prompts == []


def test_compact_stuffs_what_fits_in_order_and_every_citation_points_into_the_prompt(
    lm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    hits = passages(12)
    fake = FakeGenerate(["It is blue [2] and red [1][3]; see also [12]."])
    monkeypatch.setattr(gen_text, "generate", fake)
    cfg = SynthesizeConfig(max_new_tokens=16, context_window=160)
    got: list[str] = []
    a = synthesize(lm, "what color?", hits, cfg, stream=got.append)
    (prompt,) = fake.prompts
    shown = shown_numbers(prompt, 12)
    assert shown == list(range(1, len(shown) + 1)) and 3 <= len(shown) < 12  # a prefix, in rank order
    assert len(build_prompt_ids(lm, prompt)) <= 160 - 16  # the answer's tokens still fit
    assert [c.number for c in a.citations] == [2, 1, 3]
    assert a.dropped_citations == 1 and "[12]" not in a.text
    assert [s.number for s in a.sources] == shown
    for c in a.citations:  # the citation is the passage that carried its number, span and page included
        h = hits[c.number - 1]
        assert (c.doc_id, c.chunk_id, c.start, c.end, c.text) == (
            h.chunk.doc_id,
            h.chunk.chunk_id,
            h.chunk.start,
            h.chunk.end,
            h.chunk.text,
        )
        assert c.page == h.chunk.metadata["page"]
        assert h.chunk.text in prompt
    assert "(page 2)" in prompt  # passage 2 comes from page 2
    assert got == ["It is blue [2] and red [1][3]; see also [12]."] and a.calls == 1


def test_refine_calls_once_per_window_and_streams_the_last(lm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeGenerate(["first [1]", "better [1] [5]", "best [5]", "final [1] [9]"])
    monkeypatch.setattr(gen_text, "generate", fake)
    cfg = SynthesizeConfig(response_mode="refine", max_new_tokens=16, context_window=160)
    a = synthesize(lm, "what color?", passages(12), cfg, stream=lambda _: None)
    n = len(fake.prompts)
    assert n >= 2 and a.calls == n and fake.streamed == [False] * (n - 1) + [True]
    assert "Answer so far: first [1]" in fake.prompts[1]
    assert sorted(s.number for s in a.sources) == list(range(1, 13))  # every passage was in some prompt
    assert a.dropped_citations == 0 or a.text.count("[") == len(a.citations)


def test_tree_summarize_answers_each_window_then_combines(lm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeGenerate([])
    monkeypatch.setattr(gen_text, "generate", fake)
    cfg = SynthesizeConfig(response_mode="tree_summarize", max_new_tokens=16, context_window=160)
    a = synthesize(lm, "what color?", passages(12), cfg)
    leaves = [p for p in fake.prompts if "Sources:" in p]
    combines = [p for p in fake.prompts if "partial answers" in p]
    assert len(leaves) >= 2 and len(combines) >= 1 and a.calls == len(leaves) + len(combines)
    assert [c.number for c in a.citations] == [1]


def test_a_first_passage_longer_than_the_window_is_cut_and_its_span_follows(
    lm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeGenerate(["see [1]"])
    monkeypatch.setattr(gen_text, "generate", fake)
    long = passages(1, words=400)
    a = synthesize(lm, "what?", long, SynthesizeConfig(max_new_tokens=16, context_window=128))
    (c,) = a.citations
    assert 0 < len(c.text) < len(long[0].chunk.text) and long[0].chunk.text.startswith(c.text)
    assert (c.start, c.end) == (0, len(c.text))


def test_the_real_engine_writes_the_answer(lm: Any) -> None:
    a = synthesize(lm, "the cat?", passages(2), SynthesizeConfig(max_new_tokens=4))
    assert a.calls == 1 and a.found and isinstance(a.text, str) and len(a.sources) == 2


@pytest.mark.parametrize(
    "bad", [{"response_mode": "stuff"}, {"max_new_tokens": 0}, {"context_window": 10, "max_new_tokens": 10}]
)
def test_config_is_checked(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        SynthesizeConfig(**bad)


def test_a_question_too_long_for_the_window_is_refused(lm: Any) -> None:
    with pytest.raises(ConfigError, match="context window"):
        synthesize(lm, "cat " * 300, [hit("a#0")], SynthesizeConfig(max_new_tokens=16, context_window=128))
