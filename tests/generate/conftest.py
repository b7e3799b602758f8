"""A tiny random chat model with a word-level tokenizer: fast stand-ins for SmolLM2 in text-level tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_chat import CONTEXT, tiny_tokenizer


def tiny_lm(generation: Any = None, **model: Any) -> Any:
    """A LoadedModel "tiny": a random 2-layer decoder (``model`` overrides ModelConfig fields) and the
    word-level chat tokenizer; ``generation`` is its checkpoint's GenerationConfig (default: eos only)."""
    from lamina.checkpoint.load import LoadedModel
    from lamina.checkpoint.registry import ModelEntry
    from lamina.config import GenerationConfig, ModelConfig
    from lamina.model.transformer import Transformer

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    cfg = ModelConfig.preset("llama-tiny", **{"vocab_size": tok.vocab_size, "max_seq_len": CONTEXT, **model})
    gen = generation or GenerationConfig(eos_token_ids=[tok.eos_token_id])
    return LoadedModel(Transformer(cfg).eval(), tok, gen, ModelEntry("tiny", Path("."), "path", "lamina"))


@pytest.fixture
def tiny() -> Any:
    """``tiny_lm()``: a fresh tiny chat model."""
    return tiny_lm()
