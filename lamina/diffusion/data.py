"""Images for diffusion training, as float tensors in [-1, 1] with integer labels.

Three sources, none downloaded:

* ``digits``: scikit-learn's handwritten digits (1797 images, 8x8, 17 grey levels 0..16, classes 0-9),
  upsampled (bilinear) to ``image_size`` (8, 16 or 32);
* ``sample_images``: square patches of scikit-learn's two sample photographs (china.jpg, flower.jpg;
  label 0 / 1), for colour and 2x super-resolution, cropped at seeded random places and resized (area);
  the held-out patches come from a strip at the right of each photograph that no training patch
  touches;
* a folder of images (anything Pillow reads): sub-folders are classes (sorted names -> labels 0..K-1);
  images directly in the folder make an unlabelled set.

``split`` holds out a fixed, seeded fraction; ``ImageBatches`` serves batch ``i`` as a pure function of
``i`` (seeded shuffles per epoch), as the trainer's exact resume needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lamina.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class ImageDataConfig:
    """Which images to train on (the ``--data.*`` flags of ``lamina diffusion train``)."""

    dataset: str = "digits"  # digits, sample_images, or a folder of images (class sub-folders -> labels)
    image_size: int = 16  # height = width the images are resized to
    held_out_fraction: float = 0.1  # share of images kept out of training (seeded, fixed split)
    num_patches: int = 2048  # sample_images: patches cut from the two photographs
    seed: int = 0  # the split, the patches and the shuffles

    def __post_init__(self) -> None:
        if self.image_size < 4:
            raise ConfigError(f"image_size={self.image_size} must be >= 4")
        if not 0 <= self.held_out_fraction < 1:
            raise ConfigError(f"held_out_fraction={self.held_out_fraction} must be in [0, 1)")


@dataclass
class ImageSet:
    """``images`` (N, C, H, W) float32 in [-1, 1]; ``labels`` (N,) int64 (all 0 when unlabelled);
    ``class_names`` (one per label; empty when unlabelled)."""

    images: Tensor
    labels: Tensor
    class_names: list[str] = field(default_factory=list)
    held_out: Tensor | None = None  # (N,) bool: a split fixed by the source (``split`` then keeps it)

    @property
    def num_classes(self) -> int | None:
        return len(self.class_names) or None

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.class_names)


def resize(images: Tensor, size: int) -> Tensor:
    """(N, C, h, w) -> (N, C, size, size): bilinear up, area (box average) down."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    if size < images.shape[-1]:
        return F.interpolate(images, size=(size, size), mode="area")
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def digits(image_size: int = 16) -> ImageSet:
    """scikit-learn's digits (1797 x 8x8, grey 0..16) as (1797, 1, image_size, image_size) in [-1, 1],
    labels 0-9."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0 * 2 - 1).unsqueeze(1)
    return ImageSet(
        resize(x, image_size).clamp(-1, 1), torch.from_numpy(d.target).long(), [str(i) for i in range(10)]
    )


def sample_image_patches(image_size: int = 32, num_patches: int = 2048, patch_size: int | None = None,
                         seed: int = 0, held_out_fraction: float = 0.0) -> ImageSet:  # fmt: skip
    """``num_patches`` RGB patches (N, 3, image_size, image_size) in [-1, 1] of scikit-learn's sample
    photographs (427x640: china.jpg -> label 0, flower.jpg -> 1), ``patch_size`` pixels square (default
    2 x image_size) at seeded places, resized (area) to ``image_size``. The last
    ``round(held_out_fraction x N)`` patches are the held-out ones (``ImageSet.held_out``): they lie in
    the right ``max(held_out_fraction, patch_size / width)`` of each photograph, the others left of it,
    so no held-out pixel was trained on. Raises ``ConfigError`` for a patch that does not fit."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    size = patch_size or 2 * image_size
    n_held = round(num_patches * held_out_fraction)
    g = np.random.default_rng(seed)
    out, labels = [], []
    for i in range(num_patches):
        k = i % len(photos)
        h, w, _ = photos[k].shape
        strip = max(round(w * held_out_fraction), size) if n_held else 0
        if size > h or size > w - strip:
            raise ConfigError(f"patches of {size} pixels do not fit the {h}x{w} photographs with a held-out "
                              f"strip of {strip}: lower image_size or held_out_fraction")  # fmt: skip
        lo, hi = (w - strip, w - size + 1) if i >= num_patches - n_held else (0, w - strip - size + 1)
        top, left = g.integers(0, h - size + 1), g.integers(lo, hi)
        out.append(photos[k][top : top + size, left : left + size])
        labels.append(k)
    x = torch.from_numpy(np.stack(out).astype(np.float32) / 255.0 * 2 - 1).permute(0, 3, 1, 2)
    held = torch.arange(num_patches) >= num_patches - n_held
    return ImageSet(resize(x, image_size).clamp(-1, 1), torch.tensor(labels), ["china", "flower"], held)


def image_folder(path: str | Path, image_size: int = 32, channels: int | None = None) -> ImageSet:
    """Every image under ``path`` (Pillow), center-cropped square and resized to ``image_size``. Class
    sub-folders give labels (sorted names); images straight in ``path`` make an unlabelled set.
    ``channels``: 1 (grey) or 3 (RGB); None: 1 when every image is greyscale, else 3.
    Raises ``ConfigError`` for a missing folder or one without images."""

    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"image folder {root} does not exist; give a folder of images (class sub-folders)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).rglob("*"))
                 if f.suffix.lower() in IMAGE_SUFFIXES]  # fmt: skip
    else:
        files = [(f, 0) for f in sorted(root.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise ConfigError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {root}")
    if channels is None:  # headers only; each file is opened and closed in turn (no open-file limit)
        channels = 1 if all(_mode(f) in ("L", "1", "I", "I;16") for f, _ in files) else 3
    x = torch.cat([read_image(f, image_size, channels) for f, _ in files])
    return ImageSet(x, torch.tensor([lab for _, lab in files]), classes)


def _mode(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as im:
        return str(im.mode)


def read_image(path: str | Path, image_size: int | None, channels: int = 1) -> Tensor:
    """One image file as (1, channels, image_size, image_size) in [-1, 1] (center-cropped square), or
    at its own height and width (1, channels, H, W) when ``image_size`` is None. Raises ``ConfigError``
    for a missing or unreadable file."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise ConfigError(f"image {path} does not exist")
    try:
        with Image.open(path) as im:
            return _to_tensor(im, image_size, channels)
    except (UnidentifiedImageError, OSError) as e:
        raise ConfigError(f"cannot read image {path}: {e}") from None


def _to_tensor(im: Any, image_size: int | None, channels: int) -> Tensor:
    from PIL import Image

    im = im.convert("L" if channels == 1 else "RGB")
    if image_size is not None:
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize(
            (image_size, image_size), Image.Resampling.BICUBIC
        )
    a = np.asarray(im, dtype=np.float32) / 255.0 * 2 - 1
    return torch.from_numpy(a[None] if channels == 1 else a.transpose(2, 0, 1)).unsqueeze(0).clamp(-1, 1)


def load_images(cfg: ImageDataConfig) -> ImageSet:
    """The images ``cfg.dataset`` names (``digits``, ``sample_images`` or a folder), at ``cfg.image_size``."""
    if cfg.dataset == "digits":
        return digits(cfg.image_size)
    if cfg.dataset == "sample_images":
        return sample_image_patches(cfg.image_size, cfg.num_patches, seed=cfg.seed,
                                    held_out_fraction=cfg.held_out_fraction)  # fmt: skip
    return image_folder(cfg.dataset, cfg.image_size)


def split(data: ImageSet, held_out_fraction: float = 0.1, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """(train, held-out): a seeded permutation, the last ``held_out_fraction`` held out (same every run);
    a split fixed by the source (``data.held_out``) is kept as it is."""
    if data.held_out is not None:
        return data.subset(torch.nonzero(~data.held_out)[:, 0]), data.subset(
            torch.nonzero(data.held_out)[:, 0]
        )
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    n_held = round(len(data) * held_out_fraction)
    return data.subset(perm[: len(data) - n_held]), data.subset(perm[len(data) - n_held :])


def to_uint8(images: Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8 (rounded)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


class ImageBatches:
    """Micro-batch ``i``: ``{"images": (B, C, H, W), "labels": (B,)}``, plus ``"low_res"`` (B, C, H/f,
    W/f) when ``low_res_factor`` f > 1 (area-downsampled, for super-resolution). Epoch e is a
    permutation seeded by (seed, e), so a batch depends only on its index."""

    def __init__(self, data: ImageSet, batch_size: int, seed: int = 0, low_res_factor: int = 1) -> None:
        if len(data) < batch_size:
            raise ConfigError(f"{len(data)} training images are fewer than batch_size={batch_size}")
        self.data, self.batch_size, self.seed, self.low_res_factor = data, batch_size, seed, low_res_factor
        self.per_epoch = len(data) // batch_size
        self._perm: tuple[int, Tensor] | None = None

    def batch(self, index: int) -> dict[str, Tensor]:
        epoch, pos = divmod(index, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(len(self.data), generator=g))
        idx = self._perm[1][pos * self.batch_size : (pos + 1) * self.batch_size]
        return batch_of(self.data.subset(idx), self.low_res_factor)

    def held_out(self, data: ImageSet) -> list[dict[str, Tensor]]:
        """``data`` in batches of ``batch_size`` (the last one may be smaller), in order."""
        return [batch_of(data.subset(torch.arange(i, min(i + self.batch_size, len(data)))), self.low_res_factor)
                for i in range(0, len(data), self.batch_size)]  # fmt: skip


def batch_of(data: ImageSet, low_res_factor: int = 1) -> dict[str, Tensor]:
    """The batch dict of ``data`` (see ``ImageBatches``)."""
    b = {"images": data.images, "labels": data.labels}
    if low_res_factor > 1:
        b["low_res"] = resize(data.images, data.images.shape[-1] // low_res_factor)
    return b
