"""DDPM and DDIM equal diffusers' schedulers (betas, add_noise, velocity, timesteps, every step's output
within 1e-6) for the schedules diffusers has; the sigmoid schedule follows Chen 2023's formula."""

from __future__ import annotations

import itertools
import math

import diffusers
import pytest
import torch

from lamina.diffusion.schedulers import DDIMScheduler, DDPMScheduler, NoiseConfig, sigmoid_alpha_bar

SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
KINDS = ["epsilon", "v_prediction", "sample"]


def _pair(cls: str, schedule: str, kind: str, spacing: str = "leading", **kw):  # type: ignore[no-untyped-def]
    ours_cls = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}[cls]
    cfg = NoiseConfig(beta_schedule=schedule, prediction_type=kind, timestep_spacing=spacing)  # type: ignore[arg-type]
    ref_cls = {"ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler}[cls]
    ref = ref_cls(beta_schedule=SCHEDULES[schedule], prediction_type=kind, timestep_spacing=spacing)
    return ours_cls(cfg, **kw), ref


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_forward_process(schedule: str) -> None:
    ours, ref = _pair("ddpm", schedule, "epsilon")
    torch.testing.assert_close(ours.betas, ref.betas, atol=0, rtol=0)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, atol=0, rtol=0)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.velocity(x0, noise, t), ref.get_velocity(x0, noise, t), atol=1e-6, rtol=0)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps(spacing: str) -> None:
    for n in (1, 7, 50, 1000):
        ours, ref = _pair("ddim", "linear", "epsilon", spacing)
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        assert ours.timesteps.tolist() == ref.timesteps.tolist()


@pytest.mark.parametrize(
    ("cls", "schedule", "kind"), list(itertools.product(["ddpm", "ddim"], SCHEDULES, KINDS))
)
def test_steps_equal_diffusers(cls: str, schedule: str, kind: str) -> None:
    for eta in (0.0, 1.0) if cls == "ddim" else (None,):
        kw = {} if eta is None else {"eta": eta}
        ours, ref = _pair(cls, schedule, kind, **kw)
        ours.set_timesteps(20)
        ref.set_timesteps(20)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 3, 8, 8, generator=g)
        ga, gb = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        xa = xb = x
        for t in ours.timesteps.tolist():
            out = torch.randn(2, 3, 8, 8, generator=g)  # a stand-in model output
            xa, x0a = ours.step(out, t, xa, generator=ga)
            extra = {} if eta is None else {"eta": eta}
            res = ref.step(out, t, xb, generator=gb, **extra)
            xb = res.prev_sample
            torch.testing.assert_close(x0a, res.pred_original_sample, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(xa, xb, atol=1e-6, rtol=1e-6)


def test_sigmoid_schedule_follows_its_formula() -> None:
    s = DDPMScheduler(NoiseConfig(beta_schedule="sigmoid", num_train_timesteps=200))
    want = torch.tensor([sigmoid_alpha_bar((i + 1) / 200) for i in range(200)])
    uncapped = s.betas < 0.999
    torch.testing.assert_close(s.alphas_cumprod[uncapped], want[uncapped], atol=1e-5, rtol=1e-4)
    assert sigmoid_alpha_bar(0.0) == pytest.approx(1.0) and sigmoid_alpha_bar(1.0) == pytest.approx(1e-9)
    assert torch.all(s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]) and float(s.betas.max()) <= 0.999 + 1e-6
    mid = 1 / (1 + math.exp(0.0))  # the logistic function at the middle of [-3, 3]
    v0, v1 = 1 / (1 + math.exp(3)), 1 / (1 + math.exp(-3))
    assert sigmoid_alpha_bar(0.5) == pytest.approx((v1 - mid) / (v1 - v0))
