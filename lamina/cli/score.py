"""``lamina score MODEL --input pairs.jsonl [--out scores.jsonl]``: a reward model's score of each
prompt/completion line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lamina.cli.flags import add_config_file, add_fields, values
from lamina.errors import ConfigError
from lamina.train.preference import score_completions


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``score`` verb."""
    p = sub.add_parser(
        "score",
        help="score prompt/completion pairs (JSONL) with a reward model (finetune --task reward)",
        description='Score each line of --input, a JSONL file of {"prompt": ..., "completion": ...} (strings, '
        "or message lists rendered with the model's chat template), with the reward model MODEL (saved by "
        "`lamina finetune --task reward`): its scalar output on the rendering it was trained on. Writes JSONL "
        "({index, score}) to --out or stdout, and the count and mean score on stderr.",
        epilog="example: lamina score runs/rm/last --input answers.jsonl --out scores.jsonl",
    )
    p.add_argument("model", metavar="MODEL", help="the reward model: a path or name")
    p.add_argument("--input", metavar="FILE", help="JSONL file of prompt/completion lines (required)")
    p.add_argument("--out", dest="output", help="output .jsonl file (default: stdout)")
    add_config_file(p)
    add_fields(p, score_completions, title="options (lamina.train.preference.score_completions)",
               skip=("model", "source"))  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Score the lines and write one JSON line per score."""
    if args.input is None:
        raise ConfigError("name the pairs to score: --input FILE (JSONL with prompt and completion keys)")
    scores = score_completions(args.model, args.input, **values(args, score_completions))
    lines = "".join(json.dumps({"index": i, "score": s}) + "\n" for i, s in enumerate(scores))
    if args.output:  # atomically: a failed run leaves no half-written file
        tmp = Path(args.output + ".tmp")
        tmp.write_text(lines, encoding="utf-8")
        tmp.replace(args.output)
    else:
        sys.stdout.write(lines)
    mean = sum(scores) / len(scores) if scores else float("nan")
    print(f"scored {len(scores)} completions, mean score {mean:.4f}", file=sys.stderr)
    return 0
