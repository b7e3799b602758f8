"""A shortened demo learns (beats the unigram baseline); its report reads as a person would write it: no
"-2% below", no curves.png that is not there, and the wall time at the end."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lamina.train.demo import DemoResult, demo, demo_run, report


@pytest.mark.slow
def test_shortened_demo_learns(tmp_path: Path) -> None:
    # A few dozen steps of a shortened demo: it must clearly beat the unigram baseline (the full 300-step
    # demo reaches the 20% margin, measured and recorded in the issue). 80 steps on 64-token sequences
    # with 2 of the demo's 4 blocks: 14% (1 thread, ~15 s CPU; the 4 blocks on 128 tokens: 12% in ~57 s);
    # with lr 0 the final loss stays above the baseline (an untrained model: ln 1024 > unigram), so it fails.
    run = demo_run(
        tmp_path, steps=80, max_bytes=400_000, vocab_size=1024, seq_len=64, eval_every=40, progress=False
    )
    run.model.n_layers = 2
    res = demo(run, samples=2, max_new_tokens=16)
    assert res.final_val_loss < 0.9 * res.unigram_loss, (res.final_val_loss, res.unigram_loss)
    assert res.val_losses[-1][1] < res.val_losses[0][1]
    assert all(s.startswith(("def ", "import os")) and len(s) > 6 for s in res.samples)
    assert math.isfinite(res.unigram_loss)


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
