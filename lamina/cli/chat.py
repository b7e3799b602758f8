"""``lamina chat MODEL``: an interactive, streaming chat that keeps the conversation's history."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from lamina.checkpoint.load import LoadedModel
from lamina.cli.flags import add_config_file
from lamina.cli.generate import add_control_flags, add_model_flags, controls_from_args, load_from_args
from lamina.errors import ConfigError
from lamina.generate.text import generation_config, stream_text

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /exit"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``chat`` verb."""
    p = sub.add_parser(
        "chat",
        help="chat with a model interactively (streaming, with history)",
        description="Chat with MODEL through its chat template: each reply is streamed and the "
        f"conversation is kept as history. {HELP}. Ctrl-D also exits. Replies are greedy unless a "
        "sampling control (--temperature, --top-p, --seed, ...) is given.",
    )
    p.add_argument("model", metavar="MODEL", help="path, models-directory name or packaged name")
    p.add_argument("--system", default=None, help="system prompt")
    add_config_file(p)
    add_model_flags(p)
    add_control_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the model and chat on the terminal."""
    lm = load_from_args(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"lamina chat with {lm.entry.name}. {HELP}", file=sys.stderr)

    def read() -> str | None:
        try:
            return input("> " if interactive else "")
        except EOFError:
            return None

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    chat_loop(lm, read, write, system=args.system, **controls_from_args(args))
    return 0


def chat_loop(
    lm: LoadedModel,
    read: Callable[[], str | None],
    write: Callable[[str], None],
    system: str | None = None,
    **controls: Any,
) -> list[dict[str, str]]:
    """Read user turns with ``read`` (None ends), stream replies with ``write``; return the history.

    Lines starting with ``/`` are commands: ``/reset``, ``/system TEXT``, ``/exit``.
    """
    if lm.tokenizer is None or lm.tokenizer.chat_template is None:
        raise ConfigError(
            f"model {lm.entry.name!r} has no chat template; use `lamina generate` for plain continuation"
        )
    cfg = generation_config(lm, None, **controls)
    history: list[dict[str, str]] = []
    while (line := read()) is not None:
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, rest = line.partition(" ")
            if cmd in ("/exit", "/quit"):
                break
            if cmd == "/reset":
                history.clear()
                write("(conversation reset)\n")
            elif cmd == "/system":
                system = rest.strip() or None
                write(f"(system prompt {'set' if system else 'cleared'})\n")
            else:
                write(f"unknown command {cmd!r}; {HELP}\n")
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        reply = ""
        for delta in stream_text(lm, messages, cfg, chat=True):
            reply += delta
            write(delta)
        write("\n")
        history.append({"role": "assistant", "content": reply})
    return history
