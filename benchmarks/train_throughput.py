"""Training throughput and model-FLOPs utilisation (MFU): lamina's trainer vs a bare PyTorch loop.

GPT with 6 layers, 6 heads, d_model 384, vocabulary 50304, context 256, batch 8, fp32 on CPU. In the
same process: the machine's fp32 2048x2048 matmul rate (the MFU denominator), a bare reference loop
(forward, cross-entropy, backward, AdamW step on the same model and batches), and lamina's
``train()``. MFU counts 6 x (matmul parameters, output head included) + 12 x n_layers x d_model x
context FLOPs per token (``ModelConfig.flops_per_token``), against the measured matmul rate of the
precision the row computes in (fp32, or bf16 for the bf16 autocast row).

Targets (one ``headline:`` line each at the end, see common.py): lamina fp32 >= 0.95x the bare loop's
tokens/s, and fp32 MFU >= 60% (0.6x the fp32 matmul rate); with the bf16 variant on a CPU with native
bf16 (AVX-512 BF16 or AMX, detected by torch at run time), bf16 autocast MFU >= 60% of the bf16 matmul
rate measured in the same run (on other CPUs the run says that fp32 is the precision to train in). The
run prints what the trainer's default ``precision: auto`` picks on this machine
(``lamina.train.precision``); every row sets its precision explicitly. Runs with or without the ``train``
extra (TensorBoard, matplotlib): the timed runs write no events and no plot.

    python benchmarks/train_throughput.py [--steps 8] [--warmup 3] [--variants fp32,bf16,compile]
    python benchmarks/train_throughput.py --quick      # 3 steps after 1 warm-up, fp32 only
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F
from common import headline, machine

from lamina.config import ModelConfig, TrainConfig
from lamina.model.transformer import Transformer
from lamina.train.distributed import keep_freed_memory_on_cpu
from lamina.train.metrics import matmul_peak_flops
from lamina.train.objectives import causal_lm
from lamina.train.precision import native_bf16, resolve_precision
from lamina.train.trainer import train

B, T = 8, 256


class RandomTokens:
    """Batch i: random token ids seeded by i."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        x = torch.randint(0, self.vocab, (B, T + 1), generator=torch.Generator().manual_seed(index))
        return {"input_ids": x[:, :-1], "targets": x[:, 1:]}


def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(n_layers=6, n_heads=6, d_model=384, vocab_size=50304, max_seq_len=T))


def bare_loop(steps: int, warmup: int) -> float:
    """nanoGPT-style loop; returns tokens/s over the timed steps."""
    net = model().train()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))
    data = RandomTokens(net.config.vocab_size)
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        b = data.batch(i)
        loss = F.cross_entropy(net(b["input_ids"]).flatten(0, 1), b["targets"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * B * T / (time.perf_counter() - t0)


def lamina_loop(steps: int, warmup: int, precision: str = "fp32", compile: bool = False) -> float:
    """lamina's trainer; tokens/s from its own log window over the steps after warm-up."""
    net = model()
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            out_dir=out, max_steps=warmup + steps, warmup_steps=0, log_every=10**6, eval_every=10**6,
            save_every=10**6, progress=False, precision=precision, compile=compile, batch_size=B, seq_len=T,
        )  # fmt: skip
        timings: list[float] = []
        data = RandomTokens(net.config.vocab_size)

        class Timed:
            def batch(self, index: int) -> dict[str, torch.Tensor]:
                timings.append(time.perf_counter())
                return data.batch(index)

        train(net, cfg, Timed(), causal_lm(), tokens_per_batch=B * T)
    # from fetching batch `warmup` to fetching the last batch: `steps - 1` full steps
    return (steps - 1) * B * T / (timings[-1] - timings[warmup])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default="fp32,bf16,compile")
    ap.add_argument("--quick", action="store_true", help="a short run: 3 steps after 1 warm-up, fp32 only")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.warmup, args.variants = 3, 1, "fp32"
    if args.steps < 2:
        ap.error("--steps must be at least 2 (lamina's rate is timed between fetched batches)")
    variants = args.variants.split(",")
    torch.set_num_threads(args.threads)
    # the allocator `lamina pretrain` / `finetune` use on CPU (the whole process: the bare loop gets it too)
    kept = keep_freed_memory_on_cpu("cpu")
    cfg = model().config
    fpt = cfg.flops_per_token(T, training=True)
    peak = {"fp32": matmul_peak_flops("cpu", torch.float32)}
    if "bf16" in variants:
        peak["bf16"] = matmul_peak_flops("cpu", torch.bfloat16)
    print(f"machine: {machine(args.threads)}")
    print(
        f"malloc: {'keep_freed (as lamina pretrain on CPU)' if kept else 'glibc defaults (keep_freed not set)'}"
    )
    print(f"model: {cfg.n_params / 1e6:.1f}M parameters, {fpt / 1e6:.0f} MFLOP per token, batch {B} x {T}")
    for precision, rate in peak.items():
        print(f"measured {precision} matmul peak (2048^2): {rate / 1e9:.1f} GFLOP/s")
    native, evidence = native_bf16("cpu")
    default, why = resolve_precision("auto", "cpu")
    print(f"the trainer's default (precision: auto) trains in {default} here ({why})")
    if not native:
        print(f"no native bf16 ({evidence}): fp32 is the precision to train in here")
        if "bf16" in variants:
            print("(the bf16 row below is emulated bf16, slow; it has no target on this CPU)")
    ref = bare_loop(args.steps, args.warmup)
    rows = [("bare PyTorch loop (fp32)", "fp32", ref)]
    for v in variants:
        if v == "fp32":
            rows.append(("lamina train() fp32", "fp32", lamina_loop(args.steps, args.warmup)))
        elif v == "bf16":
            tps = lamina_loop(args.steps, args.warmup, precision="bf16")
            rows.append(("lamina train() bf16 autocast", "bf16", tps))
        elif v == "compile":
            tps = lamina_loop(args.steps, args.warmup, compile=True)
            rows.append(("lamina train() fp32 + torch.compile", "fp32", tps))
    print(f"\n{'':40}{'tokens/s':>10}{'MFU':>8}{'vs bare':>9}")
    for name, precision, tps in rows:
        print(f"{name:40}{tps:>10.1f}{fpt * tps / peak[precision]:>8.1%}{tps / ref:>8.2f}x")
    print("\nMFU of each row is against the measured matmul rate of the precision it computes in.")
    fp32 = next((tps for name, _, tps in rows if name == "lamina train() fp32"), None)
    if fp32 is not None:
        headline("train fp32 tokens/s", fp32 / ref, "bare PyTorch loop", 0.95)
        headline("train fp32 MFU", fpt * fp32 / peak["fp32"], "fp32 matmul peak", 0.6)
    bf16 = next((tps for name, _, tps in rows if name == "lamina train() bf16 autocast"), None)
    if bf16 is not None and native:  # issue 23: bf16 training at >= 60% of the bf16 matmul peak
        headline("train bf16 MFU", fpt * bf16 / peak["bf16"], "bf16 matmul peak", 0.6)


if __name__ == "__main__":
    main()
