"""Noise schedulers: DDPM (Ho et al. 2020) and DDIM (Song et al. 2021), with ``set_timesteps``, ``step`` and
``add_noise`` as in diffusers, whose DDPMScheduler and DDIMScheduler give the same outputs (tests check
1e-6 for the schedules both have).

    sched = DDIMScheduler(NoiseConfig(beta_schedule="cosine"), eta=0.0)
    sched.set_timesteps(50)
    x = torch.randn(B, C, H, W, generator=g)
    for t in sched.timesteps:
        x, x0 = sched.step(model(x, t), int(t), x, generator=g)

Beta schedules (``num_train_timesteps`` T):

* ``linear``: betas evenly spaced from ``beta_start`` to ``beta_end`` (Ho et al. 2020);
* ``scaled_linear``: the square roots evenly spaced (latent diffusion);
* ``cosine``: alpha_bar(t) = cos(((t + 0.008) / 1.008) pi/2)^2, betas capped at 0.999 (Nichol & Dhariwal
  2021; diffusers' ``squaredcos_cap_v2``);
* ``sigmoid``: alpha_bar(t) = (v_end - s((t (end - start) + start) / tau)) / (v_end - v_start) with s the
  logistic function, start=-3, end=3, tau=1 (Chen 2023, "On the importance of noise scheduling for
  diffusion models", algorithm 1), betas from alpha_bar as for cosine. (diffusers' ``sigmoid`` is another
  one, GeoDiff's sigmoid of the betas.)

Prediction types: ``epsilon`` (the noise), ``v_prediction`` (v = sqrt(abar) eps - sqrt(1 - abar) x0,
Salimans & Ho 2022) and ``sample`` (x0). Timesteps are integers in [0, T); a sample at t is
``sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from lamina.errors import ConfigError

Prediction = Literal["epsilon", "v_prediction", "sample"]  # what a model's output is read as


@dataclass
class NoiseConfig:
    """The forward process and how the model's output is read (the ``--noise.*`` flags)."""

    num_train_timesteps: int = 1000  # T: noise levels of the forward process
    beta_schedule: Literal["linear", "scaled_linear", "cosine", "sigmoid"] = "cosine"  # betas over t
    beta_start: float = 1e-4  # linear / scaled_linear: beta at t = 0
    beta_end: float = 0.02  # linear / scaled_linear: beta at t = T - 1
    prediction_type: Prediction | None = None  # none: v_prediction when low_res_factor > 1, else epsilon
    clip_sample: bool = True  # clamp the predicted x0 to +-clip_sample_range when sampling
    clip_sample_range: float | None = None  # none: 1 (images), 2 x residual_scale for residual SR models
    timestep_spacing: Literal["leading", "trailing", "linspace"] = "leading"  # sampling steps over [0, T)

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 2:
            raise ConfigError(f"num_train_timesteps={self.num_train_timesteps} must be >= 2")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ConfigError(f"need 0 < beta_start ({self.beta_start}) < beta_end ({self.beta_end}) < 1")


def _betas_from_alpha_bar(alpha_bar: Callable[[float], float], n: int, max_beta: float = 0.999) -> Tensor:
    """Betas whose cumulative product follows ``alpha_bar`` (t in [0, 1]), capped at ``max_beta``."""
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def sigmoid_alpha_bar(t: float, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> float:
    """Chen 2023's sigmoid schedule: alpha_bar at t in [0, 1], from 1 at t=0 down to 0 at t=1."""

    def s(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    v_start, v_end = s(start / tau), s(end / tau)
    return max((v_end - s((t * (end - start) + start) / tau)) / (v_end - v_start), 1e-9)


def make_betas(cfg: NoiseConfig) -> Tensor:
    """The T betas (float32) of ``cfg.beta_schedule``."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    if cfg.beta_schedule == "scaled_linear":
        return torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float32) ** 2
    if cfg.beta_schedule == "cosine":
        return _betas_from_alpha_bar(lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2, n)
    return _betas_from_alpha_bar(sigmoid_alpha_bar, n)


class _Scheduler:
    """What DDPM and DDIM share: the schedule, the forward process and the sampling timesteps."""

    def __init__(self, cfg: NoiseConfig | None = None) -> None:
        cfg = cfg or NoiseConfig()  # auto fields as for an image model (unet.resolve_noise for others)
        self.cfg = replace(cfg, prediction_type=cfg.prediction_type or "epsilon",
                           clip_sample_range=1.0 if cfg.clip_sample_range is None else cfg.clip_sample_range)  # fmt: skip
        self.betas = make_betas(self.cfg)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # (T,) abar_t
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(self.cfg.num_train_timesteps).flip(0)  # every t, T-1 first

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose ``num_inference_steps`` timesteps (descending) for sampling, spaced as ``timestep_spacing``."""
        T = self.cfg.num_train_timesteps
        if not 1 <= num_inference_steps <= T:
            raise ConfigError(
                f"num_inference_steps={num_inference_steps} must be in 1..{T} (num_train_timesteps)"
            )
        self.num_inference_steps = num_inference_steps
        if self.cfg.timestep_spacing == "linspace":
            ts = np.linspace(0, T - 1, num_inference_steps).round()[::-1].copy().astype(np.int64)
        elif self.cfg.timestep_spacing == "leading":
            ts = (
                (np.arange(0, num_inference_steps) * (T // num_inference_steps))
                .round()[::-1]
                .copy()
                .astype(np.int64)
            )
        else:
            ts = np.round(np.arange(T, 0, -T / num_inference_steps)).astype(np.int64) - 1
        self.timesteps = torch.from_numpy(ts)

    def previous_timestep(self, t: int) -> int:
        """The timestep sampled after ``t`` (-1 after the last)."""
        if self.num_inference_steps is None:
            return t - 1
        idx = int((self.timesteps == t).nonzero()[0, 0])
        return int(self.timesteps[idx + 1]) if idx + 1 < len(self.timesteps) else -1

    def _abar(self, t: int | Tensor, like: Tensor) -> Tensor:
        a = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)[
            torch.as_tensor(t, device=like.device)
        ]
        return a.reshape(-1, *([1] * (like.dim() - 1))) if a.dim() else a

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The forward process: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``; x0 and noise (B, ...), t (B,)."""
        a = self._abar(t, x0)
        return a**0.5 * x0 + (1 - a) ** 0.5 * noise

    def velocity(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The v-prediction target ``sqrt(abar_t) noise - sqrt(1 - abar_t) x0``."""
        a = self._abar(t, x0)
        return a**0.5 * noise - (1 - a) ** 0.5 * x0

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the model learns to predict at ``t`` for ``prediction_type``."""
        if self.cfg.prediction_type == "epsilon":
            return noise
        if self.cfg.prediction_type == "v_prediction":
            return self.velocity(x0, noise, t)
        return x0

    def _x0_and_eps(self, model_output: Tensor, a: Tensor, sample: Tensor) -> tuple[Tensor, Tensor]:
        b = 1 - a
        kind = self.cfg.prediction_type
        if kind == "epsilon":
            x0, eps = (sample - b**0.5 * model_output) / a**0.5, model_output
        elif kind == "v_prediction":
            x0, eps = a**0.5 * sample - b**0.5 * model_output, a**0.5 * model_output + b**0.5 * sample
        else:
            x0, eps = model_output, (sample - a**0.5 * model_output) / b**0.5
        if self.cfg.clip_sample and self.cfg.clip_sample_range is not None:  # set by __init__
            x0 = x0.clamp(-self.cfg.clip_sample_range, self.cfg.clip_sample_range)
        return x0, eps


class DDPMScheduler(_Scheduler):
    """Ancestral sampling of Ho et al. 2020 (eq. 7 mean, the "fixed_small" posterior variance)."""

    def step(
        self, model_output: Tensor, t: int, sample: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """x_t (B, C, H, W) and the model's output at ``t`` -> (x_prev, predicted x0). Noise is drawn with
        ``torch.randn(..., generator=generator)`` (none at t = 0)."""
        prev = self.previous_timestep(t)
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else torch.tensor(1.0)
        b_t, b_prev = 1 - a_t, 1 - a_prev
        cur_alpha = a_t / a_prev
        cur_beta = 1 - cur_alpha
        x0, _ = self._x0_and_eps(model_output, a_t, sample)
        mean = (a_prev**0.5 * cur_beta) / b_t * x0 + cur_alpha**0.5 * b_prev / b_t * sample
        if t > 0:
            var = torch.clamp(b_prev / b_t * cur_beta, min=1e-20)
            noise = torch.randn(model_output.shape, generator=generator, dtype=model_output.dtype)
            mean = mean + var**0.5 * noise.to(model_output.device)
        return mean, x0


class DDIMScheduler(_Scheduler):
    """Song et al. 2021: deterministic for ``eta = 0``, DDPM-like noise for ``eta = 1``."""

    def __init__(
        self,
        cfg: NoiseConfig | None = None,
        eta: float = 0.0,
        set_alpha_to_one: bool = True,
        use_clipped_model_output: bool = False,
    ) -> None:
        """``use_clipped_model_output``: with ``clip_sample``, step along the noise re-derived from the
        clipped x0 (diffusers' ``step(..., use_clipped_model_output=True)``); keeps strongly guided
        samples consistent with their clipped x0."""
        super().__init__(cfg)
        if not 0 <= eta <= 1:
            raise ConfigError(f"eta={eta} must be in [0, 1]")
        self.eta = eta
        self.use_clipped_model_output = use_clipped_model_output
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]

    def step(
        self, model_output: Tensor, t: int, sample: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """x_t and the model's output at ``t`` -> (x_prev, predicted x0) (Song et al. eq. 12)."""
        if self.num_inference_steps is None:
            raise ConfigError("call set_timesteps(n) before sampling with DDIM")
        prev = t - self.cfg.num_train_timesteps // self.num_inference_steps
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        x0, eps = self._x0_and_eps(model_output, a_t, sample)
        if self.use_clipped_model_output:
            eps = (sample - a_t**0.5 * x0) / (1 - a_t) ** 0.5
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = self.eta * var**0.5
        out = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
        if self.eta > 0:
            noise = torch.randn(model_output.shape, generator=generator, dtype=model_output.dtype)
            out = out + std * noise.to(model_output.device)
        return out, x0
