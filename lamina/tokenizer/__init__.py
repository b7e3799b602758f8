"""Tokenizers: train one, load one (HF ``tokenizer.json`` or the vocabulary inside a GGUF), encode and
decode, decode a stream of ids, and render chat templates.

A :class:`Tokenizer` wraps a Hugging Face ``tokenizers.Tokenizer`` (the Rust "backend", reachable as
``.backend``) and adds what lamina needs around it: the special tokens' roles (bos, eos, pad, unk, mask),
whether bos/eos are added when encoding, and the chat template.

    tok = Tokenizer.train(texts, vocab_size=8000)           # byte-level BPE
    tok.save("out/tokenizer")                               # tokenizer.json + tokenizer_config.json
    tok = Tokenizer.from_file("out/tokenizer")              # or a Hugging Face model folder
    tok = Tokenizer.from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    ids = tok.encode("Hello world")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)

Modules: ``tokenizer`` (the Tokenizer and DecodeStream), ``gguf_vocab`` (tokenizers built from GGUF
vocabularies), ``chat_template`` (rendering chat templates, and encoding them so that text users write
never becomes a control token). The names below are importable from ``lamina.tokenizer`` itself.
"""

from lamina.tokenizer.chat_template import apply_chat_template, encode_chat, text_backend
from lamina.tokenizer.gguf_vocab import GGUF_PRE_TOKENIZER_SPLITS, tokenizer_from_gguf_metadata
from lamina.tokenizer.gguf_vocab import _bytes_to_unicode as _bytes_to_unicode
from lamina.tokenizer.tokenizer import (
    DEFAULT_SPECIAL_TOKENS,
    N_BYTE_SYMBOLS,
    ROLES,
    DecodeStream,
    Kind,
    Tokenizer,
)

__all__ = [
    "DEFAULT_SPECIAL_TOKENS",
    "GGUF_PRE_TOKENIZER_SPLITS",
    "N_BYTE_SYMBOLS",
    "ROLES",
    "DecodeStream",
    "Kind",
    "Tokenizer",
    "apply_chat_template",
    "encode_chat",
    "text_backend",
    "tokenizer_from_gguf_metadata",
]
