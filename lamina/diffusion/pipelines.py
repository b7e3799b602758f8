"""Pipelines over a trained UNet and a noise schedule: sampling, inpainting, super-resolution, editing.

    images = sample(unet, noise, labels=torch.arange(10), guidance_scale=3.0, steps=50, seed=0)
    save_grid(images, "grid.png", nrow=10)

Every pipeline is seeded (one ``torch.Generator`` per call: the same seed gives the same images),
batched (``batch_size`` images per forward pass; guidance doubles it), shows a progress bar over the
denoising steps, and returns (N, C, H, W) float images in [-1, 1].

* ``sample``: DDPM ancestral sampling (Ho et al. 2020) or DDIM with ``eta`` (Song et al. 2021);
  classifier-free guidance (Ho & Salimans 2022): ``out = out_null + w (out_cond - out_null)`` with
  w = ``guidance_scale`` (1: conditional only; 0: unconditional).
* ``inpaint``: RePaint (Lugmayr et al. 2022): at every step the known region is replaced by the input
  noised to that step's level, with resampling jumps (every ``jump_length`` steps, go back
  ``jump_length`` steps by forward noising, ``jump_n_sample - 1`` times) to harmonise the two regions;
  at the end the known pixels are set to the input, bit for bit (the complaint of diffusers #3880).
* ``upscale``: SR3 (Saharia et al. 2021): sampling conditioned on the low-resolution image; a
  ``predict_residual`` model samples the residual and adds the bicubic upsample (SRDiff). An image
  larger than the model's is denoised as one image whose every step averages the model's outputs on
  overlapping tiles of the model's size (MultiDiffusion, Bar-Tal et al. 2023), so tiles leave no seams.
* ``edit``: SDEdit (Meng et al. 2022): the input noised to timestep ~ strength x T, then denoised;
  strength 0 returns the input, 1 starts from pure noise (the input is then ignored).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from lamina.diffusion.schedulers import DDIMScheduler, DDPMScheduler, NoiseConfig
from lamina.diffusion.unet import UNet, residual_base, resolve_noise
from lamina.errors import ConfigError

Scheduler = DDPMScheduler | DDIMScheduler


def make_scheduler(noise: NoiseConfig, sampler: str = "ddim", steps: int = 50, eta: float = 0.0) -> Scheduler:
    """A ``ddpm`` or ``ddim`` scheduler over ``noise`` with ``steps`` sampling timesteps (DDIM steps
    along the noise of the clipped x0: unclipped, guidance 3 spoils DDIM samples of digits)."""
    if sampler not in ("ddpm", "ddim"):
        raise ConfigError(f"sampler={sampler!r} must be 'ddpm' or 'ddim'")
    sched: Scheduler = (
        DDIMScheduler(noise, eta=eta, use_clipped_model_output=True)
        if sampler == "ddim"
        else DDPMScheduler(noise)
    )
    sched.set_timesteps(steps)
    return sched


def predict(unet: UNet, x: Tensor, t: int, labels: Tensor | None, guidance_scale: float,
            low_res: Tensor | None = None) -> Tensor:  # fmt: skip
    """The UNet's output at ``x`` (B, C, H, W), timestep ``t``, with classifier-free guidance when the
    UNet is class-conditional, ``labels`` (B,) are given and ``guidance_scale`` != 1."""
    num_classes = unet.config.num_classes
    if num_classes is None or labels is None or guidance_scale == 1.0:
        return unet(x, t, class_labels=labels if num_classes is not None else None, low_res=low_res)
    null = torch.full_like(labels, num_classes)
    both = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null]),
                low_res=None if low_res is None else torch.cat([low_res, low_res]))  # fmt: skip
    cond, uncond = both.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def _check_labels(unet: UNet, labels: Tensor | None) -> None:
    k = unet.config.num_classes
    if labels is not None and k is None:
        raise ConfigError("labels given to an unconditional model; leave them out")
    if labels is not None and k is not None and (labels.min() < 0 or labels.max() > k):
        raise ConfigError(f"labels must be class indices in 0..{k - 1} (or {k}: the null class)")


def _chunks(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


@torch.no_grad()
def sample(
    unet: UNet,
    noise: NoiseConfig,
    num_images: int | None = None,
    labels: Tensor | None = None,
    guidance_scale: float = 1.0,
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 256,
    low_res: Tensor | None = None,
    progress: bool = True,
) -> Tensor:
    """``num_images`` (or ``len(labels)``) images (N, C, H, W) in [-1, 1]. ``labels`` (N,) classes for a
    class-conditional UNet (None: unconditional, the null class); ``low_res`` (N, C, h, w) for a
    super-resolution UNet. Raises ``ConfigError`` for inconsistent arguments."""
    if num_images is None:
        sizes = [len(v) for v in (labels, low_res) if v is not None]
        if not sizes:
            raise ConfigError("give num_images, labels or low_res")
        num_images = sizes[0]
    _check_labels(unet, labels)
    cfg = unet.config
    device = unet.conv_in.weight.device
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_images, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g).to(device)
    sched = make_scheduler(resolve_noise(noise, unet.config), sampler, steps, eta)
    out = []
    bar = tqdm(total=len(sched.timesteps) * len(_chunks(num_images, batch_size)), desc="sample",
               unit="step", disable=not progress, leave=False)  # fmt: skip
    for part in _chunks(num_images, batch_size):
        xs = x[part]
        ys = None if labels is None else labels[part].to(device)
        lows = None if low_res is None else low_res[part].to(device)
        for t in sched.timesteps:
            xs, _ = sched.step(predict(unet, xs, int(t), ys, guidance_scale, lows), int(t), xs, generator=g)
            bar.update(1)
        base = residual_base(cfg, lows, xs.shape[-2:])
        out.append(xs if base is None else xs / cfg.residual_scale + base)
    bar.close()
    return torch.cat(out).clamp(-1, 1)


@torch.no_grad()
def upscale(
    unet: UNet,
    noise: NoiseConfig,
    low_res: Tensor,
    factor: int | None = None,
    overlap: float = 0.25,
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = True,
) -> Tensor:
    """Super-resolution with a UNet made with ``low_res_channels``. ``factor`` None: ``low_res`` (N, C,
    h, w) is at the model's own low resolution and the result is (N, C, image_size, image_size).
    ``factor`` f (the model's, ``load_model``'s low_res_factor): ``low_res`` of any size (N, C, h, w) ->
    (N, C, f h, f w), denoised in tiles of image_size (low-resolution tiles of image_size / f) that
    overlap by ``overlap`` of a tile, their outputs averaged at every step (MultiDiffusion); an image
    smaller than a tile is padded (edge pixels repeated) and cropped back. ``batch_size`` tiles per
    forward pass. Raises ``ConfigError`` for a UNet without a low-resolution input or a factor that does
    not divide image_size."""
    cfg = unet.config
    if not cfg.low_res_channels:
        raise ConfigError(
            "this model has no low-resolution input; train it with --diffusion.low_res_factor 2"
        )
    if factor is None:
        return sample(unet, noise, low_res=low_res, sampler=sampler, steps=steps, eta=eta, seed=seed,
                      batch_size=batch_size, progress=progress)  # fmt: skip
    if factor < 1 or cfg.image_size % factor:
        raise ConfigError(f"factor={factor} must divide the model's image_size {cfg.image_size}")
    if not 0 <= overlap < 1:
        raise ConfigError(f"overlap={overlap} must be in [0, 1)")
    n, c, h, w = low_res.shape
    big, small = cfg.image_size, cfg.image_size // factor
    device = unet.conv_in.weight.device
    low = F.pad(low_res, (0, max(small - w, 0), 0, max(small - h, 0)), mode="replicate").to(device)
    stride = max(1, round(small * (1 - overlap)))
    tiles = [(i, top * factor, left * factor) for i in range(n)
             for top in _starts(low.shape[-2], small, stride) for left in _starts(low.shape[-1], small, stride)]  # fmt: skip
    low_tiles = torch.stack([low[i, :, y // factor : y // factor + small, x // factor : x // factor + small]
                             for i, y, x in tiles])  # fmt: skip  # (tiles, C, small, small)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, low.shape[-2] * factor, low.shape[-1] * factor, generator=g).to(device)
    count = torch.zeros_like(x[:, :1])
    for i, y, x_ in tiles:
        count[i, :, y : y + big, x_ : x_ + big] += 1
    sched = make_scheduler(resolve_noise(noise, unet.config), sampler, steps, eta)
    parts = _chunks(len(tiles), batch_size)
    bar = tqdm(total=len(sched.timesteps) * len(parts), desc="upscale", unit="step", disable=not progress,
               leave=False)  # fmt: skip
    for t in sched.timesteps:
        x_tiles = torch.stack([x[i, :, y : y + big, x_ : x_ + big] for i, y, x_ in tiles])
        outs = []
        for part in parts:
            outs.append(predict(unet, x_tiles[part], int(t), None, 1.0, low_tiles[part]))
            bar.update(1)
        summed = torch.zeros_like(x)
        for (i, y, x_), o in zip(tiles, torch.cat(outs), strict=True):
            summed[i, :, y : y + big, x_ : x_ + big] += o
        x, _ = sched.step(summed / count, int(t), x, generator=g)
    bar.close()
    base = residual_base(cfg, low, x.shape[-2:])
    x = x if base is None else x / cfg.residual_scale + base
    return x[..., : h * factor, : w * factor].clamp(-1, 1)


def _starts(length: int, size: int, stride: int) -> list[int]:
    """Tile starts covering ``length`` with tiles of ``size`` every ``stride``, the last one flush."""
    starts = list(range(0, length - size + 1, stride))
    return starts if starts[-1] == length - size else [*starts, length - size]


def repaint_moves(steps: int, jump_length: int = 10, jump_n_sample: int = 1) -> list[tuple[int, int]]:
    """RePaint's schedule over positions 0 (pure noise, the first timestep) .. ``steps`` (clean):
    (from, to) pairs; to = from + 1 is a denoising step, to < from a jump back by forward noising.
    Every ``jump_length`` positions the last ``jump_length`` steps are redone ``jump_n_sample - 1``
    times (RePaint's ``get_schedule_jump``)."""
    if jump_length < 1 or jump_n_sample < 1:
        raise ConfigError(f"jump_length={jump_length} and jump_n_sample={jump_n_sample} must be >= 1")
    jumps = {p: jump_n_sample - 1 for p in range(jump_length, steps, jump_length)}
    moves, p = [], 0
    while p < steps:
        moves.append((p, p + 1))
        p += 1
        if jumps.get(p, 0) > 0:
            jumps[p] -= 1
            moves.append((p, p - jump_length))
            p -= jump_length
    return moves


@torch.no_grad()
def inpaint(
    unet: UNet,
    noise: NoiseConfig,
    images: Tensor,
    mask: Tensor,
    labels: Tensor | None = None,
    guidance_scale: float = 1.0,
    steps: int = 50,
    jump_length: int = 10,
    jump_n_sample: int = 2,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = True,
) -> Tensor:
    """Fill the pixels of ``images`` (N, C, H, W) in [-1, 1] where ``mask`` (N or 1, 1 or C, H, W; or
    (H, W)) is true/1 (DDPM ancestral steps, RePaint resampling). Pixels where the mask is 0 equal
    ``images`` exactly in the result. Raises ``ConfigError`` for a mask of another size."""
    _check_labels(unet, labels)
    if mask.shape[-2:] != images.shape[-2:]:
        raise ConfigError(
            f"mask {tuple(mask.shape)} must have the images' height and width {tuple(images.shape[-2:])}"
        )
    device = unet.conv_in.weight.device
    fill = (mask != 0).expand_as(images)
    g = torch.Generator().manual_seed(seed)
    sched = DDPMScheduler(resolve_noise(noise, unet.config))
    sched.set_timesteps(steps)
    ts = [int(t) for t in sched.timesteps] + [-1]
    abar = torch.cat([sched.alphas_cumprod, torch.ones(1)])  # abar[-1] = 1: the clean image
    moves = repaint_moves(steps, jump_length, jump_n_sample)
    out = []
    bar = tqdm(total=len(moves) * len(_chunks(len(images), batch_size)), desc="inpaint", unit="step",
               disable=not progress, leave=False)  # fmt: skip
    for part in _chunks(len(images), batch_size):
        x0 = images[part].to(device)
        m = fill[part].to(device)
        ys = None if labels is None else labels[part].to(device)
        x = torch.randn(x0.shape, generator=g).to(device)
        for a, b in moves:
            if b > a:  # denoise ts[a] -> ts[b]; the known region from the forward process at ts[b]
                t = ts[a]
                x_unknown, _ = sched.step(predict(unet, x, t, ys, guidance_scale), t, x, generator=g)
                x_known = (
                    x0
                    if ts[b] < 0
                    else sched.add_noise(
                        x0, torch.randn(x0.shape, generator=g).to(device), torch.full((len(x0),), ts[b])
                    )
                )
                x = torch.where(m, x_unknown, x_known)
            else:  # jump back: q(x_{ts[b]} | x_{ts[a]}) of the forward process
                r = float(abar[ts[b]] / abar[ts[a]])
                x = r**0.5 * x + (1 - r) ** 0.5 * torch.randn(x.shape, generator=g).to(device)
            bar.update(1)
        out.append(torch.where(m, x.clamp(-1, 1), x0))
    bar.close()
    return torch.cat(out)


@torch.no_grad()
def edit(
    unet: UNet,
    noise: NoiseConfig,
    images: Tensor,
    strength: float = 0.5,
    labels: Tensor | None = None,
    guidance_scale: float = 1.0,
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = True,
) -> Tensor:
    """SDEdit: ``images`` (N, C, H, W) in [-1, 1] noised to the timestep after the first
    ``round((1 - strength) steps)`` of ``steps`` (diffusers' img2img convention), then denoised.
    ``strength`` 0 returns a copy of the input; 1 starts from pure noise, so the input is ignored.
    Raises ``ConfigError`` for a strength outside [0, 1]."""
    if not 0 <= strength <= 1:
        raise ConfigError(f"strength={strength} must be in [0, 1]")
    _check_labels(unet, labels)
    sched = make_scheduler(resolve_noise(noise, unet.config), sampler, steps, eta)
    run = round(steps * strength)
    if run == 0:
        return images.clone()
    timesteps = [int(t) for t in sched.timesteps[steps - run :]]
    device = unet.conv_in.weight.device
    g = torch.Generator().manual_seed(seed)
    out = []
    bar = tqdm(total=run * len(_chunks(len(images), batch_size)), desc="edit", unit="step",
               disable=not progress, leave=False)  # fmt: skip
    for part in _chunks(len(images), batch_size):
        x0 = images[part].to(device)
        z = torch.randn(x0.shape, generator=g).to(device)
        x = z if strength >= 1 else sched.add_noise(x0, z, torch.full((len(x0),), timesteps[0]))
        ys = None if labels is None else labels[part].to(device)
        for t in timesteps:
            x, _ = sched.step(predict(unet, x, t, ys, guidance_scale), t, x, generator=g)
            bar.update(1)
        out.append(x)
    bar.close()
    return torch.cat(out).clamp(-1, 1)


def save_grid(images: Tensor, path: str | Path, nrow: int = 10, scale: int = 1, padding: int = 1) -> Path:
    """Write ``images`` (N, C, H, W) in [-1, 1] as one PNG grid, ``nrow`` images per row, each pixel
    ``scale`` x ``scale``, ``padding`` pixels of black between them. Returns the path."""
    from PIL import Image

    from lamina.diffusion.data import to_uint8

    arr = to_uint8(images)  # (N, H, W, C)
    n, h, w, c = arr.shape
    rows = (n + nrow - 1) // nrow
    cols = min(n, nrow)
    import numpy as np

    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, c), dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        grid[top : top + h, left : left + w] = arr[i]
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)
    return path


def save_images(
    images: Tensor, labels: Tensor | None, out_dir: str | Path, class_names: list[str]
) -> list[Path]:
    """Write each image as a PNG, in ``out_dir/<class name>/`` when labelled (an image-folder dataset:
    ``lamina.diffusion.data.image_folder`` reads it back), else straight in ``out_dir``. Returns the paths."""
    from PIL import Image

    from lamina.diffusion.data import to_uint8

    arr = to_uint8(images)
    out, paths = Path(out_dir), []
    for i, a in enumerate(arr):
        folder = out / class_names[int(labels[i])] if labels is not None else out
        folder.mkdir(parents=True, exist_ok=True)
        p = folder / f"{i:06d}.png"
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(p)
        paths.append(p)
    return paths
