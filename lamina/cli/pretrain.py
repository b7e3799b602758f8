"""``lamina pretrain --config run.yaml [--train.lr 3e-4 ...] [--resume]``: train a causal LM."""

from __future__ import annotations

import argparse
from pathlib import Path

from lamina.cli.overrides import merge, parse_overrides
from lamina.config import parse_yaml
from lamina.train.pretrain import SECTIONS, RunConfig, pretrain


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``pretrain`` verb."""
    p = sub.add_parser(
        "pretrain",
        help="pretrain a causal language model from a run config (any field overridable by flags)",
        description="Train a causal LM. The run config (YAML) has sections model (a ModelConfig, "
        "optionally `preset: NAME`), data (a DataConfig: the corpus and tokenizer), train (a "
        "TrainConfig) and init (a MODEL to continue from). Any field can be set or overridden on the "
        "command line as --SECTION.FIELD VALUE, e.g. --train.lr 3e-4 --model.n_layers 4 "
        "--data.builtin stdlib. Launch with torchrun for data-parallel (DDP) or sharded (FSDP, "
        "--train.parallel fsdp) training.",
        epilog="example: lamina pretrain --data.builtin stdlib --data.train_tokenizer 8192 "
        "--data.out runs/data --model.preset small --train.out_dir runs/gpt --train.max_steps 500",
    )
    p.add_argument("--config", help="run config YAML (default: only the flags)")
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in train.out_dir"
    )
    p.add_argument("--init", help="start from this MODEL's weights (same as --init.MODEL in the config)")
    p.set_defaults(func=run, accepts_overrides=True)


def run(args: argparse.Namespace) -> int:
    """Build the run config from file + flags and train."""
    base = parse_yaml(Path(args.config).read_text()) if args.config else {}
    data = merge(base or {}, parse_overrides(args.overrides, SECTIONS))
    if args.init:
        data["init"] = args.init
    if "model" in data and "preset" in data["model"] and not data["model"]["preset"]:
        data["model"].pop("preset")
    _, _, result = pretrain(RunConfig.from_dict(data), resume=args.resume)
    best = f", best validation loss {result.best_val_loss:.4f}" if result.best_val_loss is not None else ""
    print(
        f"trained {result.steps} steps, final loss {result.final_loss:.4f}{best}; checkpoints in {result.out_dir}"
    )
    return 0
