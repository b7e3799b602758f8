"""``lamina tokenizer train|encode|decode|count``."""

from __future__ import annotations

import argparse
import json
import sys

from lamina.checkpoint.load import load_tokenizer
from lamina.cli.flags import add_config_file, add_fields, values
from lamina.errors import ConfigError, TokenizerError
from lamina.tokenizer import Tokenizer


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``tokenizer`` verb and its actions."""
    p = sub.add_parser(
        "tokenizer",
        help="train a BPE/Unigram tokenizer; encode, decode and count tokens",
        description="Tokenizer tools. TOKENIZER is a tokenizer.json, a folder holding one, or any MODEL.",
    )
    acts = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = acts.add_parser(
        "train",
        help="train a tokenizer on text files",
        description="Train a byte-level BPE or Unigram tokenizer on FILES and save it to --out "
        "(tokenizer.json + tokenizer_config.json).",
        epilog="example: lamina tokenizer train notes/*.txt --vocab-size 4096 --special-tokens "
        "'[<|endoftext|>, <|pad|>, <|im_start|>, <|im_end|>]' --out tok/",
    )
    t.add_argument("files", nargs="+", metavar="FILES", help="text files to learn from")
    t.add_argument(
        "--out", metavar="DIR", help="output folder (tokenizer.json + tokenizer_config.json); required"
    )
    add_config_file(t)
    add_fields(t, Tokenizer.train, title="training (Tokenizer.train)", skip=("texts", "files"))
    t.set_defaults(func=_train)
    which = "a tokenizer.json, a folder holding one, or any MODEL (e.g. smollm2)"
    for name, helptext in (("encode", "text -> token ids (JSON)"), ("count", "number of tokens in the text")):
        e = acts.add_parser(name, help=helptext, description=helptext)
        e.add_argument("tokenizer", metavar="TOKENIZER", help=which)
        e.add_argument(
            "text",
            nargs="?",
            default="-",
            metavar="TEXT",
            help="the text, or '-' (default) for standard input",
        )
        e.set_defaults(func=_encode if name == "encode" else _count)
    d = acts.add_parser("decode", help="token ids -> text", description="Decode ids (JSON list or spaces).")
    d.add_argument("tokenizer", metavar="TOKENIZER", help=which)
    d.add_argument("ids", nargs="+", metavar="IDS", help="token ids, or one JSON list ('[1, 2]')")
    d.set_defaults(func=_decode)


def _text(arg: str) -> str:
    return sys.stdin.read() if arg == "-" else arg


def _train(args: argparse.Namespace) -> int:
    if args.out is None:
        raise ConfigError("name the output folder: lamina tokenizer train FILES --out DIR")
    options = values(args, Tokenizer.train)
    tok = Tokenizer.train(files=args.files, **options)
    out = tok.save(args.out)
    print(f"trained {options.get('kind', 'bpe')} tokenizer with {tok.vocab_size} tokens -> {out}")
    return 0


def _encode(args: argparse.Namespace) -> int:
    print(json.dumps(load_tokenizer(args.tokenizer).encode(_text(args.text))))
    return 0


def _count(args: argparse.Namespace) -> int:
    print(len(load_tokenizer(args.tokenizer).encode(_text(args.text))))
    return 0


def _decode(args: argparse.Namespace) -> int:
    raw = " ".join(args.ids)
    try:
        ids = (
            json.loads(raw)
            if raw.lstrip().startswith("[")
            else [int(x) for x in raw.replace(",", " ").split()]
        )
    except ValueError as e:
        raise TokenizerError(f"cannot read token ids from {raw!r}: give integers or a JSON list") from e
    if not isinstance(ids, list) or not all(type(i) is int for i in ids):
        raise TokenizerError(f"cannot read token ids from {raw!r}: give integers or a JSON list of integers")
    tok = load_tokenizer(args.tokenizer)
    bad = [i for i in ids if not 0 <= i < tok.vocab_size]
    if bad:  # the backend decodes an id past the vocabulary as nothing, and overflows on a negative one
        raise TokenizerError(
            f"token id {bad[0]} is outside the vocabulary of {args.tokenizer} "
            f"({tok.vocab_size} tokens: ids 0..{tok.vocab_size - 1})"
        )
    print(tok.decode(ids))
    return 0
