"""``lamina inspect MODEL``: what a model is: config, size, tokenizer, chat template."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``inspect`` verb."""
    p = sub.add_parser(
        "inspect",
        help="show a model's config, parameter count, dtype, size on disk and tokenizer",
        description="Load MODEL and describe it: architecture config, parameters by part, FLOPs per "
        "token, weights dtype, size on disk, tokenizer and chat template.",
        epilog="example: lamina inspect smollm2",
    )
    p.add_argument("model", metavar="MODEL", help="path, models-directory name or packaged name")
    p.set_defaults(func=run)


def _size_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(args: argparse.Namespace) -> int:
    """Print the description."""
    from lamina.checkpoint.load import load  # imports torch: not for --help

    lm = load(args.model)
    cfg = lm.model.config
    e = lm.entry
    print(f"model        {e.name}  ({e.format}, from {e.source})")
    print(f"path         {e.path}")
    print(f"size on disk {_size_on_disk(e.path) / 2**20:.1f} MiB")
    print(f"dtype        {next(lm.model.parameters()).dtype} (in memory)")
    print(f"parameters   {lm.model.num_params():,}")
    for part, n in cfg.param_counts().items():
        if n:
            print(f"  {part:<11}{n:,}")
    print(f"FLOPs/token  {cfg.flops_per_token(training=False):,} forward at context {cfg.max_seq_len}")
    from lamina.analysis.plan import memory_lines

    print("memory (estimates)")
    for line in memory_lines(cfg, batch_size=1, optimizer="adamw"):
        print(line)
    print("config")
    fields = dataclasses.fields(cfg)
    width = max(len(f.name) for f in fields) + 1  # the longest name keeps a space before its value
    for f in fields:
        print(f"  {f.name:<{width}}{getattr(cfg, f.name)}")
    tok = lm.tokenizer
    if tok is None:
        print("tokenizer    none")
    else:
        print(f"tokenizer    {tok!r}")
        print(f"chat template {'present' if tok.chat_template else 'none'}")
    print(
        f"generation   eos_token_ids={lm.generation.eos_token_ids} max_new_tokens={lm.generation.max_new_tokens}"
    )
    return 0
