"""``lamina generate MODEL "prompt"``: one-shot generation with any decoding control, streamed."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from lamina.checkpoint.load import load
from lamina.config import GenerationConfig, parse_yaml
from lamina.generate.text import generate, print_stream


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``generate`` verb; every ``GenerationConfig`` field becomes a flag."""
    p = sub.add_parser(
        "generate",
        help="generate text from a prompt with any decoding control, streamed",
        description="Continue PROMPT with MODEL and stream the text. Chat models (those with a chat "
        "template) get the prompt as a user message unless --raw is given. Greedy unless a sampling "
        "control (--temperature, --top-p, --seed, ...) is given.",
    )
    p.add_argument(
        "model", metavar="MODEL", help="path, models-directory name or packaged name (e.g. smollm2)"
    )
    p.add_argument("prompt", metavar="PROMPT", help="the prompt text ('-' reads standard input)")
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
    controls = p.add_argument_group(
        "decoding controls",
        "every GenerationConfig field (its docstring gives the semantics); values are read as YAML, e.g. "
        "--temperature 0.7 --top-p 0.9 --seed 1 --logit-bias '{50256: -100}'",
    )
    for f in dataclasses.fields(GenerationConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]
        flag = "--" + f.name.replace("_", "-")
        controls.add_argument(
            flag, dest=f"gen_{f.name}", type=parse_yaml, metavar="V", help=f"default {default!r}"
        )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the model and stream the continuation to stdout."""
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    controls = {k[4:]: v for k, v in vars(args).items() if k.startswith("gen_") and v is not None}
    lm = load(args.model, dtype=args.dtype)
    generate(lm, prompt, chat=args.chat, system=args.system, stream=print_stream, **controls)
    print()
    return 0
