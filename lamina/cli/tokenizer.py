"""``lamina tokenizer train|encode|decode|count``."""

from __future__ import annotations

import argparse
import json
import sys

from lamina.checkpoint.load import load_tokenizer
from lamina.errors import TokenizerError
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
        "train", help="train a tokenizer on text files", description="Train a tokenizer on FILES."
    )
    t.add_argument("files", nargs="+", metavar="FILES", help="text files to learn from")
    t.add_argument("--out", required=True, help="output folder (tokenizer.json + tokenizer_config.json)")
    t.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size (default 8192)")
    t.add_argument(
        "--kind", choices=["bpe", "unigram"], default="bpe", help="byte-level BPE (default) or Unigram"
    )
    t.add_argument(
        "--special", nargs="*", default=None, help="special tokens (default: <|endoftext|> <|pad|>)"
    )
    t.set_defaults(func=_train)
    for name, helptext in (("encode", "text -> token ids (JSON)"), ("count", "number of tokens in the text")):
        e = acts.add_parser(name, help=helptext, description=helptext)
        e.add_argument("tokenizer", metavar="TOKENIZER")
        e.add_argument("text", nargs="?", default="-", help="text, or '-' (default) for standard input")
        e.set_defaults(func=_encode if name == "encode" else _count)
    d = acts.add_parser("decode", help="token ids -> text", description="Decode ids (JSON list or spaces).")
    d.add_argument("tokenizer", metavar="TOKENIZER")
    d.add_argument("ids", nargs="+", help="ids, or one JSON list")
    d.set_defaults(func=_decode)


def _text(arg: str) -> str:
    return sys.stdin.read() if arg == "-" else arg


def _train(args: argparse.Namespace) -> int:
    tok = Tokenizer.train(
        files=args.files, vocab_size=args.vocab_size, kind=args.kind, special_tokens=args.special
    )
    out = tok.save(args.out)
    print(f"trained {args.kind} tokenizer with {tok.vocab_size} tokens -> {out}")
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
    print(load_tokenizer(args.tokenizer).decode(ids))
    return 0
