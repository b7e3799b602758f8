from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sklearn")

from lamina.diffusion import pipelines as P
from lamina.diffusion.data import digits, resize, split
from lamina.diffusion.files import psnr
from lamina.diffusion.schedulers import NoiseConfig
from lamina.diffusion.training import DiffusionObjective, load_model
from lamina.diffusion.unet import UNet, UNetConfig, resolve_noise
from lamina.errors import ConfigError


@pytest.fixture(scope="module")
def model(digits_run: Path) -> tuple:
    unet, noise, _, _ = load_model(digits_run)
    return unet, noise


@pytest.fixture(scope="module")
def held() -> tuple[torch.Tensor, torch.Tensor]:
    _, h = split(digits(8), 0.1, 0)
    return h.images[:8], h.labels[:8]


def test_same_seed_same_images(model: tuple) -> None:
    unet, noise = model
    y = torch.arange(4)
    for sampler in ("ddim", "ddpm"):
        a = P.sample(
            unet, noise, labels=y, guidance_scale=2.0, sampler=sampler, steps=10, seed=3, progress=False
        )
        b = P.sample(
            unet, noise, labels=y, guidance_scale=2.0, sampler=sampler, steps=10, seed=3, progress=False
        )
        c = P.sample(
            unet, noise, labels=y, guidance_scale=2.0, sampler=sampler, steps=10, seed=4, progress=False
        )
        assert torch.equal(a, b) and not torch.allclose(a, c)
    split_batches = P.sample(unet, noise, labels=y, guidance_scale=2.0, steps=10, seed=3, batch_size=3,
                             progress=False)  # fmt: skip
    assert torch.allclose(split_batches, P.sample(unet, noise, labels=y, guidance_scale=2.0, steps=10, seed=3,
                                                  progress=False), atol=1e-4)  # fmt: skip


def test_guidance_combines_conditional_and_null_outputs(model: tuple) -> None:
    unet, _ = model
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 5, 7])
    cond, null = unet(x, 500, class_labels=y), unet(x, 500, class_labels=torch.full_like(y, 10))
    out = P.predict(unet, x, 500, y, 3.0)
    assert torch.allclose(out, null + 3.0 * (cond - null), atol=1e-5)
    assert torch.allclose(P.predict(unet, x, 500, y, 0.0), null, atol=1e-5)


def test_inpainting_keeps_unmasked_pixels_bit_identical(model: tuple, held: tuple) -> None:
    unet, noise = model
    images, labels = held
    mask = torch.zeros(8, 8)
    mask[:, 4:] = 1
    out = P.inpaint(unet, noise, images, mask, labels, guidance_scale=2.0, steps=10, jump_length=3,
                    jump_n_sample=2, progress=False)  # fmt: skip
    assert torch.equal(out[..., :4], images[..., :4])
    assert not torch.equal(out[..., 4:], images[..., 4:])
    assert out.min() >= -1 and out.max() <= 1


def test_repaint_schedule_goes_back_and_ends_clean() -> None:
    moves = P.repaint_moves(6, jump_length=2, jump_n_sample=3)
    assert moves[-1] == (5, 6) and sum(b < a for a, b in moves) == 2 * 2  # jumps at positions 2 and 4
    assert sum(b > a for a, b in moves) == 6 + 2 * 2 * 2
    assert P.repaint_moves(5, 10, 1) == [(i, i + 1) for i in range(5)]


def test_edit_strength_zero_and_one(model: tuple, held: tuple) -> None:
    unet, noise = model
    images, labels = held
    assert torch.equal(P.edit(unet, noise, images, 0.0, labels), images)
    a = P.edit(unet, noise, images[:4], 1.0, labels[:4], steps=10, seed=1, progress=False)
    b = P.edit(unet, noise, images[4:], 1.0, labels[:4], steps=10, seed=1, progress=False)
    assert torch.equal(a, b)
    half = P.edit(unet, noise, images, 0.3, labels, steps=10, seed=1, progress=False)
    assert (half - images).abs().mean() < (a - images[:4]).abs().mean()
    with pytest.raises(ConfigError):
        P.edit(unet, noise, images, 1.5)


def test_upscaling_beats_bicubic_on_held_out_digits(upscale_run: Path) -> None:
    """The issue's criterion on the 180 held-out digits, 4x4 -> 8x8 (bicubic: 13.3 dB; the residual
    v-prediction model of conftest: ~17 dB; an epsilon model that denoises whole images: ~13.8 dB)."""
    unet, noise, _, factor = load_model(upscale_run)
    assert factor == 2 and unet.config.low_res_channels == 1
    _, h = split(digits(8), 0.1, 0)
    low = resize(h.images, 4)
    up = P.upscale(unet, noise, low, steps=20, progress=False)
    bicubic = F.interpolate(low, size=8, mode="bicubic", align_corners=False).clamp(-1, 1)
    assert psnr(up, h.images) > psnr(bicubic, h.images) + 1.5, (psnr(up, h.images), psnr(bicubic, h.images))


@pytest.mark.parametrize(("residual", "scale"), [(True, 1.0), (True, 4.0), (False, 1.0)])
def test_a_residual_model_adds_the_bicubic_upsample(residual: bool, scale: float) -> None:
    """An untrained x0-predicting UNet outputs zeros (its output convolution starts at zero): a residual
    model's upscale is then bicubic exactly, one image or tiled; a whole-image one's is zero. Its training
    target is the image minus bicubic, times residual_scale."""
    torch.manual_seed(0)
    unet = UNet(UNetConfig(image_size=8, base_channels=16, channel_mults=[1, 2], num_res_blocks=1,
                           attention_levels=[], low_res_channels=1, predict_residual=residual,
                           residual_scale=scale)).eval()  # fmt: skip
    noise = NoiseConfig(prediction_type="sample")
    low = torch.rand(3, 1, 4, 4) - 0.5
    bicubic = F.interpolate(low, size=8, mode="bicubic", align_corners=False).clamp(-1, 1)
    expected = bicubic if residual else torch.zeros(3, 1, 8, 8)
    torch.testing.assert_close(P.upscale(unet, noise, low, steps=3, progress=False), expected)
    big = torch.rand(1, 1, 6, 10) - 0.5  # tiles of 4x4 low-resolution pixels, overlapping
    tiled = P.upscale(unet, noise, big, 2, steps=3, progress=False)
    base = F.interpolate(big, size=(12, 20), mode="bicubic", align_corners=False) if residual else 0 * tiled
    torch.testing.assert_close(tiled, base.clamp(-1, 1))
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    batch = {"images": images, "labels": torch.zeros(4, dtype=torch.long), "low_res": resize(images, 4)}
    loss, _ = DiffusionObjective(noise, None, unet=unet.config)(unet.train(), batch)
    target = images - F.interpolate(batch["low_res"], size=8, mode="bicubic", align_corners=False)
    torch.testing.assert_close(loss, (target * scale if residual else images).pow(2).mean())


def test_the_clip_range_follows_the_residual_scale() -> None:
    """The predicted x0 of a residual model is (image - bicubic) x residual_scale, in [-2 s, 2 s]: the auto
    clip_sample_range is 2 s (1 for images and whole-image SR models; a given range is kept). An x0-predicting
    model whose output is 3 (residual 0.75 at s = 4) upscales to bicubic + 0.75 (0.25 if clipped at 1)."""
    sr = UNetConfig(image_size=8, base_channels=16, channel_mults=[1, 2], num_res_blocks=1, attention_levels=[],
                    low_res_channels=1, predict_residual=True, residual_scale=4.0)  # fmt: skip
    assert resolve_noise(NoiseConfig(), sr) == NoiseConfig(
        prediction_type="v_prediction", clip_sample_range=8.0
    )
    assert resolve_noise(NoiseConfig(clip_sample_range=4.0), sr).clip_sample_range == 4.0
    assert (
        resolve_noise(NoiseConfig(), UNetConfig(low_res_channels=1, predict_residual=False)).clip_sample_range
        == 1
    )
    assert resolve_noise(NoiseConfig(), UNetConfig()) == NoiseConfig(
        prediction_type="epsilon", clip_sample_range=1
    )
    unet = UNet(sr).eval()
    torch.nn.init.constant_(unet.conv_out.bias, 3.0)
    low = torch.rand(2, 1, 4, 4) * 0.2 - 0.1
    up = P.upscale(unet, NoiseConfig(prediction_type="sample"), low, steps=2, progress=False)
    torch.testing.assert_close(up, F.interpolate(low, size=8, mode="bicubic", align_corners=False) + 0.75)


def test_tiled_upscaling_of_larger_images_beats_bicubic(upscale_run: Path) -> None:
    """Images larger than the model's (2x2 mosaics of held-out digits) are upscaled in tiles: tiles on
    the digits (no overlap) beat bicubic as one digit does; one tile is the model-size path; overlapping
    tiles and an image smaller than a tile keep the shape."""
    unet, noise, _, factor = load_model(upscale_run)
    _, h = split(digits(8), 0.1, 0)
    low = resize(h.images[:3], 4)
    one_tile = P.upscale(unet, noise, low, factor, steps=5, progress=False)
    assert torch.allclose(one_tile, P.upscale(unet, noise, low, steps=5, progress=False), atol=1e-5)
    a, b, c, d = h.images[:64].chunk(4)  # (16, 1, 8, 8) each
    mosaic = torch.cat([torch.cat([a, b], dim=-1), torch.cat([c, d], dim=-1)], dim=-2)  # (16, 1, 16, 16)
    low = resize(mosaic, 8)
    up = P.upscale(unet, noise, low, factor, overlap=0.0, steps=20, progress=False, batch_size=7)
    bicubic = F.interpolate(low, size=16, mode="bicubic", align_corners=False).clamp(-1, 1)
    assert psnr(up, mosaic) > psnr(bicubic, mosaic) + 1.5, (psnr(up, mosaic), psnr(bicubic, mosaic))
    assert P.upscale(unet, noise, low[:2, :, :7, :6], factor, steps=2, progress=False).shape == (2, 1, 14, 12)
    assert P.upscale(unet, noise, low[:1, :, :3, :2], factor, steps=2, progress=False).shape == (1, 1, 6, 4)
    with pytest.raises(ConfigError, match="factor"):
        P.upscale(unet, noise, low, 3)
