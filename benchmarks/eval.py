"""Multiple-choice evaluation speed: lamina vs lm-evaluation-harness's ``hf`` backend, SmolLM2, 200
questions from the hand-written fixtures (ARC, HellaSwag, MMLU, TruthfulQA MC1, WiC, BIG-bench), zero-shot.

Both score the same (context, " " + choice) requests in this process with the same threads: lamina
through ``lamina.eval.multiple_choice.score_continuations`` (each question's context once into a KV cache,
then its choices), lm-eval through ``HFLM(...).loglikelihood`` on the HF export of the same fp32 weights
(batch size 16, lm-eval's own length sorting and one-token context grouping). The table gives the wall
time of each, the speed-up, and the largest difference of a choice's log-likelihood (must stay < 1e-4).
Target: lamina at least 2x faster. Ends with its ``headline:`` line (see common.py).

    python benchmarks/eval.py [--questions 200] [--threads 2] [--batch-size 16]
    python benchmarks/eval.py --quick      # 40 questions
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import headline, machine

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "eval" / "fixtures"
TASKS = ["arc_easy", "hellaswag", "mmlu", "truthfulqa_mc1", "wic", "bigbench_cause_and_effect"]


def questions(lm, n: int) -> list[tuple[str, list[str]]]:
    """``n`` (context, choices) taken round-robin over the fixture tasks (repeating when n is larger)."""
    from lamina.eval.tasks import load_task

    pools = [
        [(t.context(i), i.choices) for i in t.items] for t in (load_task(name, FIXTURES) for name in TASKS)
    ]
    out, k = [], 0
    while len(out) < n:
        pool = pools[k % len(pools)]
        out.append(pool[(k // len(pools)) % len(pool)])
        k += 1
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16, help="lm-eval hf backend's batch size")
    p.add_argument("--quick", action="store_true", help="40 questions")
    args = p.parse_args()
    n = 40 if args.quick else args.questions
    torch.set_num_threads(args.threads)
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    import lamina
    from lamina.checkpoint.hf import export_hf
    from lamina.eval.multiple_choice import encode_pair, prefix_token_id, score_continuations

    print(machine(args.threads))
    lm = lamina.load("smollm2")
    qs = questions(lm, n)
    n_choices = sum(len(c) for _, c in qs)
    print(f"{n} questions, {n_choices} choices")
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = export_hf(Path(tmp) / "hf", lm.model, lm.tokenizer, lm.generation)
        ref = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=args.batch_size)
        requests = [Instance(request_type="loglikelihood", doc={}, arguments=(c, " " + ch), idx=i)
                    for c, chs in qs for i, ch in enumerate(chs)]  # fmt: skip
        t0 = time.perf_counter()
        want = [ll for ll, _ in ref.loglikelihood(requests, disable_tqdm=True)]
        t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    prefix = prefix_token_id(lm)
    reqs = []
    for c, chs in qs:
        pairs = [encode_pair(lm.tokenizer, c, " " + ch, prefix) for ch in chs]
        reqs.append((pairs[0][0], [cont for _, cont in pairs]))
    got = [ll for scores in score_continuations(lm.model, reqs) for ll, _ in scores]
    t_lamina = time.perf_counter() - t0
    diff = max(abs(a - b) for a, b in zip(got, want, strict=True))
    print(f"{'':<22} {'seconds':>8} {'questions/s':>12}")
    print(f"{'lm-eval hf backend':<22} {t_ref:>8.2f} {n / t_ref:>12.2f}")
    print(f"{'lamina':<22} {t_lamina:>8.2f} {n / t_lamina:>12.2f}")
    print(f"max |log-likelihood difference| = {diff:.2e}")
    if diff > 1e-4:
        print("log-likelihoods differ by more than 1e-4", file=sys.stderr)
    headline(f"multiple-choice eval {n} questions SmolLM2", t_ref / t_lamina, "lm-eval hf", 2)


if __name__ == "__main__":
    main()
