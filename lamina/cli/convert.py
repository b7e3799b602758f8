"""``lamina convert SRC --out DST --to lamina|hf|gguf``: move checkpoints between lamina, Hugging Face and GGUF."""

from __future__ import annotations

import argparse

from lamina.checkpoint.convert import convert
from lamina.cli.flags import add_config_file, add_fields, values
from lamina.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``convert`` verb."""
    p = sub.add_parser(
        "convert",
        help="convert a model (lamina, HF folder, GGUF) to a lamina or HF checkpoint folder or a GGUF file",
        description="Read SRC (any format lamina loads) and write a lamina checkpoint folder (--to lamina), "
        "a Hugging Face folder that transformers loads (--to hf) or a GGUF file that llama.cpp, Ollama and "
        "LM Studio run (--to gguf, tensors as --quant) to --out (or DST). GGUF weights are dequantized "
        "(--quant keep re-writes a GGUF source's own blocks); --merge-lora ADAPTER merges a PEFT LoRA "
        "adapter into the weights first. The output is written atomically: it appears complete or not at all.",
        epilog="examples: lamina convert smollm2 --out /tmp/smollm2-hf --to hf; "
        "lamina convert smollm2 /tmp/smollm2-q8.gguf --to gguf --quant q8_0; "
        "lamina convert smollm2 --merge-lora runs/sft/adapter --out /tmp/smollm2-sft",
    )
    p.add_argument("src", metavar="SRC", help="model path or name")
    p.add_argument("dst", metavar="DST", nargs="?", help="output folder or .gguf file (the same as --out)")
    add_config_file(p)
    add_fields(p, convert, title="options (lamina.convert)", skip=("src",))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Convert and report where it went."""
    options = values(args, convert)
    if args.dst is not None:
        if "out" in options and options["out"] != args.dst:
            raise ConfigError(f"two output folders: DST {args.dst!r} and --out {options['out']!r}; give one")
        options["out"] = args.dst
    if "out" not in options:
        raise ConfigError("name the output: lamina convert SRC --out DIR (or OUT.gguf --to gguf)")
    out = convert(args.src, **options)
    to = options.get("to", "lamina")
    print(f"wrote {to} {'file' if to == 'gguf' else 'checkpoint'} {out}")
    return 0
