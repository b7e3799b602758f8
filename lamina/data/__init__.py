"""Data: ingest text into token shards (``prepare``) and batch them for training (``CausalBatches``)."""

from __future__ import annotations

from lamina.data.batches import CausalBatches, TokenShards, val_batches
from lamina.data.builtin import stdlib_texts
from lamina.data.corpus import DataConfig, Manifest, load_tokenizer, prepare

__all__ = [
    "CausalBatches",
    "DataConfig",
    "Manifest",
    "TokenShards",
    "load_tokenizer",
    "prepare",
    "stdlib_texts",
    "val_batches",
]
