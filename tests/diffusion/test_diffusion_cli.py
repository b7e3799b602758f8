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


def _colour_folder(root: Path) -> Path:
    """A user's folder: class sub-folders red/ and blue/ of 24 RGB images each, of mixed sizes (not
    square), with noise and a lighter square at a random place."""
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(0)
    for name, channel in (("blue", 2), ("red", 0)):
        (root / name).mkdir(parents=True)
        for i in range(24):
            h, w = (10, 13) if i % 2 else (12, 9)
            a = g.integers(0, 60, (h, w, 3))
            a[..., channel] += 150
            top, left = g.integers(0, h - 4), g.integers(0, w - 4)
            a[top : top + 4, left : left + 4] += 40
            Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(
                root / name / f"{i}.{'jpg' if i % 3 else 'png'}"
            )
    return root


def test_a_colour_image_folder_trains_samples_and_exports_by_class(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user's folder of colour photos (class sub-folders, JPEG and PNG, not square) -> train (RGB,
    class-conditional from the sub-folders, held-out images from the folder) -> an RGB grid and
    synthetic images in the folder's class names."""
    from PIL import Image

    from lamina.diffusion.data import image_folder
    from lamina.diffusion.training import load_model

    folder, run = _colour_folder(tmp_path / "photos"), tmp_path / "run"
    argv = ["diffusion", "train", "--images.dataset", str(folder), "--images.image_size", "8", "--unet.channel_mults",
            "[1]", "--unet.base_channels", "8", "--unet.attention_levels", "[]", "--train.max_steps", "3",
            "--train.batch_size", "8", "--train.progress", "false", "--out", str(run)]  # fmt: skip
    assert main(argv) == 0 and "trained 3 steps" in capsys.readouterr().out
    assert (run / "last/ema.safetensors").is_file()
    unet, _, names, _ = load_model(run)
    assert (unet.config.in_channels, unet.config.num_classes, names) == (3, 2, ["blue", "red"])
    grid = tmp_path / "grid.png"
    assert (
        main(["diffusion", "sample", str(run), *FAST, "--nrow", "5", "--scale", "1", "--out", str(grid)]) == 0
    )
    assert Image.open(grid).mode == "RGB" and Image.open(grid).size == (5 * 9 + 1, 2 * 9 + 1)
    out = tmp_path / "synthetic"
    assert main(["diffusion", "export", str(run), "--steps", "2", "--no-progress", "--num-images", "6",
                 "--out", str(out)]) == 0  # fmt: skip
    made = image_folder(out, image_size=8)
    assert made.class_names == ["blue", "red"] and made.images.shape == (6, 3, 8, 8)
    assert made.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_upscale_enlarges_a_users_own_files(
    upscale_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A low-resolution file is enlarged as it is (not downsampled first): 7x5 -> 14x10; a folder gives
    one PNG per image."""
    from PIL import Image

    (tmp_path / "in").mkdir()
    for name, size in (("a.png", (7, 5)), ("b.jpg", (9, 12))):
        Image.new("RGB", size, (200, 30, 30)).save(tmp_path / "in" / name)
    out = tmp_path / "big.png"
    assert main(["diffusion", "upscale", str(upscale_run), *FAST, "--input", str(tmp_path / "in/a.png"),
                 "--out", str(out)]) == 0  # fmt: skip
    assert Image.open(out).size == (14, 10) and Image.open(out).mode == "L"  # the model's channels
    assert main(["diffusion", "upscale", str(upscale_run), *FAST, "--input", str(tmp_path / "in"),
                 "--out", str(tmp_path / "big")]) == 0  # fmt: skip
    assert [Image.open(tmp_path / "big" / n).size for n in ("a.png", "b.png")] == [(14, 10), (18, 24)]
    assert main(["diffusion", "upscale", str(tmp_path), *FAST, "--input", str(out)]) == 1
    # out inside input: a rerun skips its own results
    assert main(["diffusion", "upscale", str(upscale_run), *FAST, "--input", str(tmp_path / "in"),
                 "--out", str(tmp_path / "in" / "big")]) == 0  # fmt: skip
    assert main(["diffusion", "upscale", str(upscale_run), *FAST, "--input", str(tmp_path / "in"),
                 "--out", str(tmp_path / "in" / "big")]) == 0  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "in" / "big").rglob("*")) == ["a.png", "b.png"]
    Image.new("L", (3000, 3000)).save(tmp_path / "huge.png")
    assert main(["diffusion", "upscale", str(upscale_run), *FAST, "--input", str(tmp_path / "huge.png"),
                 "--out", str(tmp_path / "huge-big.png")]) == 1  # fmt: skip
    assert "over the limit of 16,777,216" in capsys.readouterr().err
