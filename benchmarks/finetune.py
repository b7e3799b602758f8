"""Fine-tuning throughput and memory on SmolLM2-135M: full fine-tuning, LoRA, LoRA over an int8 base
(QLoRA-style), against ``transformers`` + PEFT LoRA on the same weights, data, batch and length.

Every configuration runs in its own subprocess (clean peak RSS), on the same random token batches, with
the same step: forward, next-token cross-entropy over the fp32 logits, backward, AdamW on the trainable
parameters. The base weights are SmolLM2's packaged GGUF dequantized once and exported as an HF folder,
which both lamina (``lamina.load``) and ``transformers`` (``LlamaForCausalLM.from_pretrained``) read.

- lamina full: every parameter trains (fp32).
- lamina LoRA: r=16, lora_alpha=32, all linear layers of the blocks (``LoraConfig(target_modules="all-linear")``), fp32 base.
- lamina LoRA int8 base: the same adapters (fp32) over lamina's int8 weight-only base, bf16 activations
  (``LoraConfig(base_weights="int8")``); int4 with ``--configs ...,lora-int4``.
- transformers + PEFT LoRA: ``peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")``, fp32.

Peak RSS is the process's high-water mark (VmHWM) over the timed steps: it is reset
(``/proc/self/clear_refs``) after the model is built, so loading does not count. tokens/s is over the
steps after warm-up; with ``--rounds`` > 1 the configurations alternate and each keeps its best rate.

Targets (``headline:`` lines): lamina LoRA >= 1.0x the tokens/s of transformers + PEFT (at no more peak
memory: printed), and the int8-base LoRA's peak RSS below the fp32 LoRA's (headline: the fp32 LoRA's
peak over the int8 one's, target >= 1x).

    python benchmarks/finetune.py [--batch 4] [--seq-len 256] [--steps 4] [--warmup 1] [--rounds 2]
    python benchmarks/finetune.py --quick      # batch 2 x 128, 2 steps after 1 warm-up, one round
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ("lamina-full", "lamina-lora", "lamina-lora-int8", "peft-lora")
LABELS = {
    "lamina-full": "lamina full fine-tuning (fp32)",
    "lamina-lora": "lamina LoRA r=16 all-linear (fp32)",
    "lamina-lora-int8": "lamina LoRA r=16 over int8 base",
    "lamina-lora-int4": "lamina LoRA r=16 over int4 base",
    "peft-lora": "transformers + PEFT LoRA r=16 (fp32)",
}
R, ALPHA = 16, 32


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current RSS


def run_one(name: str, hf_dir: str, batch: int, seq_len: int, steps: int, warmup: int, threads: int) -> dict:
    """Build configuration ``name``, time its steps; return tokens/s and memory (MiB)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if name == "peft-lora":
        import peft
        import transformers as tf

        hf = tf.LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
        model = peft.get_peft_model(hf, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear"))

        def logits(ids: torch.Tensor) -> torch.Tensor:
            return model(input_ids=ids).logits
    else:
        import lamina
        from lamina.model.lora import LoraConfig, apply_lora

        net = lamina.load(hf_dir).model
        if name != "lamina-full":
            fmt = {"lamina-lora": None, "lamina-lora-int8": "int8", "lamina-lora-int4": "int4"}[name]
            apply_lora(
                net, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["all-linear"], base_weights=fmt)
            )
        model = net

        def logits(ids: torch.Tensor) -> torch.Tensor:
            return net(ids)

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = 49152
    gc.collect()
    after_build = _rss_mib("VmRSS")
    _reset_peak()
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        x = torch.randint(0, vocab, (batch, seq_len + 1), generator=torch.Generator().manual_seed(i))
        loss = F.cross_entropy(logits(x[:, :-1]).flatten(0, 1).float(), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - t0
    return {
        "tokens_per_s": steps * batch * seq_len / elapsed,
        "peak_rss_mib": _rss_mib("VmHWM"),
        "rss_after_build_mib": after_build,
        "trainable": trainable,
        "loss": float(loss),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="alternate the configurations this many times")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(LABELS)}")
    ap.add_argument("--quick", action="store_true", help="batch 2 x 128, 2 steps after 1 warm-up, one round")
    ap.add_argument("--run", help=argparse.SUPPRESS)  # internal: one configuration in this process
    ap.add_argument("--hf-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.batch, args.seq_len, args.steps, args.warmup, args.rounds = 2, 128, 2, 1, 1
    if args.run:
        result = run_one(
            args.run, args.hf_dir, args.batch, args.seq_len, args.steps, args.warmup, args.threads
        )
        print("RESULT " + json.dumps(result), flush=True)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import headline, machine

    import lamina

    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in LABELS]
    if unknown:
        ap.error(f"unknown configurations {unknown}; choose from {', '.join(LABELS)}")
    print(f"machine: {machine(args.threads)}")
    print(
        f"SmolLM2-135M, batch {args.batch} x {args.seq_len}, {args.steps} steps after {args.warmup} warm-up"
    )
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = lamina.convert("smollm2", Path(tmp) / "hf", to="hf")
        for _ in range(args.rounds):
            for name in configs:
                cmd = [sys.executable, __file__, "--run", name, "--hf-dir", str(hf_dir), "--batch", str(args.batch),
                       "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--threads", str(args.threads)]  # fmt: skip
                env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                    raise SystemExit(f"configuration {name} failed (exit {proc.returncode})")
                r = json.loads(line[len("RESULT ") :])
                best = results.get(name)
                if best is None or r["tokens_per_s"] > best["tokens_per_s"]:
                    results[name] = {**r, "peak_rss_mib": max(r["peak_rss_mib"], (best or r)["peak_rss_mib"])}
                elif r["peak_rss_mib"] > best["peak_rss_mib"]:
                    best["peak_rss_mib"] = r["peak_rss_mib"]
                print(
                    f"  {name}: {r['tokens_per_s']:.1f} tokens/s, peak RSS {r['peak_rss_mib']:.0f} MiB",
                    flush=True,
                )
    print(f"\n{'':40}{'tokens/s':>10}{'peak RSS MiB':>14}{'after build':>13}{'trainable':>13}")
    for name in configs:
        r = results[name]
        print(f"{LABELS[name]:40}{r['tokens_per_s']:>10.1f}{r['peak_rss_mib']:>14.0f}"
              f"{r['rss_after_build_mib']:>13.0f}{r['trainable']:>13,}")  # fmt: skip
    if "lamina-lora" in results and "peft-lora" in results:
        ours, ref = results["lamina-lora"], results["peft-lora"]
        print(
            f"\nlamina LoRA peak RSS {ours['peak_rss_mib']:.0f} MiB vs transformers + PEFT {ref['peak_rss_mib']:.0f} MiB"
        )
        headline("LoRA r=16 tokens/s", ours["tokens_per_s"] / ref["tokens_per_s"], "transformers + PEFT", 1.0)
    if "lamina-lora" in results and "lamina-lora-int8" in results:
        ratio = results["lamina-lora"]["peak_rss_mib"] / results["lamina-lora-int8"]["peak_rss_mib"]
        headline("LoRA peak RSS fp32 base / int8 base", ratio, "int8-base LoRA", 1.0)


if __name__ == "__main__":
    main()
