"""Perplexity of a model on text: rolling windows with a stride, so that each token is predicted once with
as much context as the window allows (the sliding-window recipe of transformers' "Perplexity of
fixed-length models" guide).

    result = perplexity(lm, ["first document ...", "second ..."], stride=512)
    result.token_perplexity, result.bits_per_byte, result.word_perplexity

Each document is scored on its own: windows of ``max_length`` tokens (default the model's
``max_seq_len``) start every ``stride`` tokens (default ``max_length // 2``); a window's loss counts only
the tokens no earlier window predicted. Token 0 of a document has no context and is not scored, unless
``prefix`` puts the model's end-of-text token before it (lm-eval's ``loglikelihood_rolling`` does that).
A prepared data folder (``lamina data prepare``: token shards + ``manifest.json``) is scored without
re-tokenizing: :func:`shard_documents` cuts a split's token stream at the eos id into its documents, and
their bytes and words come from decoding the ids.
With ``stride == max_length`` (disjoint windows) the first token of each window is not scored either,
exactly as in the transformers recipe. Totals over all documents:

- ``token_perplexity = exp(nll / tokens)`` (nats over scored tokens);
- ``bits_per_byte = nll / ln 2 / bytes`` (UTF-8 bytes of the documents; lm-eval's ``bits_per_byte``);
- ``word_perplexity = exp(nll / words)`` (words: whitespace-separated, lm-eval's ``word_perplexity``).

Encoders (``arch="encoder"``) get pseudo-perplexity (Salazar et al. 2020): each token masked in turn and
predicted from both sides, ``exp(-mean log p)``; other models without a causal language-model head raise
``ConfigError`` saying perplexity is not defined for them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lamina.data.rows import iter_jsonl
from lamina.errors import ConfigError

if TYPE_CHECKING:
    from lamina.checkpoint.load import LoadedModel
    from lamina.model.transformer import Transformer
    from lamina.tokenizer import Tokenizer

Progress = Callable[[int, int], None]


@dataclass
class PerplexityResult:
    """Totals over every document (see the module doc). ``pseudo``: masked-LM pseudo-perplexity."""

    nll: float  # summed negative log-likelihood, nats
    tokens: int  # tokens scored
    bytes: int
    words: int
    documents: int
    pseudo: bool = False

    @property
    def token_perplexity(self) -> float:
        return math.exp(self.nll / max(self.tokens, 1))

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / max(self.bytes, 1)

    @property
    def word_perplexity(self) -> float:
        return math.exp(self.nll / max(self.words, 1))

    def as_dict(self) -> dict[str, float]:
        """The report: token_perplexity, bits_per_byte, word_perplexity and the counts."""
        return {
            "token_perplexity": self.token_perplexity, "bits_per_byte": self.bits_per_byte,
            "word_perplexity": self.word_perplexity, "nll": self.nll, "tokens": self.tokens,
            "bytes": self.bytes, "words": self.words, "documents": self.documents, "pseudo": self.pseudo,
        }  # fmt: skip


def read_documents(source: str | Path, field: str = "text") -> list[str]:
    """Documents of a .txt file (the whole file is one document), a .jsonl file (``field`` of each line),
    or a folder (every .txt and .jsonl file in it, sorted). Raises ``ConfigError`` naming file and line."""
    path = Path(source)
    if path.is_dir():
        docs: list[str] = []
        for p in sorted([*path.rglob("*.txt"), *path.rglob("*.jsonl")]):
            docs += read_documents(p, field)
        if not docs:
            raise ConfigError(f"{path}: no .txt or .jsonl files in the folder")
        return docs
    if not path.is_file():
        raise ConfigError(f"{path}: no such file or folder")
    if path.suffix == ".jsonl":
        docs = []
        for n, row in iter_jsonl(path, lambda n, e: ConfigError(f"{path}:{n}: not valid JSON ({e.msg})")):
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise ConfigError(f"{path}:{n}: expected an object with a string field {field!r}")
            docs.append(row[field])
        return docs
    return [path.read_text(encoding="utf-8")]


def is_token_shards(source: str | Path) -> bool:
    """Whether ``source`` is a prepared data folder (token shards with a ``manifest.json``)."""
    return (Path(source) / "manifest.json").is_file()


def shard_documents(folder: str | Path, split: str) -> tuple[list[list[int]], Tokenizer]:
    """The documents of ``split`` in a prepared data folder, as token-id lists cut at the eos id that
    ``lamina data prepare`` appends to each (the eos itself left out), and the folder's tokenizer.
    Raises ``DataError`` for a missing split or a folder prepared without eos ids (documents then run
    into each other and cannot be scored one by one)."""
    import numpy as np

    from lamina.data.corpus import Manifest
    from lamina.errors import DataError

    manifest = Manifest.load(folder)
    if not manifest.append_eos or manifest.eos_token_id is None:
        raise DataError(f"{folder}: prepared without an eos id after each document (append_eos); "
                        "prepare it again with append_eos on to score perplexity per document")  # fmt: skip
    paths = manifest.shard_paths(split)
    parts = [np.memmap(p, dtype=manifest.dtype, mode="r") for p in paths]
    stream = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
    docs: list[list[int]] = []
    start = 0
    for end in np.flatnonzero(stream == manifest.eos_token_id).tolist():
        if end > start:
            docs.append(stream[start:end].tolist())
        start = end + 1
    return docs, manifest.load_tokenizer()


def windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over ``n_tokens`` tokens: transformers'
    recipe; position 0 is never scored (it has no context), nor a window's first token when the windows
    are disjoint (``stride == max_length``)."""
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


@torch.no_grad()
def token_nll(
    model: Transformer, ids: Sequence[int], max_length: int | None = None, stride: int | None = None
) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, tokens scored) of ``ids`` by sliding windows: each token
    from position 1 on is scored once, in the first window that reaches it (float32 log-softmax)."""
    max_length = max_length or model.config.max_seq_len
    stride = stride or max(max_length // 2, 1)
    if not 0 < stride <= max_length:
        raise ConfigError(f"stride {stride} must be in 1..max_length ({max_length})")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    t = torch.tensor(list(ids), dtype=torch.long, device=device)
    for begin, end, first in windows(len(ids), max_length, stride):
        if first >= end:
            continue
        logits = model(t[None, begin:end])[0]  # (T, V)
        logp = logits[first - begin - 1 : end - begin - 1].float().log_softmax(-1)
        total -= float(logp.gather(1, t[first:end, None]).sum())
        count += end - first
    return total, count


@torch.no_grad()
def pseudo_nll(model: Transformer, ids: Sequence[int], mask_id: int) -> tuple[float, int]:
    """(summed -log p, tokens scored) of each token of ``ids`` masked one at a time (batched), the
    encoder seeing both sides (Salazar et al. 2020, "Masked Language Model Scoring")."""
    device = next(model.parameters()).device
    t = torch.tensor(list(ids), dtype=torch.long, device=device)
    total = 0.0
    for start in range(0, len(ids), 32):
        pos = torch.arange(start, min(start + 32, len(ids)), device=device)
        batch = t.repeat(len(pos), 1)
        batch[torch.arange(len(pos)), pos] = mask_id
        logits = model(batch)[torch.arange(len(pos)), pos].float().log_softmax(-1)  # (b, V)
        total -= float(logits.gather(1, t[pos, None]).sum())
    return total, len(ids)


def perplexity(
    lm: LoadedModel,
    documents: Iterable[str] | Iterable[list[int]],
    max_length: int | None = None,
    stride: int | None = None,
    prefix: bool = False,
    progress: Progress | None = None,
) -> PerplexityResult:
    """Perplexity of ``lm`` on ``documents`` (see the module doc). ``max_length``: window tokens (default
    ``max_seq_len``); ``stride``: tokens between window starts (default ``max_length // 2``; smaller gives
    each token more context, at more cost); ``prefix``: score token 0 too, after the
    end-of-text token. ``progress(done, total)`` counts documents. ``documents`` are texts, or token-id
    lists already in the model's vocabulary (:func:`shard_documents`; bytes and words then count their
    decoded text). Raises ``ConfigError`` for a model where perplexity is not defined or for a missing
    tokenizer."""
    from lamina.eval.multiple_choice import prefix_token_id

    cfg = lm.model.config
    tok = lm.tokenizer
    if tok is None:
        raise ConfigError(f"model {lm.entry.name!r} has no tokenizer; perplexity needs one")
    docs: list[str | list[int]] = list(documents)
    encoder = cfg.arch == "encoder" and cfg.head == "lm"
    if not encoder and not (cfg.arch == "decoder" and cfg.head == "lm"):
        raise ConfigError(
            f"perplexity is not defined for model {lm.entry.name!r} (arch={cfg.arch!r}, head={cfg.head!r}): "
            "it needs a causal language model, or an encoder with a masked-LM head (pseudo-perplexity)"
        )
    if encoder and tok.mask_token_id is None:
        raise ConfigError(f"model {lm.entry.name!r} is an encoder without a mask token: no pseudo-perplexity")
    nll, count, nbytes, words = 0.0, 0, 0, 0
    for n, doc in enumerate(docs):
        ids: list[int] = tok.encode(doc) if isinstance(doc, str) else [int(i) for i in doc]
        text = doc if isinstance(doc, str) else tok.decode(ids)
        nbytes += len(text.encode("utf-8"))
        words += len(text.split())
        if encoder:
            limit = cfg.max_seq_len
            for s in range(0, len(ids), limit):  # disjoint chunks: bidirectional context within each
                a, c = pseudo_nll(lm.model, ids[s : s + limit], int(tok.mask_token_id))  # type: ignore[arg-type]
                nll, count = nll + a, count + c
        else:
            if prefix:
                ids = [prefix_token_id(lm), *ids]
            a, c = token_nll(lm.model, ids, max_length, stride)
            nll, count = nll + a, count + c
        if progress is not None:
            progress(n + 1, len(docs))
    return PerplexityResult(nll, count, nbytes, words, len(docs), pseudo=encoder)
