"""``lamina finetune --task classify --data train.csv --init MODEL``: train a task head on labeled text
(``--task regress``; ``--task token_classify --data conll.jsonl`` for tagging)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lamina.cli.overrides import merge, parse_overrides
from lamina.config import parse_yaml
from lamina.train.finetune import SECTIONS, FinetuneRun, finetune


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``finetune`` verb."""
    p = sub.add_parser(
        "finetune",
        help="fine-tune a classification, regression or token classification head on labeled data",
        description="Put a fresh task head on MODEL (--init) or on a model built from --model.* flags, "
        "and train on --data (CSV with a header or JSONL; columns --task.text_field [text], "
        "--task.pair_field for sentence pairs, and --task.label_field [label]; for token_classify, JSONL "
        "with a list of words --task.tokens_field [tokens] and one tag per word --task.tags_field [tags]). "
        "Reports loss, accuracy and macro F1 (or MSE; token_classify: token accuracy, macro F1 and, for "
        "IOB tags, entity F1) on held-out rows after every epoch. Freeze layers with --train.freeze '[0-3]' (block indices) or name globs "
        "('[tok_emb.*]'). Any field of the sections task, model, train can be set as --SECTION.FIELD.",
        epilog="example: lamina finetune --task classify --data reviews.csv --init minilm "
        "--train.epochs 3 --train.out_dir runs/sentiment",
    )
    p.add_argument("--config", help="run config YAML with sections task, train, model, init")
    p.add_argument(
        "--task",
        choices=["classify", "regress", "token_classify"],
        help="the head to train (default classify)",
    )
    p.add_argument("--data", help="labeled CSV or JSONL file (task.data)")
    p.add_argument("--init", help="MODEL to fine-tune (its tokenizer too)")
    p.set_defaults(func=run, accepts_overrides=True)


def run(args: argparse.Namespace) -> int:
    """Build the run from file + flags, fine-tune, and print the last evaluation."""
    base = parse_yaml(Path(args.config).read_text()) if args.config else {}
    data = merge(base or {}, parse_overrides(args.overrides, SECTIONS))
    task = dict(data.get("task") or {})
    if args.task:
        task["task"] = args.task
    if args.data:
        task["data"] = args.data
    data["task"] = task
    if args.init:
        data["init"] = args.init
    _, _, result = finetune(FinetuneRun.from_dict(data))
    last = result.val_metrics[-1][1] if result.val_metrics else {}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in last.items())
    print(f"trained {result.steps} steps; held-out {shown}; checkpoints in {result.out_dir}")
    return 0
