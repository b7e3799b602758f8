"""``lamina diffusion ...`` (lamina/cli/diffusion.py) over the session's trained digits model."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("sklearn")

from lamina.cli.main import main

FAST = ["--steps", "4", "--no-progress", "--num-images", "10"]


def test_sample_writes_a_grid_and_evaluates(
    digits_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "grid.png"
    assert main(["diffusion", "sample", str(digits_run), *FAST, "--out", str(out), "--evaluate"]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and "wrote 10 samples" in printed and "intended-class accuracy" in printed


def test_export_writes_labeled_class_folders(digits_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "synthetic"
    argv = ["diffusion", "export", str(digits_run), "--steps", "4", "--no-progress", "--num-images", "20"]
    assert main([*argv, "--out", str(out)]) == 0
    folders = sorted(p.name for p in out.iterdir())
    assert folders == [str(i) for i in range(10)] and all(
        len(list((out / f).iterdir())) == 2 for f in folders
    )


@pytest.mark.parametrize("action", ["inpaint", "edit", "upscale"])
def test_image_verbs(action: str, digits_run: Path, upscale_run: Path, tmp_path: Path,
                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    run = upscale_run if action == "upscale" else digits_run
    assert main(["diffusion", action, str(run), *FAST, "--out", str(tmp_path / "g.png")]) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "g.png").is_file()
    if action == "upscale":
        assert "bicubic" in printed


def test_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diffusion", "sample", str(tmp_path), *FAST]) == 1
    err = capsys.readouterr().err
    assert "not a diffusion checkpoint" in err and err.count("\n") == 1


def test_train_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["diffusion", "train", "--images.image_size", "8", "--unet.channel_mults", "[1]", "--unet.base_channels",
            "8", "--unet.attention_levels", "[]", "--train.max_steps", "2", "--train.batch_size", "8",
            "--train.progress", "false", "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert (tmp_path / "run/last/ema.safetensors").is_file()
