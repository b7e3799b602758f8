"""``lamina chat MODEL``: an interactive, streaming chat that keeps the conversation's history."""

from __future__ import annotations

import argparse
import sys

from lamina.cli.flags import add_config_file, add_fields, values
from lamina.cli.generate import (
    add_adapter_flags,
    add_control_flags,
    add_model_flags,
    controls_from_args,
    load_from_args,
)
from lamina.fields import build
from lamina.generate.chat import COMMANDS, chat_loop
from lamina.generate.speculative import DraftStats, SpeculativeOptions
from lamina.generate.text import draft_summary

HELP = COMMANDS


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``chat`` verb."""
    p = sub.add_parser(
        "chat",
        help="chat with a model interactively (streaming, with history)",
        description="Chat with MODEL through its chat template: each reply is streamed and the "
        f"conversation is kept as history. {HELP}. Ctrl-D also exits; Ctrl-C stops the reply being "
        "written (what was shown stays in the history). Replies use the model's own decoding defaults when "
        "its checkpoint has them, else temperature 0.7, top-p 0.9, min-p 0.05, repetition penalty 1.1 over "
        "the last 64 tokens and at most 512 tokens (greedy decoding makes small models repeat "
        "themselves); any decoding flag changes them, e.g. --temperature 0 for greedy.",
        epilog="example: lamina chat smollm2 --system 'You answer in one sentence.' --temperature 0.7",
    )
    p.add_argument("model", metavar="MODEL", help="path, models-directory name or packaged name")
    p.add_argument("--system", help="system prompt")
    add_config_file(p)
    add_model_flags(p)
    add_adapter_flags(p)
    add_control_flags(p)
    add_fields(p, SpeculativeOptions, title="speculative decoding (greedy replies: --temperature 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the model and chat on the terminal (``lamina.generate.chat.chat_loop``).

    Ctrl-C while a reply streams stops that reply (the session goes on); Ctrl-C or Ctrl-D at the prompt
    ends the session. With ``--draft`` / ``--speculative-layers`` the draft's acceptance over the session
    goes to stderr at the end.
    """
    spec = build(SpeculativeOptions, values(args, SpeculativeOptions))
    lm = load_from_args(args)
    draft = load_from_args(args, spec.draft) if spec.draft is not None else None
    interactive = sys.stdin.isatty()
    banner = [f"lamina chat with {lm.entry.name}. {COMMANDS}"] if interactive else []

    def read() -> str | None:  # the banner comes once chat_loop has accepted the model and controls
        while banner:
            print(banner.pop(), file=sys.stderr)
        try:
            return input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            if interactive:
                print(file=sys.stderr)
            return None

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    stats: dict[str, DraftStats] = {}
    chat_loop(
        lm, read, write, system=args.system, draft=draft, speculative_layers=spec.speculative_layers,
        num_draft_tokens=spec.num_draft_tokens, stats=stats, **controls_from_args(args),
    )  # fmt: skip
    if "draft" in stats:
        print(draft_summary(stats["draft"]), file=sys.stderr)
    return 0
