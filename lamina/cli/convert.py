"""``lamina convert SRC DST --to lamina|hf``: move checkpoints between lamina, Hugging Face and GGUF."""

from __future__ import annotations

import argparse

from lamina.checkpoint.hf import export_hf
from lamina.checkpoint.lamina import save_checkpoint
from lamina.checkpoint.load import load
from lamina.embeddings import EmbeddingConfig


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``convert`` verb."""
    p = sub.add_parser(
        "convert",
        help="convert a model (lamina, HF folder, GGUF) to a lamina or HF checkpoint folder",
        description="Read SRC (any format lamina loads) and write DST as a lamina checkpoint folder "
        "(--to lamina) or a Hugging Face folder that transformers loads (--to hf). GGUF weights are "
        "dequantized. DST is written atomically: it appears complete or not at all.",
    )
    p.add_argument("src", metavar="SRC", help="model path or name")
    p.add_argument("dst", metavar="DST", help="output folder")
    p.add_argument("--to", choices=["lamina", "hf"], default="lamina", help="output format (default: lamina)")
    p.add_argument(
        "--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights dtype (default fp32)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Convert and report where it went."""
    lm = load(args.src, dtype=args.dtype)
    folder = lm.entry.path if lm.entry.path.is_dir() else lm.entry.path.parent
    embedding = EmbeddingConfig.from_folder(folder)  # a sentence-transformers model keeps its pooling
    if args.to == "hf":
        out = export_hf(args.dst, lm.model, lm.tokenizer, lm.generation, embedding=embedding)
    else:
        out = save_checkpoint(args.dst, lm.model, lm.tokenizer, lm.generation)
        if embedding is not None:
            embedding.write(out, lm.model.config.d_model)
    print(f"wrote {args.to} checkpoint {out}")
    return 0
