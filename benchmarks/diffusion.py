"""Diffusion on a CPU: training images/s and sampling images/s, lamina vs `diffusers` (issue 21).

The same UNet shape on both sides: the README's digits model (16x16 grey images, 16 base channels,
levels x1 x2 x2, one residual block per level, self-attention at the lowest level and in the middle,
heads of 16 channels, GroupNorm of 8 groups), lamina's ``UNet`` and diffusers' ``UNet2DModel`` with
the matching blocks (parameter counts printed; they are equal), random weights, fp32, the cosine noise
schedule (diffusers' ``squaredcos_cap_v2``), epsilon prediction.

* training: lamina's ``train()`` (the one trainer, the diffusion objective, AdamW, gradient clipping
  at 1.0, EMA weights 0.999) against the loop of diffusers' ``train_unconditional.py`` example
  (``DDPMScheduler.add_noise``, MSE, AdamW, ``clip_grad_norm_`` 1.0, ``EMAModel`` 0.999), the same
  batch size; images/s over the timed steps.
  Both loops run under the same glibc malloc settings: ``lamina diffusion train`` keeps the memory a
  step frees for the next step (``lamina.malloc.set_malloc_policy("keep_freed")``, process-wide); the
  benchmark sets it before either loop runs, so the diffusers loop has it too and the ratio compares
  the steps' work, not the allocator.
* sampling: ``lamina.diffusion.pipelines.sample`` (DDIM, 50 steps, eta 0) against diffusers'
  ``DDIMPipeline`` (50 steps, eta 0, ``use_clipped_model_output`` as lamina), the same batch; images/s.

Targets: lamina >= 1.0x diffusers for both (one ``headline:`` line each, see common.py). One thread
by default (the README's training command sets one; on a shared 2-core machine two threads can
busy-wait); ``--threads 2`` for both cores.

    python benchmarks/diffusion.py [--batch-size 64] [--train-steps 20] [--images 64] [--repeats 3]
    python benchmarks/diffusion.py --quick      # 5 training steps, 16 images sampled, 1 repeat
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F
from common import headline, machine

from lamina.config import TrainConfig
from lamina.diffusion.pipelines import sample
from lamina.diffusion.schedulers import NoiseConfig
from lamina.diffusion.training import DiffusionObjective
from lamina.diffusion.unet import UNet, UNetConfig
from lamina.malloc import set_malloc_policy
from lamina.train.trainer import train

SIZE, CHANNELS, BASE, MULTS, HEAD = 16, 1, 16, (1, 2, 2), 16


def lamina_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(image_size=SIZE, in_channels=CHANNELS, base_channels=BASE, channel_mults=list(MULTS),
                           num_res_blocks=1, attention_levels=[len(MULTS) - 1], head_channels=HEAD))  # fmt: skip


def diffusers_unet() -> Any:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    down = ["DownBlock2D"] * (len(MULTS) - 1) + ["AttnDownBlock2D"]
    return UNet2DModel(
        sample_size=SIZE, in_channels=CHANNELS, out_channels=CHANNELS, block_out_channels=[BASE * m for m in MULTS],
        layers_per_block=1, down_block_types=down, up_block_types=["AttnUpBlock2D"] + ["UpBlock2D"] * (len(MULTS) - 1),
        attention_head_dim=HEAD, norm_num_groups=8,
    )  # fmt: skip


def diffusers_schedulers() -> tuple[Any, Any]:
    from diffusers import DDIMScheduler, DDPMScheduler

    kw = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    return DDPMScheduler(**kw), DDIMScheduler(**kw)


class RandomImages:
    """Batch i: images in [-1, 1] seeded by i (no labels: an unconditional model on both sides)."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(index)
        x = torch.rand(self.batch_size, CHANNELS, SIZE, SIZE, generator=g) * 2 - 1
        return {"images": x, "labels": torch.zeros(self.batch_size, dtype=torch.long)}


def lamina_training(steps: int, warmup: int, batch_size: int, threads: int) -> float:
    """lamina's trainer; images/s between fetching batch ``warmup`` and the last batch."""
    net = lamina_unet()
    data = RandomImages(batch_size)
    timings: list[float] = []

    class Timed:
        def batch(self, index: int) -> dict[str, torch.Tensor]:
            timings.append(time.perf_counter())
            return data.batch(index)

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(out_dir=out, max_steps=warmup + steps + 1, warmup_steps=0, lr=1e-3, weight_decay=0.0,
                          batch_size=batch_size, log_every=10**6, eval_every=10**6, save_every=10**6,
                          progress=False, threads=threads, precision="fp32")  # fmt: skip
        train(net, cfg, Timed(), DiffusionObjective(NoiseConfig(), None), tokens_per_batch=batch_size,
              perplexity=False, ema_decay=0.999)  # fmt: skip
    return steps * batch_size / (timings[warmup + steps] - timings[warmup])


def diffusers_training(steps: int, warmup: int, batch_size: int) -> float:
    """diffusers' train_unconditional.py loop, without accelerate (one CPU process)."""
    from diffusers.training_utils import EMAModel

    net = diffusers_unet().train()
    ddpm, _ = diffusers_schedulers()
    ema = EMAModel(net.parameters(), decay=0.999, use_ema_warmup=False)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
    data = RandomImages(batch_size)
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        x0 = data.batch(i)["images"]
        noise = torch.randn_like(x0)
        t = torch.randint(0, ddpm.config.num_train_timesteps, (batch_size,))
        pred = net(ddpm.add_noise(x0, noise, t), t).sample
        F.mse_loss(pred.float(), noise.float()).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(net.parameters())
    return steps * batch_size / (time.perf_counter() - t0)


def median_rate(fn: Any, n: int, repeats: int) -> float:
    """Median images/s of ``fn()`` (which makes ``n`` images) over ``repeats`` timed runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return n / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=64, help="training batch")
    ap.add_argument("--train-steps", type=int, default=20, help="timed training steps (after 3 warm-up)")
    ap.add_argument("--images", type=int, default=64, help="images sampled per run (one batch)")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps")
    ap.add_argument("--repeats", type=int, default=3, help="timed sampling runs (median)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="5 training steps, 16 images sampled, 1 repeat")
    args = ap.parse_args()
    warmup = 3
    if args.quick:
        args.train_steps, args.images, args.repeats, warmup = 5, 16, 1, 1
    torch.set_num_threads(args.threads)
    kept = set_malloc_policy("keep_freed")  # for both loops (see the module doc)
    from diffusers import DDIMPipeline

    ours, ref = lamina_unet().eval(), diffusers_unet().eval()
    n_ours, n_ref = ours.num_params(), sum(p.numel() for p in ref.parameters())
    print(f"machine: {machine(args.threads)}")
    print(f"UNet {SIZE}x{SIZE}x{CHANNELS}, channels {[BASE * m for m in MULTS]}: lamina {n_ours:,} parameters, "
          f"diffusers {n_ref:,}; {ours.flops() / 1e6:.1f} MFLOP per image forward")  # fmt: skip
    print(f"malloc: freed memory kept between steps for both loops: {'yes' if kept else 'no (not glibc, the environment sets malloc, or LAMINA_MALLOC=off)'}")  # fmt: skip

    # interleaved, so a change of machine load hits both sides
    train_ref, train_ours = [], []
    for _ in range(2 if not args.quick else 1):
        train_ref.append(diffusers_training(args.train_steps, warmup, args.batch_size))
        train_ours.append(lamina_training(args.train_steps, warmup, args.batch_size, args.threads))
    t_ref, t_ours = max(train_ref), max(train_ours)

    _, ddim = diffusers_schedulers()
    pipe = DDIMPipeline(unet=ref, scheduler=ddim)
    pipe.set_progress_bar_config(disable=True)

    def run_ref() -> object:
        g = torch.Generator().manual_seed(0)
        return pipe(batch_size=args.images, generator=g, eta=0.0, num_inference_steps=args.steps,
                    use_clipped_model_output=True, output_type="np")  # fmt: skip

    def run_ours() -> object:
        return sample(ours, NoiseConfig(), args.images, steps=args.steps, seed=0, batch_size=args.images,
                      progress=False)  # fmt: skip

    s_ref = median_rate(run_ref, args.images, args.repeats)
    s_ours = median_rate(run_ours, args.images, args.repeats)

    print(f"\n{'':34}{'diffusers':>11}{'lamina':>10}{'ratio':>8}")
    print(
        f"{f'training images/s (batch {args.batch_size})':34}{t_ref:>11.1f}{t_ours:>10.1f}{t_ours / t_ref:>7.2f}x"
    )
    print(
        f"{f'sampling images/s (DDIM {args.steps})':34}{s_ref:>11.2f}{s_ours:>10.2f}{s_ours / s_ref:>7.2f}x"
    )
    print(f"training: best of {len(train_ref)} runs of {args.train_steps} steps each; sampling: median of "
          f"{args.repeats} runs of {args.images} images")  # fmt: skip
    headline("diffusion training images/s", t_ours / t_ref, "diffusers", 1)
    headline(f"diffusion DDIM-{args.steps} sampling images/s", s_ours / s_ref, "diffusers", 1)


if __name__ == "__main__":
    main()
