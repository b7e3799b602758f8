"""A word-level tokenizer with a chat template and a tiny random chat model (``tiny_lm``), for fast tests
(shared by tests/generate and tests/serve; import it as ``tiny_chat``: a module named ``conftest`` is
ambiguous across folders)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "blue", "green", "red", "hello", "world"]
SPECIAL = ["[UNK]", "<|im_start|>", "<|im_end|>"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)
CONTEXT = 64


def tiny_tokenizer() -> Any:
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    from lamina.tokenizer import Tokenizer

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS + ["user", "assistant", "system"])}
    backend = Backend(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    backend.add_special_tokens(SPECIAL)
    return Tokenizer(backend, eos_token="<|im_end|>", unk_token="[UNK]", chat_template=TEMPLATE)


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


def tiny_llama_config() -> Any:
    """A Llama-shaped decoder config small enough for fast tests (RoPE, RMSNorm, SwiGLU, GQA, tied
    embeddings; vocab 97, 2 layers, d_model 64): tests/model's quantization and compiled-step tests."""
    from lamina.config import ModelConfig

    return ModelConfig(
        vocab_size=97, max_seq_len=64, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=96,
        pos_encoding="rope", norm="rmsnorm", activation="swiglu", bias=False, tie_embeddings=True,
    )  # fmt: skip
