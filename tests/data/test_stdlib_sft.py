"""The standard-library instruction set: many functions, disjoint splits, answers in the shape that
``follows_shape`` accepts (and prose it refuses), and the per-step scores of a run's samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lamina.data.stdlib_sft import follows_shape, main, shape_shares, stdlib_functions, stdlib_sft


def test_functions_splits_and_shape(tmp_path: Path) -> None:
    functions = stdlib_functions()
    assert len(functions) > 500
    assert any(f.module == "json" and f.name == "dumps" for f in functions)
    train, held_out = stdlib_sft(50, 10, seed=3)
    assert (train, held_out) == stdlib_sft(50, 10, seed=3)
    asked = [c[0]["content"] for c in train + held_out]
    assert len(set(asked)) == 60
    for c in train + held_out:
        assert [m["role"] for m in c] == ["user", "assistant"] and follows_shape(c[1]["content"])
        assert json.loads(c[1]["content"])["function"] in c[0]["content"]
    assert not follows_shape("The function json.dumps serializes an object.")
    assert not follows_shape('{"module": "json", "summary": "x", "function": "dumps"}')  # key order
    assert not follows_shape('{"module": "json", "function": "dumps", "summary": "unfinished')


def test_main_writes_and_scores(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path), "--train", "4", "--held-out", "2"]) == 0
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 4
    good = json.loads((tmp_path / "held_out.jsonl").read_text().splitlines()[0])["messages"][1]["content"]
    rows = [{"step": 5, "output": "prose"}, {"step": 5, "output": good}, {"step": 9, "output": good}]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert shape_shares(tmp_path / "samples.jsonl") == {5: 0.5, 9: 1.0}
    capsys.readouterr()
    assert main([str(tmp_path), "--score"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "step 5: 50% of the held-out answers in the shape",
        "step 9: 100% of the held-out answers in the shape",
    ]
