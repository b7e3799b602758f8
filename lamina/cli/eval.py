"""``lamina eval MODEL --tasks ... --data DIR [--shots K] [--limit N] [--out results.json]`` and
``lamina eval compare A.json B.json``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lamina.cli.flags import add_config_file, add_fields, values
from lamina.errors import ConfigError
from lamina.eval.runner import EvalConfig
from lamina.fields import build

LAYOUT = (
    "Where the published files go under --data DIR: mmlu/test/*_test.csv + mmlu/dev/*_dev.csv; "
    "ARC-Easy/ARC-Easy-{Test,Train}.jsonl (ARC-Challenge the same); hellaswag/hellaswag_{val,train}.jsonl; "
    "truthfulqa/mc_task.json (truthfulqa_mc1, truthfulqa_mc2); WiC/{val,train}.jsonl (wic); "
    "bigbench/NAME/task.json (bigbench_NAME); gsm8k/{test,train}.jsonl; squad/dev-v1.1.json. "
    "A folder of HF datasets parquet files (test-*.parquet, ...) works in place of each."
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``eval`` verb."""
    p = sub.add_parser(
        "eval",
        help="score a model on benchmarks (MMLU, ARC, HellaSwag, TruthfulQA, WiC, BIG-bench, GSM8K) or "
        "perplexity; compare two results",
        description="Score MODEL on --tasks read from their published files under --data, as "
        "lm-evaluation-harness scores them (log-likelihood of each choice; acc, acc_norm, mc2; exact "
        "match / F1 / numeric answers for generation tasks), and/or its --perplexity on text or token shards. Prints a "
        "table; --out writes JSON with the config, versions and per-item records. `lamina eval compare "
        "A.json B.json` prints each task's change with a paired bootstrap 95% interval. " + LAYOUT,
        epilog="example: lamina eval smollm2 --tasks arc_easy,hellaswag --data data/ --shots 5 --limit 200 "
        "--out results.json",
    )
    p.add_argument("model", metavar="MODEL", help="model path or name (e.g. smollm2), or `compare`")
    p.add_argument("results", nargs="*", metavar="RESULT", help="with `compare`: A.json B.json")
    p.add_argument("--out", dest="output", help="write the results as JSON to this file")
    add_config_file(p)
    add_fields(p, EvalConfig, title="evaluation (EvalConfig)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the table (or compare two results)."""
    if args.model == "compare":
        from lamina.eval.compare import compare_results, format_comparison

        if len(args.results) != 2:
            raise ConfigError("usage: lamina eval compare A.json B.json (two `lamina eval --out` files)")
        print(format_comparison(compare_results(*args.results)))
        return 0
    if args.results:
        raise ConfigError(f"unexpected arguments {args.results}: give one MODEL (or `compare A.json B.json`)")
    from tqdm import tqdm

    from lamina.eval.runner import evaluate, format_table, print_skipped

    config = build(EvalConfig, values(args, EvalConfig))
    bars: dict[str, tqdm] = {}

    def progress(name: str, done: int, total: int) -> None:
        bar = bars.get(name)
        if bar is None:
            bar = bars[name] = tqdm(total=total, desc=name, unit="item", file=sys.stderr, disable=None)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    result = evaluate(args.model, config, progress)
    print_skipped(result)
    print(format_table(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.output}", file=sys.stderr)
    return 0
