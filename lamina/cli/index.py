"""``lamina index PATH... [--builtin stdlib-docs] [--modules csv,json] [--store FILE]``: build or update an
index (incremental: new files added, changed ones re-embedded, removed ones deleted), then one summary line.
``lamina index eval --qrels FILE``: retrieval metrics on labeled questions (:mod:`lamina.rag.evaluate`)."""

from __future__ import annotations

import argparse
import importlib

from lamina.cli.flags import HelpFormatter, add_config_file, add_fields, values
from lamina.errors import ConfigError
from lamina.fields import build
from lamina.rag.index import BUILTINS, IndexConfig, update


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``index`` verb; every ``IndexConfig`` field is a flag."""
    p = sub.add_parser(
        "index",
        help="index documents (folders, files, globs, or the built-in stdlib docs) for lamina ask",
        description="Read PATHs (folders, files or glob patterns of .txt, .md, .html, .pdf, .py, .jsonl) "
        "and/or a built-in corpus, cut them into token-budgeted chunks, embed them and write them to the "
        "index (--store: a SQLite file, or a postgresql:// URL). Run it again to update: new files are "
        "added, changed ones re-embedded, removed ones deleted, unchanged ones cost nothing. Unreadable, "
        "encrypted, binary, empty and undecodable files are skipped and counted by kind. "
        "`lamina index eval --qrels FILE` scores retrieval on labeled questions instead.",
        epilog="examples: lamina index --builtin stdlib-docs\n"
        "  lamina index docs/ notes/*.md --store docs.sqlite\n"
        "  lamina index docs/ --store postgresql://me@db.example/rag",
        formatter_class=HelpFormatter,
    )
    p.add_argument("paths", nargs="*", metavar="PATH", help="folders, files or glob patterns to index")
    p.add_argument(
        "--builtin",
        choices=BUILTINS,
        help="also index a built-in corpus (the stdlib docstrings)",
    )
    p.add_argument(
        "--modules",
        metavar="A,B",
        help="with --builtin stdlib-docs: only these modules and their submodules (comma-separated)",
    )
    p.add_argument(
        "--qrels",
        metavar="FILE",
        help="with `lamina index eval`: the labeled questions (JSONL) to score retrieval on",
    )
    add_config_file(p)
    add_fields(p, IndexConfig, title="index (IndexConfig)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Update the index and print its summary line (the progress bar goes to stderr)."""
    if args.paths[:1] == ["eval"]:  # `lamina index eval ...`: the query side's evaluation
        return int(importlib.import_module("lamina.rag.evaluate").main(args) or 0)
    if args.qrels is not None:
        raise ConfigError("--qrels goes with `lamina index eval --qrels FILE`")
    config = build(IndexConfig, values(args, IndexConfig))
    modules = [m.strip() for m in args.modules.split(",") if m.strip()] if args.modules else None
    summary = update(args.paths, builtin=args.builtin, modules=modules, config=config)
    print(summary.line())
    return 0
