"""A tiny index and a chat model that can cite, for the server's retrieval tests (``test_serve_grounding``,
``test_web_page``); import as ``from tiny_index import ...``."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from tiny_chat import tiny_tokenizer

DOCS = {
    "cats.md": "the cat sat on the mat. the cat sat on a mat.",
    "dogs.md": "a dog ran. the dog ran on the green mat. a dog ran.",
    "colors.md": "red green blue. blue green red. blue blue.",
    "greet.md": "hello world. hello <b>world</b>.",
}


def chat_lm() -> Any:
    """A random 2-layer decoder over the word-level chat tokenizer plus ``[1]`` and ``[9]``, 1024 tokens of
    context (room for the grounded prompt)."""
    import torch

    from lamina.checkpoint.load import LoadedModel
    from lamina.checkpoint.registry import ModelEntry
    from lamina.config import GenerationConfig, ModelConfig
    from lamina.model.transformer import Transformer

    tok = tiny_tokenizer()
    tok.backend.add_tokens(["[1]", "[9]"])
    torch.manual_seed(0)
    cfg = ModelConfig.preset("llama-tiny", vocab_size=tok.vocab_size, max_seq_len=1024)
    gen = GenerationConfig(eos_token_ids=[tok.eos_token_id])
    return LoadedModel(
        Transformer(cfg).eval(), tok, gen, ModelEntry("tiny-chat", Path("."), "path", "lamina")
    )


def build_index(path: Path, embedder: Any) -> Path:
    """A SQLite index of ``DOCS`` embedded by ``embedder`` (whose name, "tiny", the index stores)."""
    from lamina.rag.index import IndexConfig, update
    from lamina.rag.types import Document

    docs = [
        Document(name, text, hashlib.sha256(text.encode()).hexdigest(), {"path": name, "title": name})
        for name, text in DOCS.items()
    ]
    update(
        documents=docs,
        config=IndexConfig(
            store=str(path), embedding_model="tiny", chunk_size=32, chunk_overlap=4, progress=False
        ),
        embedder=embedder,
    )
    return path
