"""``lamina fill-mask MODEL "The [MASK] sat on the mat."``: a masked-LM encoder's guesses for each mask."""

from __future__ import annotations

import argparse

from lamina.checkpoint.load import load
from lamina.cli.flags import add_config_file, add_fields, values
from lamina.errors import ConfigError
from lamina.fill_mask import fill_mask


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``fill-mask`` verb."""
    p = sub.add_parser(
        "fill-mask",
        help="predict the tokens behind [MASK] with a masked-LM encoder",
        description="Print the most likely tokens (with probabilities) for each [MASK] in TEXT, and the "
        "text filled with the best one. [MASK] stands for the model's mask token however it is spelled.",
        epilog='example: lamina fill-mask runs/bert/last "def [MASK](self):"',
    )
    p.add_argument("model", metavar="MODEL", help="a masked-LM encoder (path or name)")
    p.add_argument("text", metavar="TEXT", nargs="?", help="text with one or more [MASK]")
    add_config_file(p)
    add_fields(p, fill_mask, title="fill-mask options", skip=("lm", "text"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the candidates of each mask."""
    options = values(args, fill_mask)
    if args.text is None:
        raise ConfigError('give the TEXT to fill, e.g. lamina fill-mask MODEL "The [MASK] sat on the mat."')
    results = fill_mask(load(args.model), args.text, **options)
    for n, preds in enumerate(results, 1):
        print(f"mask {n}:")
        for p in preds:
            print(f"  {p.score:7.4f}  {p.token!r}")
    print(results[0][0].sequence if len(results) == 1 else "")
    return 0
