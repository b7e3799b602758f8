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
from lamina.errors import CheckpointError, ConfigError


def test_checkpoint_holds_the_unet_config_ema_and_schedule(digits_run: Path) -> None:
    last = digits_run / "last"
    assert (last / "config.yaml").read_text().startswith("kind: unet\n")
    assert {"model.safetensors", "ema.safetensors", "run.yaml"} <= {p.name for p in last.iterdir()}
    assert (digits_run / "curves.png").is_file() and (digits_run / "report.html").is_file()
    unet, noise, names, factor = load_model(digits_run)
    assert (
        unet.config.num_classes == 10 and unet.config.image_size == 8 and names == [str(i) for i in range(10)]
    )
    assert noise == NoiseConfig(prediction_type="epsilon", clip_sample_range=1.0) and factor == 1  # resolved
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
    assert noise.clip_sample_range == 2.0  # the residual's range, |image - bicubic| <= 2
    old = tmp_path / "old"
    shutil.copytree(upscale_run / "last", old)
    text = (old / "config.yaml").read_text()
    (old / "config.yaml").write_text(
        "".join(ln for ln in text.splitlines(True) if "predict_residual" not in ln)
    )
    assert "predict_residual" in text and load_model(old)[0].config.predict_residual is False


def _strip(path: Path, *names: str) -> None:
    text = path.read_text()
    assert all(f"{n}:" in text for n in names), (path, names)
    path.write_text("".join(ln for ln in text.splitlines(True) if not ln.strip().startswith(names)))


def test_resume_keeps_the_objective_of_a_checkpoint_that_predates_the_auto_fields(
    upscale_run: Path, tmp_path: Path
) -> None:
    """An SR run saved before predict_residual and the auto prediction_type (epsilon on whole images)
    resumes as it was trained, not as today's defaults (v on the residual); a flag contradicting the
    checkpoint is refused, and so is predict_residual on a model that does not super-resolve."""
    run = tmp_path / "run"
    shutil.copytree(upscale_run, run, ignore=shutil.ignore_patterns("last", "best", "tensorboard"))
    (ckpt,) = (run / "checkpoints").iterdir()
    _strip(ckpt / "config.yaml", "predict_residual", "residual_scale")
    _strip(ckpt / "run.yaml", "predict_residual", "residual_scale", "prediction_type", "clip_sample_range")

    def resume(unet: object, noise: NoiseConfig | None = None) -> None:  # conftest's run, one step more
        train_diffusion(unet, noise, ImageDataConfig(image_size=8),  # type: ignore[arg-type]
                        TrainConfig(out_dir=str(run), max_steps=251, batch_size=64, lr=3e-3, weight_decay=0.0,
                                    warmup_steps=20, eval_every=251, save_every=251, progress=False, seed=0),
                        DiffusionConfig(low_res_factor=2, class_conditional=False), resume=True)  # fmt: skip

    with pytest.raises(
        ConfigError, match=r"noise.prediction_type v_prediction contradicts .*trained with epsilon"
    ):
        resume(tiny_unet(), NoiseConfig(prediction_type="v_prediction"))
    with pytest.raises(ConfigError, match=r"unet.predict_residual true contradicts .*trained with false"):
        resume(tiny_unet(predict_residual=True))
    with pytest.raises(ConfigError, match="predict_residual true needs a super-resolution model"):
        train_diffusion(tiny_unet(predict_residual=True), images=ImageDataConfig(image_size=8),  # type: ignore[arg-type]
                        train_cfg=TrainConfig(out_dir=str(tmp_path / "new"), max_steps=1))  # fmt: skip
    resume(tiny_unet())
    unet, noise, _, _ = load_model(run)
    assert noise.prediction_type == "epsilon" and noise.clip_sample_range == 1.0
    assert unet.config.predict_residual is False
