"""Sentence embeddings: texts -> one float32 vector each, as ``sentence-transformers`` computes them.

    lm = lamina.load("minilm")                      # all-MiniLM-L6-v2
    vectors = lamina.embed(lm, ["A cat sits.", "A dog runs."])   # (2, 384) float32, unit length

How a model pools and normalises comes from its sentence-transformers files when the folder has them
(``modules.json``, ``1_Pooling/config.json``, ``sentence_bert_config.json``: pooling modes, a
``Normalize`` module, ``max_seq_length`` and ``do_lower_case``); otherwise mean pooling and unit length.
Texts are sorted by token count and batched so that a batch holds texts of similar length (little
padding). A text longer than ``max_seq_len`` tokens (special tokens included) is refused with
``InputTooLongError`` naming it, its length and the limit; with ``truncate=True`` it is cut instead
([CLS] and [SEP] kept) and the result lists which texts were cut. The result also names the pooling
used; a decoder without sentence-transformers files gets the defaults (mean pooling, unit length), which
a log line says.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from lamina.checkpoint.sentence_transformers import POOLINGS as POOLINGS  # re-exported: lamina.embeddings.X
from lamina.checkpoint.sentence_transformers import EmbeddingConfig as EmbeddingConfig
from lamina.checkpoint.sentence_transformers import Pooling as Pooling
from lamina.errors import CheckpointError, ConfigError, InputTooLongError
from lamina.model.transformer import Transformer
from lamina.tokenizer import Tokenizer

if TYPE_CHECKING:
    from lamina.checkpoint.load import LoadedModel


log = logging.getLogger("lamina")


@dataclass
class Embeddings:
    """Vectors (N, dim) float32 in the order of the texts, with each text's token count (after
    truncation), the indices of the texts cut to ``max_seq_len`` (only with ``truncate=True``), and the
    pooling modes used (``"mean"``, ...; several are concatenated in this order)."""

    vectors: Tensor
    n_tokens: list[int]
    truncated: list[int]
    max_seq_len: int
    pooling: list[str] = field(default_factory=lambda: ["mean"])


def embedding_config(lm: LoadedModel) -> EmbeddingConfig:
    """The model folder's sentence-transformers config, else mean pooling with unit-length vectors."""
    return EmbeddingConfig.from_folder(_folder(lm)) or EmbeddingConfig()


def has_embedding_files(lm: LoadedModel) -> bool:
    """Whether the model's folder has sentence-transformers files (else pooling is lamina's default)."""
    return (_folder(lm) / "modules.json").is_file()


def _folder(lm: LoadedModel) -> Path:
    return lm.entry.path if lm.entry.path.is_dir() else lm.entry.path.parent


def embed(
    lm: LoadedModel,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    config: EmbeddingConfig | None = None,
    truncate: bool = False,
) -> Tensor:
    """One float32 vector per text (N, dim) on the CPU, pooled as the model's config says.

    A text over the model's ``max_seq_len`` tokens raises ``InputTooLongError``; ``truncate=True`` cuts it
    instead (:func:`embed_texts` returns which texts were cut, and token counts).
    """
    return embed_texts(lm, texts, batch_size=batch_size, config=config, truncate=truncate).vectors


def embed_texts(
    lm: LoadedModel,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    config: EmbeddingConfig | None = None,
    truncate: bool = False,
) -> Embeddings:
    """Embed ``texts`` with ``lm`` (``lamina.load(...)``); ``config`` overrides the folder's settings.

    Raises ``InputTooLongError`` for a text over ``max_seq_len`` tokens unless ``truncate=True``, which
    cuts it and lists it in the result's ``truncated``. A decoder embedded without sentence-transformers
    files is mean-pooled, and says so in a log line and the result's ``pooling``.

    Args:
        batch_size: texts per forward pass
        truncate: cut a text over max_seq_len tokens instead of refusing it (the result lists the cut ones)
    """
    if lm.tokenizer is None:
        raise CheckpointError(f"model {lm.entry.name!r} has no tokenizer.json: embeddings need its tokenizer")
    if config is None:
        config = embedding_config(lm)
        if lm.model.config.arch == "decoder" and not has_embedding_files(lm):
            log.info(
                "%s is a decoder without sentence-transformers files: embedding with %s pooling%s",
                lm.entry.name,
                "+".join(config.pooling),
                ", unit length" if config.normalize else "",
            )
    return encode(lm.model, lm.tokenizer, texts, config, batch_size=batch_size, truncate=truncate)


@torch.inference_mode()
def encode(
    model: Transformer,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    config: EmbeddingConfig,
    batch_size: int = 32,
    truncate: bool = False,
) -> Embeddings:
    """The work of :func:`embed_texts` for a bare model and tokenizer."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ConfigError("texts must be a list of strings; for one text pass [text]")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    cfg = model.config
    max_len = min(config.max_seq_len or cfg.max_seq_len, cfg.max_seq_len)
    ids, types, truncated = _tokenize(tokenizer, texts, max_len, config.do_lower_case, truncate)
    pad = tokenizer.pad_token_id or 0
    device = model.tok_emb.weight.device
    dim = cfg.d_model * len(config.pooling)
    out = torch.empty(len(texts), dim, dtype=torch.float32)
    order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))  # longest first: memory peaks early
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        T = len(ids[rows[0]])
        x = torch.full((len(rows), T), pad, dtype=torch.long)
        tt = torch.zeros((len(rows), T), dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for r, i in enumerate(rows):
            n = len(ids[i])
            x[r, :n], tt[r, :n], mask[r, :n] = torch.tensor(ids[i]), torch.tensor(types[i]), 1
        h = model.hidden_states(
            x.to(device),
            attention_mask=None if bool(mask.all()) else mask.to(device),
            token_type_ids=tt.to(device) if model.type_emb is not None else None,
        )
        v = pool(h.float(), mask.to(device), config.pooling)
        if config.normalize:
            v = F.normalize(v, p=2, dim=1)
        out[torch.tensor(rows)] = v.cpu()
    return Embeddings(out, [len(t) for t in ids], truncated, max_len, list(config.pooling))


def pool(h: Tensor, mask: Tensor, modes: Sequence[str]) -> Tensor:
    """Pool hidden states (B, T, d) over real tokens (``mask`` (B, T) = 1) with each mode, concatenated
    in the order given: cls (first token), max, mean, mean_sqrt_len (sum / sqrt(count)), lasttoken."""
    m = mask.to(h.dtype)[..., None]  # (B, T, 1)
    count = m.sum(1).clamp(min=1e-9)  # (B, 1)
    parts = []
    for mode in modes:
        if mode == "cls":
            parts.append(h[:, 0])
        elif mode == "max":
            parts.append(h.masked_fill(m == 0, -1e9).max(1).values)
        elif mode == "mean":
            parts.append((h * m).sum(1) / count)
        elif mode == "mean_sqrt_len":
            parts.append((h * m).sum(1) / count.sqrt())
        else:
            last = mask.sum(1).long() - 1
            parts.append(h[torch.arange(h.shape[0], device=h.device), last])
    return torch.cat(parts, dim=1)


def _tokenize(
    tokenizer: Tokenizer, texts: Sequence[str], max_len: int, lower: bool, truncate: bool
) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """Ids and token types of each text with special tokens, cut so that the whole fits ``max_len``
    when ``truncate`` (else a text that does not fit raises ``InputTooLongError``)."""
    backend = tokenizer.backend
    special = backend.num_special_tokens_to_add(is_pair=False)
    budget = max_len - special
    encodings = backend.encode_batch([t.lower() if lower else t for t in texts], add_special_tokens=False)
    long = [i for i, enc in enumerate(encodings) if len(enc.ids) > budget]
    if long and not truncate:
        i, n = long[0], len(encodings[long[0]].ids) + special
        others = f" ({len(long)} of {len(texts)} texts are too long)" if len(long) > 1 else ""
        raise InputTooLongError(
            f"text {i} has {n} tokens, more than the {max_len} the model takes (max_seq_len, special tokens "
            f"included){others}; shorten it, or pass truncate=True to cut it",
            index=i,
            n_tokens=n,
            limit=max_len,
        )
    ids, types, truncated = [], [], []
    for i, enc in enumerate(encodings):
        if len(enc.ids) > budget:
            enc.truncate(budget)
            truncated.append(i)
        enc = backend.post_process(enc)
        ids.append(enc.ids)
        types.append(enc.type_ids)
    return ids, types, truncated
