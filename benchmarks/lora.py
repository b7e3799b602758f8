"""One LoRA training step, lamina vs ``transformers`` + PEFT, on the same model, adapter and batch, in one
process with the two interleaved (so a change of machine load hits both alike).

The model is the SmolLM2-135M architecture with random weights (``--quick``: a 4-layer, 256-wide Llama);
the weights go from lamina to ``transformers.LlamaForCausalLM`` by lamina's HF export, and the adapter
(r=16, lora_alpha=32, every linear layer of the blocks, PEFT's default init with B = 0 made random so the
update is not zero) from lamina to PEFT by ``lamina.checkpoint.peft.save_adapter`` +
``peft.PeftModel.from_pretrained(..., is_trainable=True)``. Before timing, both models' first-step
losses are printed (they must agree to float rounding: the same computation).

A step: forward, next-token cross-entropy over the fp32 logits, backward, ``torch.optim.AdamW`` over the
trainable (adapter) parameters, ``zero_grad``. The rounds alternate: ``--steps`` lamina steps, then
``--steps`` PEFT steps; each step is timed alone and the medians are compared. ``--int8`` and ``--int4``
add lamina's QLoRA step (the same adapters over its int8 / int4 weight-only base, bf16 activations) as
extra rows (no reference: PEFT's QLoRA needs bitsandbytes on a GPU).

Target (``headline:``): lamina's step at least as fast as PEFT's (tokens/s ratio >= 1x).

    python benchmarks/lora.py [--batch 4] [--seq-len 256] [--steps 3] [--rounds 3] [--threads 2] [--int8]
    python benchmarks/lora.py --quick      # the small Llama, batch 4 x 128, 3 steps x 3 rounds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

R, ALPHA = 16, 32.0


def _step_fn(logits: Callable[[torch.Tensor], torch.Tensor], model: torch.nn.Module) -> Callable:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(x: torch.Tensor) -> float:
        loss = F.cross_entropy(logits(x[:, :-1]).flatten(0, 1).float(), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def build(quick: bool, quant: list[str]) -> tuple[dict[str, Callable], int, str]:
    """The step functions by configuration name, the vocabulary size and the model's description."""
    import peft
    import transformers as tf

    from lamina.checkpoint.hf import export_hf
    from lamina.checkpoint.peft import save_adapter
    from lamina.config import ModelConfig
    from lamina.model.lora import LoraConfig, apply_lora, lora_layers
    from lamina.model.transformer import Transformer

    torch.manual_seed(0)
    if quick:
        cfg = ModelConfig.preset("llama-tiny", n_layers=4, d_model=256, d_ff=688, max_seq_len=512)
        what = "small Llama (4 layers, d_model 256, vocab 8192), random weights"
    else:
        cfg = ModelConfig.preset("smollm2-135m", max_seq_len=2048)
        what = "SmolLM2-135M architecture, random weights"
    base = Transformer(cfg)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    lora = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["all-linear"])
    ours = apply_lora(base, lora)
    with torch.no_grad():
        for layer in lora_layers(ours).values():  # a non-zero update, so both compute the same sums
            layer.lora_B.weight.normal_(std=0.02)
    steps: dict[str, Callable] = {}
    with tempfile.TemporaryDirectory() as tmp:
        plain = Transformer(cfg)
        plain.load_state_dict(base_state)
        export_hf(Path(tmp) / "hf", plain)
        save_adapter(ours, Path(tmp) / "adapter")
        hf = tf.LlamaForCausalLM.from_pretrained(Path(tmp) / "hf", torch_dtype=torch.float32)
        ref = peft.PeftModel.from_pretrained(hf, Path(tmp) / "adapter", is_trainable=True)
        for fmt in quant:
            q = Transformer(cfg)
            q.load_state_dict(base_state)
            apply_lora(q, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["all-linear"], base_weights=fmt))
            q.load_state_dict({k: v for k, v in ours.state_dict().items() if ".lora_" in k}, strict=False)
            q.train()
            steps[f"lamina LoRA over {fmt} base"] = _step_fn(q, q)
    del plain
    ours.train()
    ref.train()
    steps = {
        "lamina LoRA": _step_fn(ours, ours),
        "transformers + PEFT LoRA": _step_fn(lambda ids: ref(input_ids=ids).logits, ref),
        **steps,
    }
    trainable = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (ours, ref)]
    if trainable[0] != trainable[1]:
        raise SystemExit(f"trainable parameters differ: lamina {trainable[0]:,}, PEFT {trainable[1]:,}")
    return (
        steps,
        cfg.vocab_size,
        f"{what}; LoRA r={R}, alpha={ALPHA:g}, all-linear: {trainable[0]:,} trainable",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--int8", action="store_true", help="also time lamina's LoRA over its int8 base")
    ap.add_argument("--int4", action="store_true", help="also time lamina's LoRA over its int4 base")
    ap.add_argument("--quick", action="store_true", help="the small Llama, batch 4 x 128, 3 steps x 3 rounds")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.seq_len, args.steps, args.rounds = 4, 128, 3, 3
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import headline, machine

    torch.set_num_threads(args.threads)
    print(f"machine: {machine(args.threads)}")
    load_before = os.getloadavg()[0]
    quant = [f for f in ("int8", "int4") if getattr(args, f)]
    steps, vocab, what = build(args.quick, quant)
    print(f"{what}; batch {args.batch} x {args.seq_len}")
    gen = torch.Generator().manual_seed(0)
    first = torch.randint(0, vocab, (args.batch, args.seq_len + 1), generator=gen)
    losses = {name: step(first) for name, step in steps.items()}  # also the warm-up step
    print("first-step loss: " + ", ".join(f"{n} {v:.6f}" for n, v in losses.items()))
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            for _ in range(args.steps):
                x = torch.randint(0, vocab, (args.batch, args.seq_len + 1), generator=gen)
                t0 = time.perf_counter()
                step(x)
                times[name].append(time.perf_counter() - t0)
    tokens = args.batch * args.seq_len
    print(f"\n{'':34}{'median s/step':>14}{'tokens/s':>10}{'min s':>8}{'max s':>8}")
    med = {}
    for name, ts in times.items():
        med[name] = statistics.median(ts)
        print(f"{name:34}{med[name]:>14.3f}{tokens / med[name]:>10.0f}{min(ts):>8.3f}{max(ts):>8.3f}")
    print(f"load average: {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    headline(
        "LoRA training step tokens/s",
        med["transformers + PEFT LoRA"] / med["lamina LoRA"],
        "transformers + PEFT",
        1.0,
    )


if __name__ == "__main__":
    main()
