"""Finding MODEL: a path, the models directory, a packaged name; and what a wrong path is told."""

from __future__ import annotations

from pathlib import Path

import pytest

from lamina.checkpoint.registry import resolve
from lamina.errors import ModelNotFoundError


def test_a_training_run_folder_points_at_its_checkpoints(tmp_path: Path) -> None:
    """`lamina generate OUT` on a pretrain/finetune --out folder names OUT/best and OUT/last, the
    checkpoints inside it, instead of only listing what a model folder holds."""
    run = tmp_path / "gpt"
    for sub in ("best", "last", "checkpoints"):
        (run / sub).mkdir(parents=True)
    for sub in ("best", "last"):
        (run / sub / "config.yaml").write_text("arch: decoder\n")
    with pytest.raises(ModelNotFoundError, match="is a training run, not a model") as e:
        resolve(run)
    assert str(e.value).endswith(f"{run / 'best'} or {run / 'last'}")
    assert resolve(run / "last").format == "lamina"
    (run / "best" / "config.yaml").unlink()
    with pytest.raises(ModelNotFoundError, match=r"checkpoints, \S+last$"):
        resolve(run)
    with pytest.raises(ModelNotFoundError, match="exists but is not a model"):
        resolve(run / "checkpoints")  # an empty folder: the general message
