"""Training a diffusion UNet on lamina's one trainer, and loading it back.

    model, result = train_diffusion(images=ImageDataConfig("digits"), train_cfg=TrainConfig(max_steps=3000, ...))

The objective (Ho et al. 2020, algorithm 1): draw t uniformly in [0, T), noise eps ~ N(0, I), and regress
the UNet's output at x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps on the scheduler's ``target`` (eps, v
or x0) with a mean squared error. For classifier-free guidance (Ho & Salimans 2022) each label is
replaced by the null class (index ``num_classes``) with probability ``p_uncond``. Noise, timesteps and
dropped labels come from torch's global generator, which the trainer seeds and restores on resume.

A checkpoint folder holds ``config.yaml`` (the UNetConfig, ``kind: unet``), ``model.safetensors``,
``ema.safetensors`` (the moving average the pipelines sample with) and ``run.yaml`` (every section,
the noise schedule and the class names included).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lamina.config import TrainConfig, from_dict
from lamina.diffusion.data import ImageBatches, ImageDataConfig, load_images, split
from lamina.diffusion.schedulers import DDPMScheduler, NoiseConfig
from lamina.diffusion.unet import UNet, UNetConfig, residual_base, resolve_noise
from lamina.errors import CheckpointError, ConfigError
from lamina.fields import parse_yaml
from lamina.train.trainer import EMA_FILE, TrainResult, latest_checkpoint, read_run_config, train


@dataclass
class DiffusionConfig:
    """How the denoiser is trained (the ``--diffusion.*`` flags); the UNet's image_size, in_channels and
    num_classes come from the data."""

    class_conditional: bool | None = None  # use the labels (guidance); None: labelled, not upscaling
    p_uncond: float = 0.1  # probability a label is dropped to the null class while training (guidance)
    ema_decay: float | None = 0.999  # moving average of the weights, used for sampling (None: off)
    low_res_factor: int = 1  # > 1: a super-resolution model conditioned on images downsampled this much

    def __post_init__(self) -> None:
        if not 0 <= self.p_uncond < 1:
            raise ConfigError(f"p_uncond={self.p_uncond} must be in [0, 1)")
        if self.low_res_factor < 1:
            raise ConfigError(f"low_res_factor={self.low_res_factor} must be >= 1")


class DiffusionObjective:
    """(model, batch) -> (mean squared error on the scheduler's target, images). ``batch``: ``images``
    (B, C, H, W) in [-1, 1], ``labels`` (B,), optionally ``low_res`` (B, C, h, w)."""

    def __init__(self, noise: NoiseConfig, num_classes: int | None, p_uncond: float = 0.1,
                 unet: UNetConfig | None = None) -> None:  # fmt: skip
        self.scheduler = DDPMScheduler(noise if unet is None else resolve_noise(noise, unet))
        self.num_classes, self.p_uncond, self.unet = num_classes, p_uncond, unet

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        x0 = batch["images"]
        if self.unet is not None:
            base = residual_base(self.unet, batch.get("low_res"), x0.shape[-2:])
            if base is not None:  # SRDiff: the diffusion runs on what bicubic misses
                x0 = (x0 - base) * self.unet.residual_scale
        b = x0.shape[0]
        t = torch.randint(0, self.scheduler.cfg.num_train_timesteps, (b,), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = self.scheduler.add_noise(x0, noise, t)
        labels = None
        if self.num_classes is not None:
            drop = torch.rand(b, device=x0.device) < self.p_uncond
            labels = torch.where(drop, torch.full_like(batch["labels"], self.num_classes), batch["labels"])
        out = model(x_t, t, class_labels=labels, low_res=batch.get("low_res"))
        return F.mse_loss(out.float(), self.scheduler.target(x0, noise, t).float()), b


def train_diffusion(
    unet: UNetConfig | None = None,
    noise: NoiseConfig | None = None,
    images: ImageDataConfig | None = None,
    train_cfg: TrainConfig | None = None,
    diffusion: DiffusionConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
) -> tuple[UNet, TrainResult]:
    """Train a UNet on ``images`` with lamina's trainer (checkpoints, exact resume, EMA, plots,
    report.html in ``train_cfg.out_dir``); validation loss on the held-out split. Returns the trained
    model (its EMA weights when ``ema_decay`` is set) and the run's summary.
    Auto (None) fields resolve for the model (``resolve_noise``; ``predict_residual`` on for
    super-resolution), or, with ``resume``, to what the run's checkpoint was trained with.
    Raises ``ConfigError`` for unlabelled data with ``class_conditional`` true, for a UNet shape that
    does not fit the images, for ``predict_residual`` without ``low_res_factor`` > 1, and on resume for a
    ``predict_residual``, ``residual_scale`` or ``prediction_type`` that contradicts the checkpoint.
    On CPU, ``lamina diffusion train`` first sets ``lamina.malloc.set_malloc_policy("keep_freed")`` (no
    page faults for every step's activations); this function leaves the process's allocator alone."""
    noise, data, diffusion = (
        noise or NoiseConfig(),
        images or ImageDataConfig(),
        diffusion or DiffusionConfig(),
    )
    train_cfg = train_cfg or TrainConfig()
    dataset = load_images(data)
    conditional = diffusion.class_conditional
    if conditional is None:
        conditional = dataset.num_classes is not None and diffusion.low_res_factor == 1
    if conditional and dataset.num_classes is None:
        raise ConfigError(f"{data.dataset} has no class folders: use --diffusion.class_conditional false")
    c, sr = dataset.images.shape[1], diffusion.low_res_factor > 1
    unet = unet or UNetConfig()
    if resume and (ckpt := latest_checkpoint(train_cfg.out_dir)) is not None:  # none: train() says so
        unet, noise = _as_trained(ckpt, unet, noise)
    if unet.predict_residual and not sr:
        raise ConfigError("predict_residual true needs a super-resolution model: set --diffusion.low_res_factor "
                          "> 1 or leave --unet.predict_residual out")  # fmt: skip
    unet = replace(unet, image_size=data.image_size, in_channels=c,
                   num_classes=dataset.num_classes if conditional else None, low_res_channels=c if sr else 0,
                   predict_residual=sr and unet.predict_residual is not False)  # fmt: skip
    # epsilon's first x0 estimates wreck colour super-resolution: v_prediction there (resolve_noise)
    noise = resolve_noise(noise, unet)
    train_set, held_out = split(dataset, data.held_out_fraction, data.seed)
    batches = ImageBatches(train_set, train_cfg.batch_size, data.seed, diffusion.low_res_factor)
    val = batches.held_out(held_out) if len(held_out) else None
    torch.manual_seed(train_cfg.seed)
    model = UNet(unet)
    run_config: dict[str, Any] = {
        "unet": asdict(unet),
        "noise": asdict(noise),
        "images": asdict(data),
        "train": asdict(train_cfg),
        "diffusion": asdict(diffusion),
        "class_names": dataset.class_names,
    }
    objective = DiffusionObjective(noise, unet.num_classes, diffusion.p_uncond, unet)
    result = train(model, train_cfg, batches, objective, (lambda: val) if val else None,
                   tokens_per_batch=train_cfg.batch_size, run_config=run_config, resume=resume,
                   overwrite=overwrite, perplexity=False, ema_decay=diffusion.ema_decay)  # fmt: skip
    if diffusion.ema_decay is not None and result.out_dir is not None:
        model, *_ = load_model(result.out_dir / "last", ema=True)
    return model.eval(), result


def _as_trained(ckpt: Path, unet: UNetConfig, noise: NoiseConfig) -> tuple[UNetConfig, NoiseConfig]:
    """A resumed run keeps the objective its checkpoint ``ckpt`` was trained with: the auto (None)
    ``predict_residual``, ``prediction_type`` and ``clip_sample_range`` take the checkpoint's values (False,
    epsilon and 1 for checkpoints saved before those fields). Raises ``ConfigError`` where a value given
    contradicts the checkpoint (or ``residual_scale`` differs from it)."""
    saved_unet = parse_yaml((ckpt / "config.yaml").read_text()) or {}
    run = read_run_config(ckpt)
    saved_noise = run.get("noise") or {}
    residual = bool(saved_unet.get("predict_residual", False))
    prediction = saved_noise.get("prediction_type", "epsilon")
    given_and_saved = {
        "unet.predict_residual": (unet.predict_residual, residual),
        "unet.residual_scale": (unet.residual_scale, float(saved_unet.get("residual_scale", 1.0))),
        "noise.prediction_type": (noise.prediction_type, prediction),
    }
    for name, (given, value) in given_and_saved.items():
        if given is not None and given != value:
            shown = [str(v).lower() if isinstance(v, bool) else v for v in (given, value)]
            raise ConfigError(f"{name} {shown[0]} contradicts the checkpoint {ckpt} (trained with {shown[1]}): "
                              f"resume with --{name} {shown[1]}")  # fmt: skip
    clip = noise.clip_sample_range
    if clip is None:
        clip = float(saved_noise.get("clip_sample_range", 1.0))
    return replace(unet, predict_residual=residual), replace(noise, prediction_type=prediction,
                                                             clip_sample_range=clip)  # fmt: skip


def load_model(folder: str | Path, ema: bool = True) -> tuple[UNet, NoiseConfig, list[str], int]:
    """(UNet in eval mode, its NoiseConfig, class names, low_res_factor) from a diffusion checkpoint
    folder (a run's ``last/``, ``best/`` or ``checkpoints/step-N/``; a run folder means its ``last/``).
    ``ema``: the moving-average weights when the checkpoint has them. Raises ``CheckpointError``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "config.yaml").is_file() and (folder / "last" / "config.yaml").is_file():
        folder = folder / "last"
    if not (folder / "config.yaml").is_file():
        raise CheckpointError(f"{folder} is not a diffusion checkpoint (no config.yaml); train one with "
                              "lamina diffusion train")  # fmt: skip
    cfg_data = parse_yaml((folder / "config.yaml").read_text()) or {}
    if cfg_data.pop("kind", None) != UNetConfig.kind:
        raise CheckpointError(f"{folder} is not a diffusion UNet checkpoint (config.yaml has no kind: unet)")
    cfg_data.setdefault("predict_residual", False)  # saved before the field existed
    unet = UNet(from_dict(UNetConfig, cfg_data))
    weights = folder / (EMA_FILE if ema and (folder / EMA_FILE).is_file() else "model.safetensors")
    unet.load_state_dict(load_file(str(weights)))
    run = read_run_config(folder)
    saved = {"prediction_type": "epsilon", "clip_sample_range": 1.0, **(run.get("noise") or {})}  # older runs
    noise = from_dict(NoiseConfig, saved)
    low_res_factor = int((run.get("diffusion") or {}).get("low_res_factor", 1))
    return unet.eval(), noise, list(run.get("class_names") or []), low_res_factor
