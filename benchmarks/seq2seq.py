"""Seq2seq greedy generation on CPU: lamina ``generate_seq2seq`` (the engine that serves decoders too,
``lamina.generate.engine.Engine``) vs `transformers` ``T5ForConditionalGeneration.generate`` on the same
t5-small-shaped random weights.

The `transformers` model is built from a ``T5Config`` of t5-small's shape (6+6 layers, d_model 512, 8 heads,
d_ff 2048, vocab 32128, ReLU, tied embeddings), randomly initialised, saved to a temporary folder and read
back with ``lamina.load(..., weights="fp32")`` (the inference format: each linear but the head prepacked
for oneDNN in place, ``lamina.model.quant.PackedLinear``; bf16: ``weights="bf16"``), so both hold the
same weights. Before timing, the greedy ids of both are checked equal on the benchmark's sources. Every generation produces exactly ``--tokens`` new tokens in
both systems (``min_new_tokens`` bans eos until then), from sources of 24 to 40 tokens (batch 8: eight
different lengths, right-padded). Each repeat times every task once, round-robin, so that load from
other jobs falls on both systems alike; figures are medians over ``--repeats``. Both run with the same
``torch.set_num_threads``. fp32 always; bf16 as well when the CPU has native bf16 (AVX-512 BF16 or AMX)
or with ``--dtypes fp32,bf16``.

fp32 is also timed as ``lamina.load(..., weights="fp32", compile=True)`` (unpacked weights and the
ahead-of-time compiled decoder step of ``lamina.model.aot``: compiled once, ~1 minute, then read from
``$LAMINA_COMPILE_CACHE``; not timed), its greedy ids checked too; ``--no-compile`` skips it.

Targets (one ``headline:`` line each at the end, see common.py): greedy tokens/s >= 1.5x `transformers`
at batch 1 and at batch 8 (fp32; lamina's faster fp32 way at that batch size, named in the line when it
is the compiled one). `transformers` runs eager fp32 (bf16 rows: both in bf16).

    python benchmarks/seq2seq.py [--tokens 64] [--repeats 5] [--threads 2] [--dtypes fp32,bf16]
    python benchmarks/seq2seq.py --quick      # 16 tokens, 1 repeat, fp32 only, no compile
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from common import cpu_features, headline, machine

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_avg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per target (forced: no early eos)")
    ap.add_argument("--batch", type=int, default=8, help="sources per batch for the batched comparison")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", default=None, help="fp32,bf16 (default: bf16 too where the CPU has it)")
    ap.add_argument("--quick", action="store_true", help="16 tokens, 1 repeat, fp32 only, no --compile")
    ap.add_argument("--no-compile", action="store_true", help="skip lamina.load(compile=True) (fp32)")
    args = ap.parse_args()
    native_bf16 = bool({"avx512_bf16", "amx"} & set(cpu_features()))
    dtypes = (args.dtypes or ("fp32,bf16" if native_bf16 else "fp32")).split(",")
    if args.quick:
        args.tokens, args.repeats, dtypes, args.no_compile = 16, 1, ["fp32"], True
    if unknown := set(dtypes) - set(DTYPES):
        ap.error(f"--dtypes: unknown {', '.join(sorted(unknown))} (choose from {', '.join(DTYPES)})")
    torch.set_num_threads(args.threads)

    import transformers as tf

    import lamina
    from lamina.config import GenerationConfig
    from lamina.generate.seq2seq import generate_seq2seq

    N, B = args.tokens, args.batch
    torch.manual_seed(0)
    hc = tf.T5Config(
        vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="relu",
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    ref_fp32 = tf.T5ForConditionalGeneration(hc).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ref_fp32.save_pretrained(tmp)
        # lamina's inference formats (lamina.load(..., weights=)): fp32 weights prepacked for oneDNN
        mine = {d: lamina.load(tmp, weights=d).model.eval() for d in dtypes}
        if "fp32" in dtypes and not args.no_compile:  # fp32 unpacked + the compiled decoder step (aot.py)
            t = time.perf_counter()
            mine["fp32+compile"] = lamina.load(tmp, weights="fp32", compile=True).model.eval()
            print(f"lamina.load(compile=True): {time.perf_counter() - t:.0f} s (compiled once, then cached)")
    refs = {d: copy.deepcopy(ref_fp32).to(DTYPES[d]) for d in dtypes}  # .to() is in place
    variants = {d: d for d in dtypes} | ({"fp32+compile": "fp32"} if "fp32+compile" in mine else {})
    g = torch.Generator().manual_seed(1)
    sources = [torch.randint(2, 32128, (24 + 2 * i,), generator=g).tolist() for i in range(B)]

    print(f"machine: {machine(args.threads)}")
    print(f"t5-small shape, random weights, greedy, {N} new tokens forced, sources of 24-{24 + 2 * (B - 1)} "
          f"tokens, median of {args.repeats}, dtypes {','.join(dtypes)}\n")  # fmt: skip

    def hf_run(model: tf.T5ForConditionalGeneration, srcs: list[list[int]]) -> list[list[int]]:
        S = max(len(s) for s in srcs)
        ids = torch.tensor([s + [0] * (S - len(s)) for s in srcs])
        mask = torch.tensor([[1] * len(s) + [0] * (S - len(s)) for s in srcs])
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=N, min_new_tokens=N, do_sample=False,
            num_beams=1, eos_token_id=1, pad_token_id=0, decoder_start_token_id=0,
        )  # fmt: skip
        assert out.shape[1] == N + 1
        return out[:, 1:].tolist()

    gen_cfg = GenerationConfig(max_new_tokens=N, min_new_tokens=N, temperature=0, eos_token_ids=[1])

    def lamina_run(model: torch.nn.Module, srcs: list[list[int]]) -> list[list[int]]:
        out = [r[0].token_ids for r in generate_seq2seq(model, srcs, gen_cfg)]  # type: ignore[arg-type]
        assert all(len(o) == N for o in out)
        return out

    tasks: dict[tuple[str, str, int], Callable[[], object]] = {}
    agree: dict[str, str] = {}
    with torch.inference_mode():
        for v, d in variants.items():
            a, b = hf_run(refs[d], sources[:4]), lamina_run(mine[v], sources[:4])
            same = sum(x == y for x, y in zip(a, b, strict=True))
            agree[v] = f"{same}/4"
            if d == "fp32":
                assert same == 4, f"{v} greedy ids differ from transformers on {4 - same} of 4 sources"
            for bs in (1, B):
                srcs = sources[:bs]
                if v == d:
                    tasks[(d, "transformers", bs)] = lambda m=refs[d], s=srcs: hf_run(m, s)
                tasks[(v, "lamina", bs)] = lambda m=mine[v], s=srcs: lamina_run(m, s)
        print(f"greedy ids equal to transformers on 4 sources: {agree}", flush=True)
        times: dict[tuple[str, str, int], list[float]] = {k: [] for k in tasks}
        for fn in tasks.values():  # warm-up
            fn()
        for r in range(args.repeats):
            for key, fn in tasks.items():
                t = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t)
            print(f"  repeat {r + 1}/{args.repeats} done, load average {load_avg()}", flush=True)
    rate = {k: N * k[2] / statistics.median(v) for k, v in times.items()}

    print(f"\n{'tokens/s':14}{'batch':>6}{'transformers':>14}{'lamina':>10}{'lamina/hf':>11}")
    for v, d in variants.items():
        for bs in (1, B):
            h, m = rate[(d, "transformers", bs)], rate[(v, "lamina", bs)]
            print(f"{v:14}{bs:>6}{h:>14.1f}{m:>10.1f}{m / h:>11.2f}")
    print(f"\nload average now {load_avg()}")
    main_dtype = "fp32" if "fp32" in dtypes else dtypes[0]
    for bs in (1, B):  # lamina's faster fp32 way at this batch size (eager prepacked, or --compile)
        v = max((v for v, d in variants.items() if d == main_dtype), key=lambda v: rate[(v, "lamina", bs)])
        ratio = rate[(v, "lamina", bs)] / rate[(main_dtype, "transformers", bs)]
        what = f"seq2seq greedy batch {bs}" + ("" if v == "fp32" else f" {v}")
        headline(what, ratio, "transformers", 1.5)


if __name__ == "__main__":
    main()
