"""The training verbs print the run's summary line on rank 0 only (under torchrun every rank runs them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import lamina.cli.finetune
import lamina.cli.pretrain
from lamina.cli.main import main
from lamina.train.trainer import TrainResult


@pytest.mark.parametrize("verb", ["pretrain", "finetune"])
@pytest.mark.parametrize("is_main", [True, False])
def test_only_rank_0_prints_the_summary(
    verb: str,
    is_main: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = TrainResult(steps=3, final_loss=1.5, best_val_loss=None, out_dir=tmp_path, is_main=is_main)

    def fake(*args: Any, **kwargs: Any) -> tuple[None, None, TrainResult]:
        return None, None, result

    monkeypatch.setattr(getattr(lamina.cli, verb), verb, fake)
    extra = ["--model.preset", "t5-tiny"] if verb == "finetune" else []
    assert main([verb, "--out", str(tmp_path), *extra]) == 0
    printed = capsys.readouterr().out
    assert ("trained 3 steps" in printed) == is_main
