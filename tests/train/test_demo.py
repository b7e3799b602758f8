"""The demo's report reads as a person would write it: no "-2% below", no curves.png that is not there,
and the wall time at the end."""

from __future__ import annotations

from pathlib import Path

import pytest

from lamina.train.demo import DemoResult, report


@pytest.mark.parametrize(
    ("final", "says"),
    [
        (4.0, "final validation loss is 20% below the unigram baseline"),
        (5.1, "final validation loss is 2% above the unigram baseline: train for more steps"),
        (5.01, "final validation loss is level with the unigram baseline: train for more steps"),
    ],
)
def test_report_words_the_baseline_comparison(tmp_path: Path, final: float, says: str) -> None:
    res = DemoResult(5.0, [(50, 6.0), (100, final)], ["def f():"], tmp_path, seconds=183.4)
    text = report(res)
    assert says in text and " is -" not in text
    assert text.splitlines()[-1] == "done in 183 s"


def test_report_names_curves_png_only_when_it_exists(tmp_path: Path) -> None:
    res = DemoResult(5.0, [(100, 4.0)], [], tmp_path, seconds=1.0)
    assert "and curves.png" not in report(res) and "pip install 'lamina[train]'" in report(res)
    (tmp_path / "curves.png").write_bytes(b"\x89PNG")
    assert f"checkpoints, metrics.jsonl and curves.png: {tmp_path}" in report(res)
