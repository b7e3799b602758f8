"""``lamina demo``: train a small GPT on the Python standard library in a few minutes, then sample it."""

from __future__ import annotations

import argparse

from lamina.cli.flags import add_config_file, add_fields, values
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
        epilog="example: lamina demo --steps 60 --out runs/demo-short   (a shorter run, about a minute)",
    )
    add_config_file(p)
    add_fields(p, demo_run, title="the demo run (lamina.train.demo.demo_run)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo and print its report."""
    res = demo(demo_run(**values(args, demo_run)))
    print(report(res))
    return 0
