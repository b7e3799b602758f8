"""Session-scoped diffusion runs on 8x8 digits, trained once and shared by the diffusion tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import sklearn  # noqa: F401  (the test extra installs it: a missing one fails, never skips)
from tiny_unet import tiny_unet


def _train(out: Path, steps: int, low_res_factor: int = 1) -> Path:
    from lamina.config import TrainConfig
    from lamina.diffusion.data import ImageDataConfig
    from lamina.diffusion.training import DiffusionConfig, train_diffusion

    train_diffusion(
        tiny_unet(),  # type: ignore[arg-type]
        images=ImageDataConfig(image_size=8),
        train_cfg=TrainConfig(out_dir=str(out), max_steps=steps, batch_size=64, lr=3e-3, weight_decay=0.0,
                              warmup_steps=20, eval_every=steps, save_every=steps, progress=False, seed=0),
        diffusion=DiffusionConfig(low_res_factor=low_res_factor, class_conditional=low_res_factor == 1),
    )  # fmt: skip
    return out


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A class-conditional UNet trained 300 steps on 8x8 digits (EMA 0.999, p_uncond 0.1)."""
    return _train(tmp_path_factory.mktemp("digits"), 300)


@pytest.fixture(scope="session")
def upscale_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A super-resolution UNet (4x4 -> 8x8 digits) trained 250 steps (the defaults: v-prediction of the
    residual over bicubic)."""
    return _train(tmp_path_factory.mktemp("upscale"), 250, low_res_factor=2)
