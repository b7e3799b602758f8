"""``lamina embed MODEL --input FILE [--out OUT]``: one sentence embedding per input line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from lamina.checkpoint.load import load
from lamina.checkpoint.sentence_transformers import EmbeddingConfig
from lamina.cli.flags import add_config_file, add_fields, values
from lamina.data.texts import read_texts
from lamina.embeddings import embed_texts, embedding_config, has_embedding_files
from lamina.errors import ConfigError, InputTooLongError
from lamina.fields import build


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``embed`` verb."""
    p = sub.add_parser(
        "embed",
        help="embed texts (one per line) as vectors with an encoder such as minilm",
        description="Embed each line of --input (or of a JSONL file's --field) with MODEL, pooled and "
        "normalised as the model's sentence-transformers files say (mean pooling and unit length "
        "otherwise). Writes a .npy matrix or JSONL ({index, embedding}) to --out, or JSONL to stdout. "
        "A text longer than max_seq_len tokens is refused unless --truncate cuts it (then how many were "
        "cut is reported on stderr).",
        epilog="example: lamina embed minilm --input examples/sentences.txt --out vectors.npy",
    )
    p.add_argument("model", metavar="MODEL", help="model path or name (e.g. minilm)")
    p.add_argument(
        "--input", metavar="FILE", help="text file (one text per line) or .jsonl file; - = stdin (required)"
    )
    p.add_argument("--out", dest="output", help="output .npy or .jsonl file (default: JSONL on stdout)")
    add_config_file(p)
    add_fields(p, read_texts, title="reading --input (lamina.data.texts.read_texts)", skip=("source",))
    add_fields(p, embed_texts, title="options (lamina.embed)", skip=("lm", "texts", "config"))
    add_fields(
        p,
        EmbeddingConfig,
        partial=True,
        title="pooling (EmbeddingConfig)",
        description="override the model's sentence-transformers settings (mean pooling and unit length "
        "when it has none)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Embed and write the vectors; say the pooling and any truncation on stderr. A text over the limit
    is refused unless ``args.truncate`` (``lamina.embed``'s ``truncate``)."""
    if args.output and not args.output.endswith((".npy", ".jsonl")):
        raise ConfigError(f"--out {args.output!r} must end in .npy or .jsonl")
    options = values(args, embed_texts)
    overrides = values(args, EmbeddingConfig)
    if args.input is None:
        raise ConfigError("name the texts to embed: --input FILE (one text per line, or .jsonl; - = stdin)")
    texts = read_texts(args.input, **values(args, read_texts))
    lm = load(args.model)
    cfg = build(EmbeddingConfig, {**dataclasses.asdict(embedding_config(lm)), **overrides})
    truncate = bool(options.get("truncate", False))
    try:
        result = embed_texts(lm, texts, config=cfg, **options)
    except InputTooLongError as e:
        raise InputTooLongError(
            f"input {e.index + 1} has {e.n_tokens} tokens, more than the {e.limit} the model takes "
            f"(max_seq_len); shorten it, or pass --truncate",
            index=e.index,
            n_tokens=e.n_tokens,
            limit=e.limit,
        ) from None
    vectors = result.vectors.numpy()
    if args.output and args.output.endswith(".npy"):
        np.save(args.output, vectors)
    else:
        lines = "".join(
            json.dumps({"index": i, "embedding": v.tolist()}) + "\n" for i, v in enumerate(vectors)
        )
        if args.output:
            Path(args.output).write_text(lines, encoding="utf-8")
        else:
            sys.stdout.write(lines)
    where = f" to {args.output}" if args.output else ""
    print(
        f"embedded {len(texts)} text{'' if len(texts) == 1 else 's'} as {vectors.shape[1]}-dim vectors{where}",
        file=sys.stderr,
    )
    source = (
        ""
        if has_embedding_files(lm)
        else f" (lamina's default: {args.model} has no sentence-transformers files)"
    )
    unit = ", unit length" if cfg.normalize else ""
    print(f"pooling: {' + '.join(result.pooling)}{unit}{source}", file=sys.stderr)
    if truncate:
        cut = result.truncated
        which = ", ".join(str(i + 1) for i in cut[:10]) + (", ..." if len(cut) > 10 else "")
        print(
            f"{len(cut)} of {len(texts)} inputs truncated to {result.max_seq_len} tokens"
            + (f" (inputs {which})" if cut else ""),
            file=sys.stderr,
        )
    return 0
