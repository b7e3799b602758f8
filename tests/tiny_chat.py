"""A word-level tokenizer with a chat template, for tiny random chat models in fast tests (shared by
tests/generate and tests/serve)."""

from __future__ import annotations

from typing import Any

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
