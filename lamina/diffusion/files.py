"""The pipelines from a checkpoint folder to PNG files: what ``lamina diffusion sample|inpaint|upscale|
edit|export`` run, one function each (notebooks call the same).

Inputs (``input``): ``held_out`` (the held-out split of the run's own data: digits, sample-image patches
or the run's folder, at the model's size), an image file, or a folder of images (class sub-folders).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lamina.config import from_dict
from lamina.diffusion import pipelines as P
from lamina.diffusion.data import (
    IMAGE_SUFFIXES,
    ImageDataConfig,
    ImageSet,
    image_folder,
    load_images,
    read_image,
    resize,
    split,
)
from lamina.diffusion.schedulers import NoiseConfig
from lamina.diffusion.training import load_model
from lamina.diffusion.unet import UNet
from lamina.errors import ConfigError
from lamina.train.trainer import read_run_config


@dataclass
class SamplingConfig:
    """How every pipeline denoises (flags of each ``lamina diffusion`` verb but train)."""

    sampler: Literal["ddim", "ddpm"] = "ddim"  # ddim (eta, fewer steps) or ddpm (ancestral)
    steps: int = 50  # denoising steps
    eta: float = 0.0  # ddim: 0 deterministic, 1 DDPM-like noise
    guidance_scale: float = 3.0  # classifier-free guidance w (1: conditional only, 0: unconditional)
    seed: int = 0  # the same seed gives the same images
    batch_size: int = 256  # images per forward pass (guidance doubles it)
    ema: bool = True  # sample with the moving-average weights when the checkpoint has them
    progress: bool = True  # show a progress bar


@dataclass
class OutputConfig:
    """What an image verb reads and writes."""

    input: str = "held_out"  # held_out (the run's held-out images), an image file or a folder of images
    num_images: int = 100  # images to make (sample) or read from input (the first ones)
    labels: list[int] = field(
        default_factory=list
    )  # classes to generate, cycled (empty: 0, 1, ..., K-1, 0, ...)
    out: str = "samples.png"  # the PNG grid written
    nrow: int = 10  # images per row of the grid
    scale: int = 4  # each pixel drawn scale x scale in the grid


@dataclass
class EditConfig:
    """SDEdit's one knob."""

    strength: float = 0.5  # noise level to start from, in [0, 1] (0: the input unchanged, 1: pure noise)


@dataclass
class ExportConfig:
    """Synthetic labeled images for data augmentation."""

    out_dir: str = "synthetic"  # folder of class sub-folders the PNGs go to
    num_images: int = 1000  # images to write, classes cycled


@dataclass
class Loaded:
    """A checkpoint made ready: UNet, noise schedule, class names, super-resolution factor, run data."""

    unet: UNet
    noise: NoiseConfig
    class_names: list[str]
    low_res_factor: int
    data: ImageDataConfig | None


def load(model: str | Path, sampling: SamplingConfig) -> Loaded:
    """A diffusion checkpoint (a run folder or its ``last/`` / ``best/``) with its run's data config."""
    unet, noise, names, factor = load_model(model, ema=sampling.ema)
    folder = Path(model)
    run = read_run_config(folder) or read_run_config(folder / "last")
    data = from_dict(ImageDataConfig, run["images"]) if run.get("images") else None
    return Loaded(unet, noise, names, factor, data)


def _kw(s: SamplingConfig) -> dict[str, object]:
    return {"seed": s.seed, "batch_size": s.batch_size, "progress": s.progress}


def _labels(m: Loaded, out: OutputConfig, n: int) -> Tensor | None:
    k = m.unet.config.num_classes
    if k is None:
        return None
    cycle = out.labels or list(range(k))
    return torch.tensor([cycle[i % len(cycle)] for i in range(n)])


def read_input(m: Loaded, out: OutputConfig) -> ImageSet:
    """The first ``num_images`` images of ``out.input`` at the model's size and channels."""
    size, c = m.unet.config.image_size, m.unet.config.in_channels
    if out.input == "held_out":
        if m.data is None:
            raise ConfigError("this checkpoint has no run.yaml naming its data; give --input FILE or FOLDER")
        _, held = split(load_images(m.data), m.data.held_out_fraction, m.data.seed)
        images = held
    else:
        p = Path(out.input)
        if p.is_file():
            images = ImageSet(read_image(p, size, c), torch.zeros(1, dtype=torch.long))
        else:
            images = image_folder(p, size, channels=c)
    n = min(out.num_images, len(images))
    return images.subset(torch.arange(n))


def sample_grid(model: str | Path, sampling: SamplingConfig, out: OutputConfig,
                evaluate: bool = False) -> tuple[Path, Tensor, str | None]:  # fmt: skip
    """Sample ``num_images`` (class-conditional: ``labels`` cycled), write the grid; with ``evaluate``
    (a digits model) also score them (``lamina.diffusion.evaluate.digit_quality``). Returns (grid path,
    images, the quality line or None)."""
    m = load(model, sampling)
    labels = _labels(m, out, out.num_images)
    images = P.sample(m.unet, m.noise, out.num_images, labels, sampling.guidance_scale, sampling.sampler,
                      sampling.steps, sampling.eta, **_kw(sampling))  # type: ignore[arg-type]  # fmt: skip
    path = P.save_grid(images, out.out, out.nrow, out.scale)
    line = None
    if evaluate:
        if labels is None or m.unet.config.in_channels != 1:
            raise ConfigError("--evaluate scores class-conditional digit models (1 channel, 10 classes)")
        from lamina.diffusion.evaluate import digit_quality

        line = digit_quality(images, labels).line()
    return path, images, line


@dataclass
class InpaintConfig:
    """The region to fill."""

    mask: str = "right"  # right, left, top, bottom or center half/quarter to fill, or a PNG (white = fill)
    jump_length: int = 10  # RePaint: steps gone back at each jump
    jump_n_sample: int = 2  # RePaint: times each stretch is denoised (1: no resampling)


def make_mask(spec: str, size: int) -> Tensor:
    """(size, size) bool mask, True where to fill: a named region or a PNG (white = fill, resized)."""
    m = torch.zeros(size, size, dtype=torch.bool)
    h = size // 2
    regions = {"right": (slice(None), slice(h, None)), "left": (slice(None), slice(None, h)),
               "top": (slice(None, h), slice(None)), "bottom": (slice(h, None), slice(None)),
               "center": (slice(size // 4, size - size // 4), slice(size // 4, size - size // 4))}  # fmt: skip
    if spec in regions:
        m[regions[spec]] = True
        return m
    p = Path(spec)
    if not p.is_file():
        raise ConfigError(f"mask {spec!r} is neither {', '.join(regions)} nor an image file")
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(p).convert("L").resize((size, size), Image.Resampling.NEAREST))
    return torch.from_numpy(a > 127)


def inpaint_grid(model: str | Path, sampling: SamplingConfig, out: OutputConfig,
                 cfg: InpaintConfig) -> tuple[Path, Tensor]:  # fmt: skip
    """Fill ``cfg.mask`` of the input images; the grid shows rows of (input with the hole grey, result).
    Returns (grid path, results)."""
    m = load(model, sampling)
    src = read_input(m, out)
    mask = make_mask(cfg.mask, m.unet.config.image_size)
    labels = src.labels if m.unet.config.num_classes is not None and src.class_names else None
    result = P.inpaint(m.unet, m.noise, src.images, mask, labels, sampling.guidance_scale, sampling.steps,
                       cfg.jump_length, cfg.jump_n_sample, **_kw(sampling))  # type: ignore[arg-type]  # fmt: skip
    holed = torch.where(mask.expand_as(src.images), torch.zeros_like(src.images), src.images)
    return P.save_grid(_rows(holed, result, nrow=out.nrow), out.out, out.nrow, out.scale), result


def _rows(*groups: Tensor, nrow: int) -> Tensor:
    """Interleave groups row by row: nrow of the first, nrow of the second, ..."""
    parts: list[Tensor] = []
    for i in range(0, len(groups[0]), nrow):
        parts.extend(g[i : i + nrow] for g in groups)
    return torch.cat(parts)


def psnr(a: Tensor, b: Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(a.float().clamp(-1, 1), b.float().clamp(-1, 1)).item()
    return 10 * torch.log10(torch.tensor(4.0 / max(mse, 1e-12))).item()


@dataclass
class UpscaleConfig:
    """What ``lamina diffusion upscale`` does with its input."""

    evaluate: bool = False  # downsample the inputs first and compare with bicubic in PSNR (held_out: always)
    overlap: float = 0.25  # images larger than the model's: share of each tile its neighbours also denoise


def upscale_grid(model: str | Path, sampling: SamplingConfig, out: OutputConfig) -> tuple[Path, Tensor, str]:
    """Super-resolve the input images downsampled by the model's factor (an evaluation); the grid shows
    rows of (bicubic, model, original). Returns (grid path, results, PSNR line: model vs bicubic vs
    original)."""
    m = load(model, sampling)
    src = read_input(m, out)
    low = resize(src.images, m.unet.config.image_size // m.low_res_factor)
    result = P.upscale(m.unet, m.noise, low, sampler=sampling.sampler, steps=sampling.steps, eta=sampling.eta,
                       **_kw(sampling))  # type: ignore[arg-type]  # fmt: skip
    bicubic = F.interpolate(low, size=src.images.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)
    line = f"PSNR on {len(src)} images: model {psnr(result, src.images):.2f} dB, bicubic {psnr(bicubic, src.images):.2f} dB"
    return (
        P.save_grid(_rows(bicubic, result, src.images, nrow=out.nrow), out.out, out.nrow, out.scale),
        result,
        line,
    )


MAX_UPSCALE_PIXELS = 4096 * 4096  # the largest output upscale_images writes (its fp32 canvas, ~200 MB)


def upscale_images(model: str | Path, sampling: SamplingConfig, input: str | Path, out: str | Path,
                   overlap: float = 0.25) -> list[Path]:  # fmt: skip
    """Enlarge a user's own images by the model's factor at their full size (``pipelines.upscale`` in
    overlapping tiles): ``input`` an image file -> the PNG ``out``; a folder -> one PNG per image under
    the folder ``out`` (same relative names). Returns the paths written. Raises ``ConfigError`` for a
    model that is not a super-resolution one, a missing input or an output over ``MAX_UPSCALE_PIXELS``.
    In a folder, images under ``out`` are skipped (a rerun does not enlarge its own results)."""
    m = load(model, sampling)
    if not m.unet.config.low_res_channels or m.low_res_factor < 2:
        raise ConfigError(
            f"{model} is not a super-resolution model; train one with --diffusion.low_res_factor 2"
        )
    src = Path(input)
    if src.is_file():
        pairs = [(src, Path(out))]
    elif src.is_dir():
        dest = Path(out).resolve()  # a rerun with out inside input must not enlarge its own results
        found = sorted(
            f
            for f in src.rglob("*")
            if f.suffix.lower() in IMAGE_SUFFIXES and not f.resolve().is_relative_to(dest)
        )
        if not found:
            raise ConfigError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {src}")
        pairs = [(f, Path(out) / f.relative_to(src).with_suffix(".png")) for f in found]
    else:
        raise ConfigError(f"{src} is neither an image file nor a folder of images")
    for f, target in pairs:
        low = read_image(f, None, m.unet.config.in_channels)
        pixels = low.shape[-1] * low.shape[-2] * m.low_res_factor**2
        if pixels > MAX_UPSCALE_PIXELS:
            raise ConfigError(
                f"{f}: {low.shape[-1]}x{low.shape[-2]} enlarged {m.low_res_factor}x is {pixels:,} pixels, "
                f"over the limit of {MAX_UPSCALE_PIXELS:,}; crop or shrink it first"
            )
        big = P.upscale(m.unet, m.noise, low, m.low_res_factor, overlap, sampling.sampler, sampling.steps,
                        sampling.eta, **_kw(sampling))  # type: ignore[arg-type]  # fmt: skip
        P.save_grid(big, target, nrow=1, padding=0)
    return [t for _, t in pairs]


def edit_grid(
    model: str | Path, sampling: SamplingConfig, out: OutputConfig, strength: float = 0.5
) -> tuple[Path, Tensor]:
    """SDEdit the input images with ``strength``; with ``labels`` (class-conditional) toward those
    classes, else toward the inputs' own. The grid shows rows of (input, result)."""
    m = load(model, sampling)
    src = read_input(m, out)
    labels = None
    if m.unet.config.num_classes is not None:
        labels = _labels(m, out, len(src)) if out.labels or not src.class_names else src.labels
    result = P.edit(m.unet, m.noise, src.images, strength, labels, sampling.guidance_scale, sampling.sampler,
                    sampling.steps, sampling.eta, **_kw(sampling))  # type: ignore[arg-type]  # fmt: skip
    return P.save_grid(_rows(src.images, result, nrow=out.nrow), out.out, out.nrow, out.scale), result


def export_images(model: str | Path, sampling: SamplingConfig, num_images: int, out_dir: str | Path,
                  labels: list[int] | None = None) -> list[Path]:  # fmt: skip
    """Write ``num_images`` synthetic images as PNGs in class folders ``out_dir/<class name>/`` (classes
    cycled; unconditional models: straight in ``out_dir``), a dataset ``image_folder`` reads back."""
    m = load(model, sampling)
    lab = _labels(m, OutputConfig(labels=labels or []), num_images)
    images = P.sample(m.unet, m.noise, num_images, lab, sampling.guidance_scale, sampling.sampler, sampling.steps,
                      sampling.eta, **_kw(sampling))  # type: ignore[arg-type]  # fmt: skip
    names = m.class_names or [str(i) for i in range(m.unet.config.num_classes or 0)]
    return P.save_images(images, lab, out_dir, names)
