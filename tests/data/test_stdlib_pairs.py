"""The standard-library summarization task: pairs, the split by module, the two baselines, and the README's
commands for it, run short."""

from __future__ import annotations

import itertools
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from rouge_score import rouge_scorer

from lamina.data.stdlib_pairs import (
    _mean_rouge1,
    baseline_scores,
    best_constant,
    build_stdlib_pairs,
    code_words,
    function_pairs,
    name_words,
    split_of,
    target_words,
)
from lamina.eval.seq2seq import rouge_scores

MODULE = '''
import os

def add(a, b):
    """Return the sum of a and b.

    More text here.
    """
    return a + b

class Box:
    @property
    def getSize(self):
        """
        The size of the box.
        """
        return 3

    def _noDoc(self):
        return 1

def one(): "one-liner"
'''


def test_function_pairs_strip_the_docstring_from_the_source() -> None:
    rows = list(function_pairs("stdlib/m.py", MODULE))
    assert [(r["name"], r["target"], r["line"]) for r in rows] == [
        ("add", "Return the sum of a and b.", 4),
        ("getSize", "The size of the box.", 13),
    ]
    assert rows[0]["source"] == "def add(a, b):\n    return a + b"
    assert rows[1]["source"] == "def getSize(self):\n    return 3"  # dedented; decorator left out
    assert rows[1]["source_words"] == "def get size ( self ) : return 3"
    assert rows[1]["target_words"] == " the size of the box."  # its words are the source's tokens
    assert list(function_pairs("bad.py", "def (:")) == []


def test_name_words() -> None:
    assert name_words("def _getLoggerClass(x):\n  pass") == "get logger class"
    assert name_words("async def read_HTTPResponse():") == "read http response"
    assert name_words("def __init__(self):") == "init"
    assert name_words("x = 1") == ""


def test_code_words_split_identifiers_into_the_words_of_prose() -> None:
    code = 'def _getHTTPLogger(self, name=None):\n    return self.__loggers[name]  # cached, "as is"'
    want = 'def get http logger ( self , name = none ) : return self . loggers [ name ] # cached , " as is "'
    assert code_words(code) == want
    assert code_words("x = __\n\n  y2 += 10") == "x = __ y2 + = 10"


def test_split_is_by_module_and_stable() -> None:
    names = [f"stdlib/m{i}.py" for i in range(2000)]
    splits = [split_of(n) for n in names]
    assert splits == [split_of(n) for n in names]
    share = {s: splits.count(s) / len(names) for s in ("train", "val", "test")}
    assert 0.03 < share["test"] < 0.07 and 0.03 < share["val"] < 0.07
    assert [split_of(n, seed=1) for n in names] != splits


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stdlib") / "pairs"
    build_stdlib_pairs(out, max_bytes=1_500_000, val_fraction=0.15, test_fraction=0.15)
    return out


def test_build_writes_three_splits_with_no_module_shared(folder: Path) -> None:
    rows = {s: [json.loads(x) for x in (folder / f"{s}.jsonl").read_text().splitlines()] for s in
            ("train", "val", "test")}  # fmt: skip
    assert all(len(r) > 5 for r in rows.values()), {k: len(v) for k, v in rows.items()}
    modules = {s: {r["module"] for r in v} for s, v in rows.items()}
    for a, b in itertools.combinations(modules, 2):
        assert not modules[a] & modules[b]
    train_sources = {r["source"] for r in rows["train"]}
    for r in rows["test"]:
        assert r["source"] not in train_sources and r["target"] and "\n" not in r["target"]
        assert r["target"] not in r["source"] or len(r["target"]) < 10  # the docstring was removed
        assert r["source"].lstrip().startswith(("def ", "async def "))
        assert r["source_words"] == code_words(r["source"])
        assert r["target_words"] == target_words(r["target"])
    refs = [r["target"] for r in rows["test"]]  # ROUGE is case-blind: target_words scores as the target does
    assert rouge_scores([r["target_words"] for r in rows["test"]], refs) == rouge_scores(refs, refs)
    lines = (folder / "train.txt").read_text().splitlines()
    assert lines[:2] == [rows["train"][0]["source_words"], rows["train"][0]["target_words"]]
    assert len(lines) == 2 * len(rows["train"])


def test_mean_rouge1_is_rouge_scores_rouge1_and_bounds_rougel() -> None:
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    cands = ["Return the value.", "the the cat", ""]
    targets = ["Return the value of the thing.", "The cat sat on the the mat", "", "Open a file."]
    tok = scorer._tokenizer
    got = _mean_rouge1([tok.tokenize(c) for c in cands], [tok.tokenize(t) for t in targets])
    for i, c in enumerate(cands):
        r1 = np.mean([scorer.score(t, c)["rouge1"].fmeasure for t in targets])
        rl = np.mean([scorer.score(t, c)["rougeL"].fmeasure for t in targets])
        assert got[i] == pytest.approx(r1, abs=1e-5) and got[i] >= rl


def test_best_constant_is_the_brute_force_best() -> None:
    targets = [
        "Return the value of the attribute.",
        "Return the number of items.",
        "Open the file and return a stream.",
        "Return a copy of the list.",
        "Close the connection.",
        "Return the value.",
        "Set the value of the attribute.",
    ]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    brute = {c: np.mean([scorer.score(t, c)["rougeL"].fmeasure for t in targets]) for c in set(targets)}
    want = max(sorted(brute), key=lambda c: brute[c])
    text, score = best_constant(targets)
    assert text == want and score == pytest.approx(brute[want])


def test_baselines_on_the_test_split(folder: Path) -> None:
    scores = baseline_scores(folder)
    assert set(scores) == {"name_words", "best_constant"}
    for s in scores.values():
        assert 0.0 < s["rougeL"] < 1.0
    rows = [json.loads(x) for x in (folder / "train.jsonl").read_text().splitlines()]
    assert scores["best_constant"]["text"] in {r["target"] for r in rows}


def test_main_builds_and_prints_the_baselines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import lamina.data.stdlib_pairs as sp

    real = sp.build_stdlib_pairs
    monkeypatch.setattr(sp, "build_stdlib_pairs", lambda out, seed=0: real(out, seed=seed, max_bytes=1_500_000,
                        val_fraction=0.15, test_fraction=0.15))  # fmt: skip
    assert sp.main([str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "test:" in out and "baseline name_words: test ROUGE-L 0." in out
    assert "baseline best_constant: test ROUGE-L 0." in out


def _readme_summarization_block() -> str:
    """The README's ```sh block that builds the task, trains the summarizer and scores it."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```sh\n(.*?)```", readme, flags=re.S) if "stdlib_pairs" in b]
    assert len(blocks) == 1
    return re.sub(r"\\\n\s*", "", blocks[0])  # continuation lines joined


@pytest.mark.slow
def test_readme_summarization_commands_run_short(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's summarization commands, short: on the small task of ``folder`` (its pairs in place of
    the first command's), three optimizer steps and four validation pairs decoded; the scoring line runs
    on the checkpoint and prints the test split's scores."""
    from lamina.cli.main import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    lines = _readme_summarization_block().splitlines()
    assert lines[0].startswith("python3 -m lamina.data.stdlib_pairs runs/stdlib-pairs")
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "stdlib-pairs").symlink_to(folder)
    short = {"--train.max_steps": "3", "--train.eval_every": "3", "--seq2seq.eval_pairs": "4"}
    for line in lines[1:]:
        line = re.sub(r"\s+#.*$", "", line).replace("runs/", f"{runs}/")
        if line.startswith("lamina "):
            argv = shlex.split(line)[1:]
            for flag, value in short.items():
                if flag in argv:
                    argv[argv.index(flag) + 1] = value
            assert main(argv) == 0, line
        elif line.startswith("python3 -c "):
            exec(shlex.split(line)[2], {})
    out = capsys.readouterr().out
    assert re.search(r"n=\d+ bleu=[\d.]+ chrf=[\d.]+ rouge1=0\.\d+ rouge2=0\.\d+ rougeL=0\.\d+", out), out
