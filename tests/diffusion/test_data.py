from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

from lamina.diffusion.data import (
    ImageBatches,
    ImageDataConfig,
    digits,
    image_folder,
    load_images,
    sample_image_patches,
    split,
)
from lamina.diffusion.pipelines import save_grid, save_images
from lamina.errors import ConfigError


def test_digits_are_upsampled_in_range_with_labels() -> None:
    d = digits(16)
    assert d.images.shape == (1797, 1, 16, 16)
    assert d.images.min() >= -1 and d.images.max() <= 1 and d.images.min() == -1
    assert d.num_classes == 10 and set(d.labels.tolist()) == set(range(10))
    assert digits(8).images.unique().numel() == 17  # the native 0..16 grey levels, unresampled


def test_split_is_fixed_and_disjoint() -> None:
    d = digits(8)
    a_train, a_held = split(d, 0.1, seed=0)
    _, b_held = split(d, 0.1, seed=0)
    assert torch.equal(a_held.images, b_held.images) and len(a_held) == 180
    assert len(a_train) + len(a_held) == len(d)
    flat = {tuple(x.flatten().tolist()) for x in a_held.images}
    assert len(a_train) - sum(tuple(x.flatten().tolist()) in flat for x in a_train.images) > 1500


def test_batches_depend_only_on_their_index() -> None:
    d = digits(8)
    a, b = ImageBatches(d, 32, seed=1), ImageBatches(d, 32, seed=1, low_res_factor=2)
    for i in (0, 60, 3):  # across an epoch boundary (56 batches per epoch) and back
        assert torch.equal(a.batch(i)["images"], b.batch(i)["images"])
    assert not torch.equal(a.batch(0)["images"], a.batch(56)["images"])
    assert b.batch(5)["low_res"].shape == (32, 1, 4, 4)


def test_sample_image_patches_are_colour() -> None:
    p = sample_image_patches(16, num_patches=6, seed=0)
    assert p.images.shape == (6, 3, 16, 16) and p.labels.tolist() == [0, 1] * 3
    assert p.images.min() >= -1 and p.images.max() <= 1 and p.images.std() > 0.05


def test_image_folder_reads_class_folders_back(tmp_path: Path) -> None:
    d = digits(8)
    paths = save_images(d.images[:6], d.labels[:6], tmp_path / "set", d.class_names)
    assert all(p.parent.name == str(int(y)) for p, y in zip(paths, d.labels[:6], strict=True))
    back = load_images(ImageDataConfig(dataset=str(tmp_path / "set"), image_size=8))
    assert back.images.shape == (6, 1, 8, 8) and back.num_classes == len(set(d.labels[:6].tolist()))
    # PNG stores 256 levels: the 17 grey levels come back within half a level
    order = sorted(range(6), key=lambda i: (str(int(d.labels[i])), paths[i].name))
    assert (back.images - d.images[order]).abs().max() < 1 / 127
    grid = save_grid(d.images[:12], tmp_path / "g.png", nrow=5, scale=2)
    from PIL import Image

    assert Image.open(grid).size == (2 * (5 * 9 + 1), 2 * (3 * 9 + 1))


def test_missing_folder_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        image_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images"):
        image_folder(tmp_path / "empty")


def test_held_out_sample_image_patches_come_from_an_untrained_strip() -> None:
    """Each patch is found in its photograph: training patches left of the held-out strip, held-out
    patches inside it (so no held-out pixel is trained on)."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    p = sample_image_patches(8, num_patches=20, patch_size=8, seed=0, held_out_fraction=0.1)
    train, held = split(p, 0.5, seed=1)  # the source's split wins over fraction and seed
    assert (len(train), len(held)) == (18, 2) and torch.equal(held.images, p.images[18:])
    for i, (x, k) in enumerate(zip(p.images, p.labels, strict=True)):
        photo = torch.from_numpy(photos[int(k)].astype("float32") / 255 * 2 - 1).permute(2, 0, 1)
        rows = (photo[0].unfold(1, 8, 1) - x[0, 0]).abs().amax(-1) < 1e-6  # where the first row matches
        hits = [(t, left) for t, left in rows.nonzero().tolist()
                if t <= photo.shape[1] - 8 and torch.equal(photo[:, t : t + 8, left : left + 8], x)]  # fmt: skip
        assert hits and all((left >= 640 - 64) == (i >= 18) for _, left in hits), i
