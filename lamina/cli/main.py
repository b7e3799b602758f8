"""``lamina VERB ...``: one thin module per verb over the public Python API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from lamina import __version__
from lamina.cli import (
    chat,
    convert,
    data,
    demo,
    embed,
    fill_mask,
    finetune,
    generate,
    inspect,
    models,
    pretrain,
    serve,
    tokenizer,
    tune,
)
from lamina.cli.flags import normalize_argv, print_flat_config, unknown_arguments
from lamina.errors import LaminaError

VERBS = [
    models,
    inspect,
    convert,
    generate,
    chat,
    embed,
    fill_mask,
    tokenizer,
    data,
    pretrain,
    finetune,
    tune,
    serve,
    demo,
]


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (a verb's full usage lists hundreds of flags)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists every flag)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``lamina`` argument parser with every verb registered."""
    parser = Parser(
        prog="lamina",
        description="lamina: build, train, adapt, run and serve transformer language models.",
        epilog="Run `lamina VERB --help` for a verb's options. MODEL is a path, a name in the models "
        "directory, or a packaged short name such as `smollm2` (see `lamina models`).",
    )
    parser.add_argument("--version", action="version", version=f"lamina {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb in VERBS:
        verb.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse ``argv`` and run the verb; a ``LaminaError`` prints one line and exits 1."""
    parser = build_parser()
    argv = normalize_argv(parser, sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    if extra:
        unknown_arguments(parser, argv, extra)
    try:
        if getattr(args, "print_config", False) and getattr(args, "_lamina_sources", None):
            print_flat_config(args)  # a one-config verb: the same for every verb, before any work
            return 0
        return int(args.func(args) or 0)
    except LaminaError as e:
        if args.debug:
            raise
        verb = " ".join(w for w in (args.verb, getattr(args, "action", None)) if w)
        print(f"lamina {verb}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C: 130; a trainer stopped by SIGTERM says 143 (128 + 15)
        print("interrupted", file=sys.stderr)
        return int(getattr(e, "exit_code", 130))
    except BrokenPipeError:  # `lamina ... | head`
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
