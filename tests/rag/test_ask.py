"""``lamina ask`` and ``lamina.rag.ask`` over a real SQLite index of the stdlib-docs documents of a few
modules (built by ``lamina.rag.index.update``, MiniLM): the CSV question retrieves csv.DictReader into the
prompt, a miss answers "not found" without loading the chat model, the embedding model is enforced."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from rag_fakes import SUBSET, stdlib_corpus
from tiny_chat import tiny_lm

import lamina.rag
from lamina.cli.main import main
from lamina.errors import ConfigError
from lamina.rag.retrieve import RetrieveConfig
from lamina.rag.synthesize import NOT_FOUND, SynthesizeConfig

QUESTION = "How do I read a CSV file with a header row?"


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory, lamina_minilm: Any) -> Path:
    from lamina.rag.index import IndexConfig, update

    path = tmp_path_factory.mktemp("ask") / "stdlib.sqlite"
    docs = [d for d in stdlib_corpus().values() if str(d.metadata["module"]).split(".")[0] in SUBSET]
    update(documents=docs, config=IndexConfig(store=str(path), progress=False), embedder=lamina_minilm)
    return path


@pytest.mark.slow
def test_lamina_ask_streams_an_answer_citing_csv_dictreader(
    index: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's example, in dense mode: on Python 3.11 csv.DictReader has no docstring (its document is
    its signature and member names), so BM25 has nothing to match and hybrid fusion ranks it 10th on this
    subset (dense: 2nd); see the issue note for the measured numbers."""
    args = ["ask", QUESTION, "--index", str(index), "--model", "smollm2", "--mode", "dense"]
    rc = main([*args, "--max-new-tokens", "12", "--show-sources"])
    out = capsys.readouterr().out
    assert rc == 0
    answer, _, rest = out.partition("\nSources")
    assert answer.strip()  # the streamed answer (its words are the model's)
    shown = re.findall(r"^\d+\. \[(\d+)\] (\S+) \(score", rest, flags=re.MULTILINE)
    assert "csv.DictReader" in [doc for _, doc in shown], (
        out
    )  # retrieved into the prompt as a numbered source
    listed = rest.split("\nRetrieved passages:")[0]
    assert re.search(r"^\[\d+\] csv\.\w+, chars \d+-\d+", listed, flags=re.MULTILINE), out


def test_python_ask_maps_citations_to_prompt_passages(
    index: Path, lamina_smollm2: Any, lamina_minilm: Any
) -> None:
    result = lamina.rag.ask(
        QUESTION,
        index,
        lamina_smollm2,
        RetrieveConfig(k=3),
        SynthesizeConfig(max_new_tokens=8),
        embedder=lamina_minilm,
    )
    assert [h.rank for h in result.hits] == [1, 2, 3]
    assert [s.chunk_id for s in result.answer.sources] == [h.chunk.chunk_id for h in result.hits]
    assert all(c.number in {s.number for s in result.answer.sources} for c in result.answer.citations)


def test_a_miss_is_not_found_without_loading_the_chat_model(index: Path, lamina_minilm: Any) -> None:
    cfg = RetrieveConfig(score_threshold=0.95)
    result = lamina.rag.ask(
        "What is the boiling point of water on Mars?", index, "no-such-model", cfg, embedder=lamina_minilm
    )
    assert result.answer.text == NOT_FOUND and not result.answer.found and result.hits == []


def test_the_index_embedding_model_is_enforced(index: Path) -> None:
    with pytest.raises(ConfigError, match=r"'minilm'.*'tiny'"):
        lamina.rag.ask(QUESTION, index, "no-such-model", embedder=tiny_lm())


def test_a_missing_index_says_how_to_build_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ask", QUESTION, "--index", str(tmp_path / "none.sqlite")]) == 1
    assert "lamina index" in capsys.readouterr().err
    # --store, the flag `lamina index` writes the index with, names it here too (it was refused)
    assert main(["ask", QUESTION, "--store", str(tmp_path / "other.sqlite")]) == 1
    err = capsys.readouterr().err
    assert "other.sqlite" in err and "lamina index" in err


def test_lamina_index_eval_reports_the_three_modes(
    index: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    qrels = tmp_path / "q.jsonl"
    qrels.write_text(
        '{"question": "How do I save rows that are dictionaries into a spreadsheet-style file?", '
        '"relevant": ["csv.DictWriter"]}\n{"question": "the biggest three items", "relevant": ["heapq.nlargest"]}\n'
    )
    assert main(["index", "eval", "--store", str(index), "--qrels", str(qrels)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:5]}
    assert set(rows) == {"dense", "bm25", "hybrid"} and all(len(r) == 7 for r in rows.values())
    assert all(0.0 <= float(v) <= 1.0 for r in rows.values() for v in r)
    assert "2 questions" in out and "missed in the top 5" in out
