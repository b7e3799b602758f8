"""``lamina data prepare``: text files, folders, globs, JSONL and the built-in corpus -> token shards."""

from __future__ import annotations

import argparse
import time

from lamina.cli.flags import HelpFormatter, add_config_file, add_fields, values
from lamina.cli.generate import add_control_flags, add_model_flags
from lamina.data.augment import AugmentConfig
from lamina.data.corpus import DataConfig, prepare
from lamina.fields import build

_EPILOG = """\
examples:
  lamina data prepare --builtin stdlib --train-tokenizer 8192 --out data/stdlib
  lamina data prepare notes/ 'web/**/*.jsonl' --jsonl-field content --tokenizer smollm2 --out data/mine

Each text file is one document; each line of a .jsonl/.ndjson file is one (its --jsonl-field). Binary
files, empty documents and bad JSONL lines are skipped and counted; bytes that are not UTF-8 become U+FFFD.
Every document goes wholly to train or val (chosen by a hash of its text and --seed), and the eos id
follows each document. DIR receives train-NNNNN.bin / val-NNNNN.bin (uint16 ids when the vocabulary fits,
else uint32), tokenizer/ and manifest.json; it is written under a temporary name and renamed at the end,
so a failed run leaves nothing behind.
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``data`` verb and its actions."""
    p = sub.add_parser(
        "data",
        help="prepare training data: tokenize text into memory-mapped token shards",
        description="Training data tools.",
    )
    acts = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    d = acts.add_parser(
        "prepare",
        help="tokenize files, folders, globs, JSONL or the built-in corpus into train/val token shards",
        description="Tokenize PATHS (files, folders read recursively, glob patterns, JSONL files) and/or "
        "the built-in corpus into memory-mapped token shards with a train/validation split.",
        epilog=_EPILOG,
        formatter_class=HelpFormatter,
    )
    d.add_argument(
        "cfg:sources",  # the config's field: --print-config shows the paths, --config may give them
        nargs="*",
        default=argparse.SUPPRESS,
        metavar="PATHS",
        help="files, folders or glob patterns (quote globs: 'a/**/*.txt'); DataConfig.sources",
    )
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_file(d)
    add_fields(d, DataConfig, title="data (DataConfig)")
    d.set_defaults(func=_prepare)

    a = acts.add_parser(
        "augment",
        help="back-translate target-side text with a reverse model into synthetic seq2seq pairs",
        description="Translate each text of --input with the reverse model --back-translate (target -> "
        "source language), batched through the generation engine, and write (synthetic source, real "
        "target) pairs as JSONL: training data for the forward model (Sennrich et al. 2016).",
        epilog="example:\n  lamina data augment --back-translate out/fr-en --input fr.txt --out pairs.jsonl",
        formatter_class=HelpFormatter,
    )
    a.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_file(a)
    add_fields(a, AugmentConfig, title="augment (AugmentConfig)")
    add_model_flags(a)
    add_control_flags(a)
    a.set_defaults(func=_augment)


def _prepare(args: argparse.Namespace) -> int:
    cfg = build(DataConfig, values(args, DataConfig))
    start = time.perf_counter()
    manifest = prepare(cfg, progress=not args.no_progress)
    print(manifest.summary())
    print(f"  time: {time.perf_counter() - start:.1f} s")
    return 0


def _augment(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lamina.checkpoint.load import LoadOptions
    from lamina.config import GenerationConfig
    from lamina.data.augment import augment

    cfg = build(AugmentConfig, values(args, AugmentConfig))
    cfg.validate()
    bar: tqdm | None = None

    def progress(done: int, total: int) -> None:  # the bar starts with the first batch, after loading
        nonlocal bar
        if bar is None:
            bar = tqdm(
                total=total, desc="back-translate", unit="text", disable=args.no_progress, dynamic_ncols=True
            )
        bar.update(done - bar.n)

    try:
        report = augment(
            cfg, load=build(LoadOptions, values(args, LoadOptions)), progress=progress,
            **values(args, GenerationConfig),
        )  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    print(report.summary())
    return 0
