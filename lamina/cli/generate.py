"""``lamina generate MODEL "prompt"``: one-shot generation, streamed to the terminal."""

from __future__ import annotations

import argparse
import sys

from lamina.checkpoint.load import load
from lamina.generate.text import generate, print_stream


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``generate`` verb."""
    p = sub.add_parser(
        "generate",
        help="generate text from a prompt (greedy decoding, streamed)",
        description="Continue PROMPT with MODEL and stream the text. Chat models (those with a chat "
        "template) get the prompt as a user message unless --raw is given.",
    )
    p.add_argument(
        "model", metavar="MODEL", help="path, models-directory name or packaged name (e.g. smollm2)"
    )
    p.add_argument("prompt", metavar="PROMPT", help="the prompt text ('-' reads standard input)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="tokens to generate at most (default: the model's, 128)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--chat", dest="chat", action="store_true", default=None, help="apply the chat template"
    )
    mode.add_argument(
        "--raw", dest="chat", action="store_false", help="use the prompt as-is, no chat template"
    )
    p.add_argument("--system", default=None, help="system message (chat mode)")
    p.add_argument(
        "--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights dtype (default fp32)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the model and stream the continuation to stdout."""
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    lm = load(args.model, dtype=args.dtype)
    generate(
        lm,
        prompt,
        max_new_tokens=args.max_new_tokens,
        chat=args.chat,
        system=args.system,
        stream=print_stream,
    )
    print()
    return 0
