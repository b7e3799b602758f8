"""Fixtures of the apps tests: a tiny random chat model whose byte-level vocabulary can spell JSON (tool
calls decoded under a constraint), and a live ``lamina serve`` with SmolLM2 for the interop tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SPECIAL = ["<|im_start|>", "<|im_end|>"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    '{"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}',
    "You can call these tools (one JSON object per line: name, description, JSON Schema of the arguments)",
    '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}',
    "the cat sat on the mat. What is the weather in Paris? Add two integers.",
]


@pytest.fixture(scope="session")
def byte_lm() -> Any:
    """A LoadedModel "tiny-bytes": a random 2-layer decoder and a 320-token byte-level BPE with a chat
    template (every byte has its own token, so any JSON can be written)."""
    import torch
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from lamina.checkpoint.load import LoadedModel
    from lamina.checkpoint.registry import ModelEntry
    from lamina.config import GenerationConfig, ModelConfig
    from lamina.model.transformer import Transformer
    from lamina.tokenizer import Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=alphabet, special_tokens=SPECIAL)
    backend.train_from_iterator(CORPUS, trainer)
    tok = Tokenizer(backend, eos_token="<|im_end|>", chat_template=TEMPLATE)
    torch.manual_seed(0)
    cfg = ModelConfig.preset("llama-tiny", vocab_size=tok.vocab_size, max_seq_len=1024, d_model=64)
    gen = GenerationConfig(eos_token_ids=[tok.eos_token_id])
    entry = ModelEntry("tiny-bytes", Path("."), "path", "lamina")
    return LoadedModel(Transformer(cfg).eval(), tok, gen, entry)


@pytest.fixture(scope="module")
def server(lamina_smollm2: Any) -> Iterator[Any]:
    """A started ``lamina serve`` (SmolLM2 as "smollm2") in a thread, for the module."""
    pytest.importorskip("fastapi")
    from lamina.serve import BackgroundServer, ServeConfig

    s = BackgroundServer({"smollm2": lamina_smollm2}, ServeConfig(timeout=90.0)).start()
    yield s
    s.stop()
