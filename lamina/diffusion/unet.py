"""The denoising UNet of DDPM (Ho et al. 2020, after PixelCNN++ and Wide ResNets), small enough for a CPU.

    net = UNet(UNetConfig(image_size=16, in_channels=1, num_classes=10))
    eps = net(x_t, t, class_labels=y)      # (B, 1, 16, 16) -> (B, 1, 16, 16)

Data flows: a 3x3 convolution in; per resolution level ``num_res_blocks`` residual blocks (GroupNorm,
SiLU, 3x3 convolutions, the time embedding added in between; self-attention after each block at the
levels listed in ``attention_levels``) then a stride-2 downsampling; a middle of block, attention, block;
the mirror path up, each block taking the matching skip connection concatenated on channels, with
nearest-neighbour upsampling and a convolution; GroupNorm, SiLU and a 3x3 convolution out.

Conditioning: the timestep through a sinusoidal embedding and an MLP; with ``num_classes`` a class
embedding added to it, whose extra last row (index ``num_classes``) is the null class that classifier-free
guidance (Ho & Salimans 2022) trains on by dropping labels; with ``low_res_channels`` a low-resolution
image (B, C, h, w) is upsampled (bicubic) to ``image_size`` and concatenated to the input, the
conditioning of SR3 (Saharia et al. 2021) for super-resolution. With ``predict_residual`` (the default for
super-resolution) the diffusion runs on the residual image - bicubic(low_res) and the pipelines add the
bicubic upsample back (SRDiff, Li et al. 2022): the model only draws the detail bicubic misses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lamina.diffusion.schedulers import NoiseConfig
from lamina.errors import ConfigError


@dataclass
class UNetConfig:
    """The UNet's shape (the ``--unet.*`` flags); saved with every checkpoint."""

    image_size: int = 16  # height = width of the images, divisible by 2^(levels - 1)
    in_channels: int = 1  # 1 for grey (digits), 3 for colour
    base_channels: int = 32  # channels of the first level; level i has base_channels * channel_mults[i]
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 2])  # one entry per resolution level
    num_res_blocks: int = 2  # residual blocks per level on the way down (one more on the way up)
    attention_levels: list[int] = field(
        default_factory=lambda: [2]
    )  # levels with self-attention (0: full size)
    head_channels: int = 32  # channels per attention head
    num_classes: int | None = None  # class-conditional with this many classes (+1 null class for guidance)
    low_res_channels: int = 0  # super-resolution: channels of the low-resolution image given as condition
    predict_residual: bool | None = None  # denoise image - bicubic(low_res) (SRDiff); none: on for SR models
    residual_scale: float = 1.0  # predict_residual: diffuse residual x this (> 1 for faint detail)
    dropout: float = 0.0  # in the residual blocks
    groups: int = 8  # GroupNorm groups (divides every level's channels)

    kind: ClassVar[str] = "unet"  # the ``kind`` a checkpoint's config.yaml names

    def __post_init__(self) -> None:
        if self.residual_scale <= 0:
            raise ConfigError(f"residual_scale={self.residual_scale} must be > 0")
        levels = len(self.channel_mults)
        if levels < 1 or self.image_size % 2 ** (levels - 1):
            raise ConfigError(
                f"image_size={self.image_size} must be divisible by 2^(levels - 1) = {2 ** (levels - 1)}"
            )
        for ch in (self.base_channels * m for m in self.channel_mults):
            if ch % self.groups or (ch % self.head_channels and self.attention_levels):
                raise ConfigError(f"level channels {ch} must divide by groups={self.groups} and head_channels="
                                  f"{self.head_channels}")  # fmt: skip
        if any(not 0 <= i < levels for i in self.attention_levels):
            raise ConfigError(
                f"attention_levels={self.attention_levels} must be level indices in 0..{levels - 1}"
            )


def upsample(low_res: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """(B, C, h, w) -> (B, C, *size), bicubic (align_corners False): the super-resolution condition and the
    base a residual model's output is added to."""
    return F.interpolate(low_res, size=tuple(size), mode="bicubic", align_corners=False)


def residual_base(
    cfg: UNetConfig, low_res: Tensor | None, size: tuple[int, int] | torch.Size
) -> Tensor | None:
    """The image a ``predict_residual`` super-resolution model's sample is added to (bicubic of
    ``low_res``, (B, C, *size)); None for any other model."""
    if not cfg.low_res_channels or cfg.predict_residual is False or low_res is None:
        return None
    return upsample(low_res, size)


RESIDUAL_RANGE = 2.0  # |image - bicubic(low_res)| <= 2: both lie in [-1, 1] (bicubic's overshoot aside)


def resolve_noise(noise: NoiseConfig, cfg: UNetConfig) -> NoiseConfig:
    """``noise`` with its auto (None) fields set for the model ``cfg``: ``prediction_type`` v_prediction for
    a super-resolution model (``low_res_channels``), else epsilon; ``clip_sample_range`` (the bound on the
    predicted x0 while sampling) ``RESIDUAL_RANGE x residual_scale`` for a ``predict_residual`` model, whose
    x0 is (image - bicubic) x residual_scale, else 1 (images in [-1, 1])."""
    residual = bool(cfg.low_res_channels) and cfg.predict_residual is not False
    if noise.prediction_type is None:
        noise = replace(noise, prediction_type="v_prediction" if cfg.low_res_channels else "epsilon")
    if noise.clip_sample_range is None:
        noise = replace(noise, clip_sample_range=RESIDUAL_RANGE * cfg.residual_scale if residual else 1.0)
    return noise


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B, dim) of timesteps t (B,), as in the Transformer and DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv; + time embedding; GroupNorm, SiLU, dropout, conv; + the (projected) input."""

    def __init__(self, c_in: int, c_out: int, t_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.t_proj = nn.Linear(t_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        """x (B, c_in, H, W), ``temb`` (B, t_dim) already through SiLU (the UNet applies it once for
        every block) -> (B, c_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h += self.t_proj(temb)[:, :, None, None]  # in place: a convolution does not keep its output
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h.add_(self.skip(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, with a residual connection."""

    def __init__(self, channels: int, head_channels: int, groups: int) -> None:
        super().__init__()
        self.n_heads = max(1, channels // head_channels)  # one head when channels < head_channels
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) -> (B, C, H, W). The 1x1 convolutions run as matrix products over the H*W
        positions (B, HW, C) (the same weights; a 1x1 convolution is slower on a CPU), which also gives
        scaled_dot_product_attention q, k, v with contiguous rows (its fused kernel)."""
        B, C, H, W = x.shape
        d = C // self.n_heads
        h = self.norm(x).reshape(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        qkv = F.linear(h, self.qkv.weight.reshape(3 * C, C), self.qkv.bias)  # (B, HW, 3C): q | k | v
        q, k, v = qkv.reshape(B, H * W, 3, self.n_heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)  # heads joined
        y = F.linear(y, self.out.weight.reshape(C, C), self.out.bias)  # (B, HW, C)
        return x + y.transpose(1, 2).reshape(B, C, H, W)


class UNet(nn.Module):
    """See the module doc. ``forward(x, t, class_labels=None, low_res=None)`` -> (B, in_channels, H, W)."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        c0, t_dim = cfg.base_channels, 4 * cfg.base_channels
        self.time_mlp = nn.Sequential(nn.Linear(c0, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.class_emb = nn.Embedding(cfg.num_classes + 1, t_dim) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(cfg.in_channels + cfg.low_res_channels, c0, 3, padding=1)

        def block(c_in: int, c_out: int, level: int) -> nn.ModuleList:
            parts: list[nn.Module] = [ResBlock(c_in, c_out, t_dim, cfg.groups, cfg.dropout)]
            if level in cfg.attention_levels:
                parts.append(SelfAttention(c_out, cfg.head_channels, cfg.groups))
            return nn.ModuleList(parts)

        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        skips, ch = [c0], c0
        for level, mult in enumerate(cfg.channel_mults):
            for _ in range(cfg.num_res_blocks):
                self.down.append(block(ch, c0 * mult, level))
                ch = c0 * mult
                skips.append(ch)
            if level < len(cfg.channel_mults) - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, t_dim, cfg.groups, cfg.dropout),
                                  SelfAttention(ch, cfg.head_channels, cfg.groups),
                                  ResBlock(ch, ch, t_dim, cfg.groups, cfg.dropout)])  # fmt: skip
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mults))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(block(ch + skips.pop(), c0 * mult, level))
                ch = c0 * mult
            if level > 0:
                self.upsample.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.norm_out = nn.GroupNorm(cfg.groups, ch)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # start by predicting zero
        nn.init.zeros_(self.conv_out.bias)  # type: ignore[arg-type]  # (a Conv2d made with bias=True)

    def forward(
        self, x: Tensor, t: Tensor, class_labels: Tensor | None = None, low_res: Tensor | None = None
    ) -> Tensor:
        """x (B, C, H, W) at timesteps t (B,) (or one int) -> the prediction (B, C, H, W).
        ``class_labels`` (B,) in [0, num_classes] (num_classes: the null class; None: all null);
        ``low_res`` (B, C, h, w) for a super-resolution model. Raises ``ValueError`` for a missing or
        unexpected condition."""
        cfg = self.config
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        temb = self.time_mlp(timestep_embedding(t, cfg.base_channels))
        if self.class_emb is not None:
            if class_labels is None:
                class_labels = torch.full((x.shape[0],), cfg.num_classes or 0, device=x.device)
            temb = temb + self.class_emb(class_labels)
        elif class_labels is not None:
            raise ValueError("class_labels given to an unconditional UNet (num_classes is None)")
        temb = F.silu(temb)  # every residual block's projection takes SiLU(temb): computed once here
        if cfg.low_res_channels:
            if low_res is None:
                raise ValueError("this UNet is a super-resolution model: pass low_res (B, C, h, w)")
            x = torch.cat([x, upsample(low_res, x.shape[-2:])], dim=1)
        h = self.conv_in(x)
        hs = [h]
        blocks = iter(self.down)
        for level in range(len(cfg.channel_mults)):
            for _ in range(cfg.num_res_blocks):
                h = self._run(next(blocks), h, temb)
                hs.append(h)
            if level < len(cfg.channel_mults) - 1:
                h = self.downsample[level](h)
                hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, temb)), temb)
        blocks = iter(self.up)
        for i, level in enumerate(reversed(range(len(cfg.channel_mults)))):
            for _ in range(cfg.num_res_blocks + 1):
                h = self._run(next(blocks), torch.cat([h, hs.pop()], dim=1), temb)
            if level > 0:
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))

    @staticmethod
    def _run(parts: nn.Module, h: Tensor, temb: Tensor) -> Tensor:
        """A level's residual block, then its attention when it has one."""
        assert isinstance(parts, nn.ModuleList)
        h = parts[0](h, temb)
        return parts[1](h) if len(parts) > 1 else h

    def num_params(self) -> int:
        """Parameters (shared ones once)."""
        return sum(p.numel() for p in self.parameters())

    def flops(self, batch_size: int = 1) -> int:
        """FLOPs of one forward pass of ``batch_size`` images, counted by torch's FlopCounterMode (matmuls
        and convolutions, 2 per multiply-add)."""
        from torch.utils.flop_counter import FlopCounterMode

        cfg = self.config
        device = self.conv_in.weight.device
        x = torch.zeros(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
        low = torch.zeros(batch_size, cfg.low_res_channels, cfg.image_size // 2, cfg.image_size // 2,
                          device=device)  # fmt: skip
        counter = FlopCounterMode(display=False)
        was_training = self.training
        self.eval()  # no dropout: counting must not draw from the random generator (exact resume)
        with counter, torch.no_grad():
            self(
                x,
                torch.zeros(batch_size, dtype=torch.long, device=device),
                low_res=low if cfg.low_res_channels else None,
            )
        self.train(was_training)
        return int(counter.get_total_flops())
