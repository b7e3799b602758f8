"""The UNet: shapes at every configuration, conditions that change the output (class, null class, low-res
image), parameter and FLOP counts, clear errors, and a few steps of training that lower the loss."""

from __future__ import annotations

import pytest
import torch

from lamina.diffusion.schedulers import DDPMScheduler, NoiseConfig
from lamina.diffusion.unet import ResBlock, SelfAttention, UNet, UNetConfig
from lamina.errors import ConfigError


def _randomized(cfg: UNetConfig) -> UNet:
    torch.manual_seed(0)
    net = UNet(cfg)
    torch.nn.init.normal_(
        net.conv_out.weight, std=0.05
    )  # the zero-initialised output would hide the conditions
    return net.eval()


@pytest.mark.parametrize(
    "cfg",
    [
        UNetConfig(),
        UNetConfig(
            image_size=32,
            in_channels=3,
            channel_mults=[1, 2, 2, 2],
            num_res_blocks=1,
            attention_levels=[1, 3],
        ),
        UNetConfig(image_size=8, channel_mults=[1, 2], attention_levels=[]),
    ],
)
def test_shapes(cfg: UNetConfig) -> None:
    net = _randomized(cfg)
    x = torch.randn(3, cfg.in_channels, cfg.image_size, cfg.image_size)
    assert net(x, torch.tensor([0, 5, 999])).shape == x.shape
    assert net.num_params() > 0 and net.flops() > 2 * net.num_params()  # convolutions reuse weights per pixel


def test_conditions_change_the_output() -> None:
    net = _randomized(UNetConfig(num_classes=10))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([100, 100])
    with torch.no_grad():
        a, b = net(x, t, torch.tensor([3, 3])), net(x, t, torch.tensor([4, 4]))
        null = net(x, t, torch.tensor([10, 10]))
        torch.testing.assert_close(net(x, t), null)  # no labels: the null class
    assert not torch.allclose(a, b) and not torch.allclose(a, null)
    sr = _randomized(UNetConfig(low_res_channels=1))
    low = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(sr(x, t, low_res=low), sr(x, t, low_res=torch.zeros_like(low)))
    with pytest.raises(ValueError, match="super-resolution"):
        sr(x, t)
    with pytest.raises(ValueError, match="unconditional"):
        _randomized(UNetConfig())(x, t, torch.tensor([1, 2]))
    with pytest.raises(ConfigError, match="divisible"):
        UNetConfig(image_size=10, channel_mults=[1, 2, 2])


def test_a_few_steps_lower_the_loss() -> None:
    torch.manual_seed(0)
    net = UNet(UNetConfig(image_size=8, channel_mults=[1, 2], attention_levels=[1], num_res_blocks=1))
    sched = DDPMScheduler(NoiseConfig(num_train_timesteps=100))
    x0 = torch.zeros(16, 1, 8, 8)
    x0[:, :, 2:6, 2:6] = 1.0  # one square: an easy distribution
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        noise, t = torch.randn_like(x0), torch.randint(0, 100, (16,))
        loss = torch.nn.functional.mse_loss(net(sched.add_noise(x0, noise, t), t), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_attention_and_residual_block_compute_the_convolution_formulas() -> None:
    """SelfAttention runs its 1x1 convolutions as matrix products and ResBlock adds in place (speed): the
    outputs and every gradient equal the plain formulas over the same (checkpointed) Conv2d weights."""
    F = torch.nn.functional
    torch.manual_seed(0)
    attn, block = SelfAttention(32, 16, 8), ResBlock(16, 32, 24, 8, 0.0)
    x, temb = torch.randn(3, 32, 4, 4, requires_grad=True), torch.randn(3, 24)
    assert attn.qkv.weight.shape == (96, 32, 1, 1) and attn.out.weight.shape == (32, 32, 1, 1)

    def attention_by_convolutions(x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = attn.qkv(attn.norm(x)).reshape(B, 3, 2, C // 2, H * W).unbind(1)  # heads of 16
        y = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + attn.out(y.transpose(-1, -2).reshape(B, C, H, W))

    def block_formula(x: torch.Tensor) -> torch.Tensor:
        h = block.conv1(F.silu(block.norm1(x))) + block.t_proj(F.silu(temb))[:, :, None, None]
        return block.skip(x) + block.conv2(F.silu(block.norm2(h)))

    for module, formula, inp in ((attn, attention_by_convolutions, x), (block, block_formula, x[:, :16])):
        got_args = (inp,) if module is attn else (inp, F.silu(temb))
        got, want = module(*got_args), formula(inp)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        g = torch.randn_like(want)
        grads = torch.autograd.grad(got, [x, *module.parameters()], g)
        for a, b in zip(grads, torch.autograd.grad(want, [x, *module.parameters()], g), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
