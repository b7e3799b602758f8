"""A tiny UNet config for fast diffusion tests (import as ``from tiny_unet import tiny_unet``)."""

from __future__ import annotations

from typing import Any


def tiny_unet(**kw: Any) -> Any:
    """``UNetConfig`` of 16 base channels, two levels, one block each, no attention; ``kw`` overrides."""
    from lamina.diffusion.unet import UNetConfig

    base: dict[str, Any] = dict(
        base_channels=16, channel_mults=[1, 2], num_res_blocks=1, attention_levels=[], head_channels=16
    )
    return UNetConfig(**{**base, **kw})
