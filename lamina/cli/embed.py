"""``lamina embed MODEL --input FILE [--output OUT]``: one sentence embedding per input line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from lamina.checkpoint.load import load
from lamina.embeddings import embed_texts, embedding_config, has_embedding_files
from lamina.errors import ConfigError, DataError, InputTooLongError


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``embed`` verb."""
    p = sub.add_parser(
        "embed",
        help="embed texts (one per line) as vectors with an encoder such as minilm",
        description="Embed each line of --input (or of a JSONL file's --field) with MODEL, pooled and "
        "normalised as the model's sentence-transformers files say (mean pooling and unit length "
        "otherwise). Writes a .npy matrix or JSONL ({index, embedding}) to --output, or JSONL to stdout. "
        "Texts longer than max_seq_len tokens are cut; how many is reported on stderr.",
        epilog="example: lamina embed minilm --input sentences.txt --output vectors.npy",
    )
    p.add_argument("model", metavar="MODEL", help="model path or name (e.g. minilm)")
    p.add_argument("--input", required=True, help="text file (one text per line) or .jsonl file; - = stdin")
    p.add_argument("--field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--output", help="output .npy or .jsonl file (default: JSONL on stdout)")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    p.add_argument("--max-seq-len", type=int, help="tokens per text (default: the model's setting)")
    p.set_defaults(func=run)


def read_texts(source: str, field: str) -> list[str]:
    """The texts of ``source``: lines of a text file (blank lines kept), or ``field`` of each JSONL row."""
    if source == "-":
        lines = sys.stdin.read().splitlines()
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(f"--input {source!r} does not exist; fix: pass a text or .jsonl file")
        lines = path.read_text(encoding="utf-8").splitlines()
    if not source.endswith(".jsonl"):
        return lines
    texts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{source}:{n} is not valid JSON ({e}); fix the line or use a text file") from e
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise DataError(f"{source}:{n} has no string field {field!r}; fix: pass --field NAME")
        texts.append(row[field])
    return texts


def run(args: argparse.Namespace) -> int:
    """Embed and write the vectors; say the pooling and any truncation on stderr. A text over the limit
    is refused unless ``args.truncate`` (``lamina.embed``'s ``truncate``)."""
    if args.output and not args.output.endswith((".npy", ".jsonl")):
        raise ConfigError(f"--output {args.output!r} must end in .npy or .jsonl")
    texts = read_texts(args.input, args.field)
    lm = load(args.model)
    cfg = embedding_config(lm)
    if args.max_seq_len is not None:
        cfg = dataclasses.replace(cfg, max_seq_len=args.max_seq_len)
        cfg.__post_init__()
    truncate = bool(getattr(args, "truncate", False))
    try:
        result = embed_texts(lm, texts, batch_size=args.batch_size, config=cfg, truncate=truncate)
    except InputTooLongError as e:
        how = "pass --truncate" if hasattr(args, "truncate") else "lamina.embed(..., truncate=True) cuts it"
        raise InputTooLongError(
            f"input {e.index + 1} has {e.n_tokens} tokens, more than the {e.limit} the model takes "
            f"(max_seq_len); shorten it, or {how}",
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
    print(f"embedded {len(texts)} texts as {vectors.shape[1]}-dim vectors{where}", file=sys.stderr)
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
