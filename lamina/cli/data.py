"""``lamina data prepare``: text files, folders, globs, JSONL and the built-in corpus -> token shards."""

from __future__ import annotations

import argparse
import re
import time

from lamina.data.corpus import DataConfig, prepare

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
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument(
        "paths",
        nargs="*",
        metavar="PATHS",
        help="files, folders or glob patterns (quote globs: 'a/**/*.txt')",
    )
    d.add_argument(
        "--out", required=True, metavar="DIR", help="output folder (must not exist, see --overwrite)"
    )
    tok = d.add_mutually_exclusive_group()
    tok.add_argument(
        "--tokenizer",
        metavar="TOKENIZER",
        help="a tokenizer.json, a folder holding one, or a MODEL (e.g. smollm2); copied into DIR/tokenizer",
    )
    tok.add_argument(
        "--train-tokenizer",
        type=int,
        metavar="VOCAB_SIZE",
        help="train a byte-level BPE of VOCAB_SIZE ids on the same documents first (saved in DIR/tokenizer)",
    )
    d.add_argument(
        "--builtin",
        choices=["stdlib"],
        help="add the built-in corpus: this Python's standard library sources and docstrings (~10 MB)",
    )
    d.add_argument(
        "--max-bytes",
        type=_size,
        metavar="N",
        help="read at most about N bytes of input, whole lines (suffixes K, M, G: --max-bytes 50M)",
    )
    d.add_argument("--jsonl-field", default="text", help="the JSONL field holding the text (default: text)")
    d.add_argument(
        "--val-fraction",
        type=float,
        default=0.01,
        metavar="F",
        help="share of documents held out for validation, 0 for none (default 0.01)",
    )
    d.add_argument("--seed", type=int, default=0, help="key of the hash that splits train/val (default 0)")
    d.add_argument(
        "--num-workers",
        type=int,
        metavar="N",
        help="tokenizer processes (default: min(4, CPU count); 1: no extra processes)",
    )
    d.add_argument("--no-eos", action="store_true", help="do not put the eos id after each document")
    d.add_argument(
        "--parse-special-tokens",
        action="store_true",
        help="read special-token text such as <|endoftext|> in documents as the special token "
        "(default: as plain text)",
    )
    d.add_argument(
        "--shard-tokens",
        type=_size,
        default=1 << 27,
        metavar="N",
        help="most token ids per shard file (default 128M; suffixes K, M, G)",
    )
    d.add_argument("--overwrite", action="store_true", help="replace DIR if it exists (after success only)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=_prepare)


def _size(text: str) -> int:
    """``"50M"`` -> 50_000_000 (K, M, G are powers of 1000; KiB, MiB, GiB of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?)?B?\s*", text, re.IGNORECASE)
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use a number, optionally with K, M or G")
    unit = (m.group(2) or "").upper()
    base = 1024 if unit.endswith("I") else 1000
    return int(float(m.group(1)) * base ** {"": 0, "K": 1, "M": 2, "G": 3}[unit[:1]])


def _prepare(args: argparse.Namespace) -> int:
    cfg = DataConfig(
        sources=args.paths,
        out=args.out,
        tokenizer=args.tokenizer,
        train_tokenizer=args.train_tokenizer,
        builtin=args.builtin,
        max_bytes=args.max_bytes,
        jsonl_field=args.jsonl_field,
        val_fraction=args.val_fraction,
        seed=args.seed,
        num_workers=args.num_workers,
        append_eos=not args.no_eos,
        parse_special_tokens=args.parse_special_tokens,
        shard_tokens=args.shard_tokens,
        overwrite=args.overwrite,
    )
    start = time.perf_counter()
    manifest = prepare(cfg, progress=not args.no_progress)
    print(manifest.summary())
    print(f"  time: {time.perf_counter() - start:.1f} s")
    return 0
