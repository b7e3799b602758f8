"""``lamina demo``: train a small GPT on the Python standard library in a few minutes, then sample it."""

from __future__ import annotations

import argparse

from lamina.train.demo import demo, demo_run, report


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``demo`` verb."""
    p = sub.add_parser(
        "demo",
        help="train a small GPT on the embedded corpus (Python's stdlib) for a few minutes and sample it",
        description="The whole life of a model in one command, offline: the running Python's standard "
        "library source -> a byte-level BPE tokenizer -> a 4-layer GPT trained on the CPU -> validation "
        "perplexity against a unigram baseline -> samples of generated Python. Everything is written "
        "under --out (data shards, checkpoints, metrics.jsonl, curves.png).",
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument(
        "--steps", type=int, default=300, help="training steps (default 300: a few minutes on 2 cores)"
    )
    p.add_argument(
        "--max-bytes", type=int, default=3_000_000, help="bytes of stdlib source to use (default 3 MB)"
    )
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default 8192)")
    p.add_argument("--eval-every", type=int, default=50, help="validate every N steps (default 50)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo and print its report."""
    res = demo(demo_run(args.out, args.steps, args.max_bytes, args.vocab_size, eval_every=args.eval_every))
    print(report(res))
    return 0
