from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_unet import tiny_unet

pytest.importorskip("sklearn")

from lamina.checkpoint.lamina import load_checkpoint
from lamina.config import TrainConfig
from lamina.diffusion import pipelines as P
from lamina.diffusion.data import ImageDataConfig
from lamina.diffusion.evaluate import digit_quality
from lamina.diffusion.schedulers import NoiseConfig
from lamina.diffusion.training import DiffusionConfig, load_model, train_diffusion
from lamina.diffusion.unet import UNet
from lamina.errors import CheckpointError


def test_checkpoint_holds_the_unet_config_ema_and_schedule(digits_run: Path) -> None:
    last = digits_run / "last"
    assert (last / "config.yaml").read_text().startswith("kind: unet\n")
    assert {"model.safetensors", "ema.safetensors", "run.yaml"} <= {p.name for p in last.iterdir()}
    assert (digits_run / "curves.png").is_file() and (digits_run / "report.html").is_file()
    unet, noise, names, factor = load_model(digits_run)
    assert (
        unet.config.num_classes == 10 and unet.config.image_size == 8 and names == [str(i) for i in range(10)]
    )
    assert noise == NoiseConfig(prediction_type="epsilon") and factor == 1  # the default, written out
    assert unet.config.predict_residual is False
    ema, raw = load_file(str(last / "ema.safetensors")), load_file(str(last / "model.safetensors"))
    assert ema.keys() == raw.keys() and any(not torch.equal(ema[k], raw[k]) for k in ema)
    assert torch.equal(unet.state_dict()["conv_in.weight"], ema["conv_in.weight"])
    with pytest.raises(CheckpointError, match="unet"):
        load_checkpoint(last)


def test_guided_samples_are_the_intended_digits(digits_run: Path) -> None:
    """The short version of the README's claim: an untrained model scores ~chance (0.1)."""
    unet, noise, _, _ = load_model(digits_run)
    labels = torch.arange(10).repeat(10)
    x = P.sample(unet, noise, labels=labels, guidance_scale=3.0, steps=20, progress=False)
    q = digit_quality(x, labels, image_size=8)
    assert q.accuracy >= 0.5, q.line()
    torch.manual_seed(0)
    untrained = UNet(unet.config).eval()
    u = digit_quality(P.sample(untrained, noise, labels=labels, guidance_scale=3.0, steps=20, progress=False),
                      labels, image_size=8)  # fmt: skip
    assert u.accuracy < 0.3 and u.frechet_distance > q.frechet_distance, (u.line(), q.line())


def test_resume_continues_exactly_ema_included(tmp_path: Path) -> None:
    def run(out: Path, steps: int, resume: bool = False) -> None:
        train_diffusion(
            tiny_unet(channel_mults=[1]),  # type: ignore[arg-type]
            images=ImageDataConfig(image_size=8),
            train_cfg=TrainConfig(
                out_dir=str(out),
                max_steps=steps,
                batch_size=8,
                lr=1e-3,
                warmup_steps=1,
                save_every=2,
                progress=False,
            ),
            diffusion=DiffusionConfig(ema_decay=0.9),
            resume=resume,
        )

    run(tmp_path / "a", 4)
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # as if stopped after step 2
    for gone in ("checkpoints/step-00000004", "last", "best"):
        shutil.rmtree(tmp_path / "b" / gone)
    run(tmp_path / "b", 4, resume=True)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(tmp_path / "a/last" / name)), load_file(str(tmp_path / "b/last" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_super_resolution_defaults_to_v_prediction_on_the_residual(upscale_run: Path, tmp_path: Path) -> None:
    """A model trained with low_res_factor 2 and the default NoiseConfig predicts v (epsilon's first x0
    estimates fail colour super-resolution) on image - bicubic (SRDiff); a checkpoint saved before the
    predict_residual field loads as a whole-image model."""
    unet, noise, _, factor = load_model(upscale_run)
    assert factor == 2 and noise.prediction_type == "v_prediction" and unet.config.predict_residual is True
    old = tmp_path / "old"
    shutil.copytree(upscale_run / "last", old)
    text = (old / "config.yaml").read_text()
    (old / "config.yaml").write_text(
        "".join(ln for ln in text.splitlines(True) if "predict_residual" not in ln)
    )
    assert "predict_residual" in text and load_model(old)[0].config.predict_residual is False
