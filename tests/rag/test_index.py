"""Indexing: incremental updates that embed only what changed, the summary, the CLI verb, and an index
that survives SIGKILL mid-run and is completed by running again."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lamina.embeddings
from lamina.cli.main import main
from lamina.errors import ConfigError
from lamina.rag.index import IndexConfig, update
from lamina.rag.store import open_store


@pytest.fixture(scope="module")
def minilm():
    return lamina.load("minilm")


@pytest.fixture
def counted(monkeypatch):
    """The texts embedded during the test (every call of lamina.embeddings.embed_texts)."""
    seen: list[str] = []
    real = lamina.embeddings.embed_texts

    def spy(lm, texts, **kw):
        seen.extend(texts)
        return real(lm, texts, **kw)

    monkeypatch.setattr(lamina.embeddings, "embed_texts", spy)
    return seen


def test_update_embeds_only_what_changed(tmp_path, minilm, counted):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# Alpha\n\nAlpha is the first letter.\n")
    (docs / "b.txt").write_text("Bravo follows alpha.\n")
    (docs / "c.txt").write_text("Charlie comes third.\n")
    (docs / "junk.txt").write_bytes(b"\x00\x01binary")
    config = IndexConfig(store=str(tmp_path / "i.sqlite"), progress=False)
    first = update([docs], config=config, embedder=minilm)
    assert (first.added, first.updated, first.removed, first.unchanged) == (3, 0, 0, 0)
    assert first.chunks_embedded == first.chunks_total == 3 == len(counted)
    assert first.skipped == {"binary": 1}
    assert "3 added" in first.line() and "1 binary" in first.line()
    counted.clear()
    same = update([docs], config=config, embedder=minilm)
    assert (same.added, same.updated, same.removed, same.unchanged, same.chunks_embedded) == (0, 0, 0, 3, 0)
    assert counted == []  # unchanged documents cost no embedding
    (docs / "b.txt").write_text("Bravo now follows alpha and precedes charlie.\n")
    (docs / "c.txt").unlink()
    (docs / "d.md").write_text("Delta is new.\n")
    again = update([docs], config=config, embedder=minilm)
    assert (again.added, again.updated, again.removed, again.unchanged) == (1, 1, 1, 1)
    assert sorted(counted) == [
        "b.txt\n\nBravo now follows alpha and precedes charlie.",
        "d.md\n\nDelta is new.",
    ]
    store = open_store(config.store)
    assert sorted(store.documents()) == ["a.md", "b.txt", "d.md"] and store.count() == 3
    hit = store.search_text("precedes", 1)[0]
    assert hit.chunk.chunk_id == "b.txt#0" and hit.chunk.text.startswith("Bravo now")
    store.close()
    with pytest.raises(ConfigError, match=r"'minilm'.*'other-model'"):
        update([docs], config=IndexConfig(store=config.store, embedding_model="other-model"), embedder=minilm)


def test_cli_indexes_a_stdlib_subset(tmp_path, capsys):
    store = tmp_path / "std.sqlite"
    assert (
        main(
            ["index", "--builtin", "stdlib-docs", "--modules", "csv", "--store", str(store), "--no-progress"]
        )
        == 0
    )
    line = capsys.readouterr().out.strip()
    assert line.startswith("indexed ") and " added" in line and str(store) in line
    with open_store(store) as s:
        assert s.embedding_model == "minilm" and s.dim == 384
        assert "csv.DictReader" in s.documents() and "json.loads" not in s.documents()
        assert s.get(["csv.DictReader#0"])[0].metadata["title"] == "csv.DictReader"
    assert main(["index", "--store", str(store)]) == 1  # nothing named: one line, exit 1
    assert "name what to index" in capsys.readouterr().err


def _documents(path: Path) -> int:
    try:
        with sqlite3.connect(path, timeout=0.1) as db:
            return int(db.execute("SELECT count(*) FROM documents").fetchone()[0])
    except sqlite3.Error:
        return 0


@pytest.mark.slow
def test_sigkill_mid_index_leaves_a_usable_index_and_rerun_completes(tmp_path, minilm):
    docs = tmp_path / "docs"
    docs.mkdir()
    n = 240
    for i in range(n):
        (docs / f"{i:03d}.txt").write_text(f"Document {i} is about topic {i % 13} and number {i * 7}.\n")
    store = tmp_path / "i.sqlite"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lamina", "index", str(docs), "--store", str(store), "--commit-chunks", "4"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while _documents(store) == 0 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    written = _documents(store)
    assert 0 < written < n, f"the kill should land mid-run (got {written} of {n} documents)"
    with open_store(store) as s:  # opens and answers
        assert s.count() == written and len(s.search_text("topic", 3)) == 3
        assert len(s.search_dense(minilm_vector(minilm, "topic 5"), 3)) == 3
    done = update([docs], config=IndexConfig(store=str(store), progress=False), embedder=minilm)
    assert (done.added, done.unchanged, done.updated, done.removed) == (n - written, written, 0, 0)
    with open_store(store) as s:
        assert len(s.documents()) == n and s.count() == n  # one chunk each, no duplicates


def minilm_vector(lm, text):
    return lamina.embed(lm, [text])[0]


def test_summaries_are_indexed_as_their_own_entries(tmp_path, minilm):
    from tiny_chat import tiny_lm

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("The cat sat on the mat. " * 20)
    (docs / "b.txt").write_text("A dog ran.")
    config = IndexConfig(
        store=str(tmp_path / "s.sqlite"), progress=False, summaries="tiny", summary_max_new_tokens=6,
        summary_input_tokens=8,
    )  # fmt: skip
    done = update([docs], config=config, embedder=minilm, summarizer=tiny_lm())
    assert done.summaries == 2 and "2 summaries written" in done.line()
    with open_store(config.store) as s:
        [summary] = s.get(["a.txt#summary"])
        assert summary.kind == "summary" and summary.doc_id == "a.txt" and summary.text
        assert (summary.start, summary.end) == (0, len((docs / "a.txt").read_text()))
        assert s.count() == done.chunks_embedded == 4  # one chunk + one summary per document
        hits = s.search_dense(minilm_vector(minilm, summary.text), 5, {"kind": "summary"})
        assert {h.chunk.chunk_id for h in hits} == {"a.txt#summary", "b.txt#summary"}
