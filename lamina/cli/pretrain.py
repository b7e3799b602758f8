"""``lamina pretrain [--config run.yaml] [--train.lr 3e-4 ...] [--resume]``: train a causal (or masked) LM."""

from __future__ import annotations

import argparse

from lamina.cli.flags import add_alias, add_config_file, add_fields, add_top_level, merged, print_config
from lamina.config import TrainConfig
from lamina.train.distributed import keep_freed_memory_on_cpu
from lamina.train.pretrain import SECTIONS as RUN_SECTIONS
from lamina.train.pretrain import RunConfig, pretrain

# the run config's sections, from the library's one table (init has its own flag)
SECTIONS: dict[str, type] = {k: v for k, v in RUN_SECTIONS.items() if v is not None}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``pretrain`` verb: one flag per field of the run config's sections."""
    p = sub.add_parser(
        "pretrain",
        help="pretrain a language model from a run config (every field is a flag)",
        description="Train a causal LM (a masked LM for `--model.arch encoder`; T5 span corruption for an "
        "encoder-decoder, `--model.preset t5-small`, with the --span_corruption.* knobs). The run config has "
        "sections model (a ModelConfig, optionally from --model.preset), data (a DataConfig: the corpus "
        "and tokenizer), train (a TrainConfig) and init (a MODEL to continue from). Every field is a "
        "flag --SECTION.FIELD and a key of the --config YAML file; flags win over the file. The run "
        "writes the exact config it used to OUT/run.yaml. Launch with torchrun for data-parallel (DDP) "
        "or sharded (--train.parallel fsdp) training.",
        epilog="example: lamina pretrain --data.builtin stdlib --data.train_tokenizer 8192 "
        "--data.out runs/data --model.preset small --train.max_steps 500 --out runs/gpt",
    )
    add_config_file(p)
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in the output folder"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a run already in the output folder")
    add_alias(p, "--out", TrainConfig, "out_dir", "train")
    add_top_level(p, "--init", "init", "continue training from this MODEL's weights and tokenizer", "MODEL")
    for section, cls in SECTIONS.items():
        add_fields(p, cls, section)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the run config from file + flags and train."""
    run_config = RunConfig.from_dict(merged(args, SECTIONS))
    if args.print_config:
        print_config(run_config.to_dict())
        return 0
    keep_freed_memory_on_cpu(run_config.train.device)  # a CPU run owns this process: keep what steps free
    _, _, result = pretrain(run_config, resume=args.resume, **_overwrite(args))
    if result.is_main:  # under torchrun, rank 0 alone
        print(result.summary())
    return 0


def _overwrite(args: argparse.Namespace) -> dict[str, bool]:
    return {"overwrite": True} if args.overwrite else {}
