"""``lamina.load(MODEL)``: any model lamina can read (lamina folder, HF folder, GGUF file), by path or name."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from lamina.checkpoint.eos import eos_token_ids
from lamina.checkpoint.gguf import gguf_to_hf, read_gguf
from lamina.checkpoint.hf import config_from_hf, read_hf_folder, state_dict_from_hf
from lamina.checkpoint.lamina import build_model, load_checkpoint
from lamina.checkpoint.registry import ModelEntry, resolve
from lamina.config import GenerationConfig
from lamina.errors import CheckpointError, ConfigError, TokenizerError
from lamina.model.quant import FORMATS, WeightFormat, convert_weights
from lamina.model.transformer import Transformer
from lamina.tokenizer import Tokenizer


@dataclass
class LoadOptions:
    """How ``load`` prepares a model for inference (the ``--dtype/--weights/--compile`` flags)."""

    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # weights dtype when --weights is not given
    # convert the weights for inference: int4 (4-bit groups of 32, GGUF Q4_1's layout) decodes fastest
    # on CPU, then int8, then bf16; overrides dtype (none: the checkpoint's weights in dtype)
    weights: WeightFormat | None = None
    # torch.compile the model: minutes of compiling for each new shape first, then faster decoding
    compile: bool = False
    threads: int | None = None  # torch CPU threads of this process (None: torch's choice, one per core)

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads={self.threads} must be >= 1 (or unset: torch's choice)")


@dataclass
class LoadedModel:
    """A model with everything needed to use it: tokenizer, default decoding controls, where it came from."""

    model: Transformer
    tokenizer: Tokenizer | None
    generation: GenerationConfig
    entry: ModelEntry


def load(
    model: str | os.PathLike[str],
    dtype: torch.dtype | str = LoadOptions.dtype,
    device: torch.device | str = "cpu",
    weights: str | None = LoadOptions.weights,
    compile: bool = LoadOptions.compile,
) -> LoadedModel:
    """Load MODEL (a path, a name in the models directory, or a packaged short name such as ``smollm2``).

    ``weights`` converts the model for inference to a weight format of ``lamina.model.quant.FORMATS``
    ("fp32", "bf16", "int8" and "int4" weight-only, "w8a8"); it then decides the dtype (the integer
    formats quantize the fp32 weights). ``compile`` makes ``model(...)`` run through ``torch.compile``
    (dynamic shapes; other methods such as ``hidden_states`` stay eager): the first calls of each new
    shape compile (minutes for SmolLM2 on 2 cores), later ones run faster.

    ``generation.eos_token_ids`` holds every end-of-generation id the checkpoint names (generation
    files, config.json, GGUF eos/eot/eom, the tokenizer's eos, the chat template's end of turn; see
    ``lamina.checkpoint.eos``), so a chat reply stops at the end of its turn.
    """
    if weights is not None and weights not in FORMATS:
        raise ConfigError(f"weight format {weights!r} is not one of {', '.join(FORMATS)}")
    entry = resolve(model)
    dt = torch.float32 if weights is not None else _dtype(dtype)
    if entry.format == "lamina":
        net, gen = load_checkpoint(entry.path, dtype=dt, device=device)
        tok = _tokenizer_of(entry)
        gen = replace(gen, eos_token_ids=_in_vocab(eos_token_ids(gen.eos_token_ids, tokenizer=tok), net))
        return LoadedModel(_convert(net, weights, compile), tok, gen, entry)
    if entry.format == "gguf":
        gf = read_gguf(entry.path)
        hf, sd = gguf_to_hf(gf)
        tok = _tokenizer_of(entry, gf.metadata)
    else:
        hf, sd = read_hf_folder(entry.path)
        tok = _tokenizer_of(entry)
    cfg = config_from_hf(hf)
    net = build_model(cfg, state_dict_from_hf(hf, sd, cfg), dtype=dt, device=device)
    gen = GenerationConfig(eos_token_ids=_in_vocab(_hf_eos_token_ids(entry.path, hf, tok), net))
    return LoadedModel(_convert(net, weights, compile), tok, gen, entry)


def load_tokenizer(model: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer of MODEL without its weights: the one resolver every verb uses.

    MODEL is a ``tokenizer.json``, a folder holding one (a lamina checkpoint, a Hugging Face model folder,
    a saved tokenizer), or anything :func:`load` takes (``smollm2``, a name in the models directory, a
    ``.gguf``, whose tokenizer is built from its metadata: the tensors are not read).

    Raises:
        ModelNotFoundError: MODEL is none of these.
        TokenizerError: the model has no tokenizer (a folder without ``tokenizer.json``, a GGUF without
            tokenizer metadata) or its tokenizer files cannot be read.
    """
    path = Path(model)
    if (path.is_file() and path.suffix == ".json") or (path.is_dir() and (path / "tokenizer.json").is_file()):
        return Tokenizer.from_file(path)
    entry = resolve(model)
    tok = _tokenizer_of(entry)
    if tok is None:
        raise TokenizerError(
            f"model {os.fspath(model)!r} ({entry.path}) has no tokenizer.json; fix: pass a tokenizer "
            "explicitly (a tokenizer.json or a folder holding one)"
        )
    return tok


def _tokenizer_of(entry: ModelEntry, gguf_metadata: Mapping[str, Any] | None = None) -> Tokenizer | None:
    """The tokenizer stored with a resolved model (GGUF: from its metadata, read here unless given)."""
    if entry.format == "gguf":
        return Tokenizer.from_gguf_metadata(
            read_gguf(entry.path).metadata if gguf_metadata is None else gguf_metadata
        )
    return Tokenizer.from_file(entry.path) if (entry.path / "tokenizer.json").is_file() else None


def _convert(net: Transformer, weights: str | None, compile: bool) -> Transformer:
    if weights is not None:
        convert_weights(net, weights)
    if compile:  # dynamic: the KV cache and the batch change shape from step to step
        net.compile(dynamic=True)
    return net


def _hf_eos_token_ids(path: Path, hf: dict[str, Any], tok: Tokenizer | None) -> list[int]:
    """Every end-of-generation id of a HF folder or GGUF file: generation_config.json's eos ids, then
    config.json's (for GGUF: its eos, eot and eom ids), the tokenizer's eos and the chat template's end of
    turn (see ``lamina.checkpoint.eos``)."""
    gen_eos: Any = None
    gen_file = path / "generation_config.json"
    if path.is_dir() and gen_file.is_file():
        try:
            gen_eos = json.loads(gen_file.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError(f"{gen_file} is not a JSON object ({e}); fix or delete the file") from e
    return eos_token_ids(gen_eos, hf.get("eos_token_id"), tokenizer=tok)


def _in_vocab(ids: list[int], net: Transformer) -> list[int]:
    """The ids the model can generate (a file may name a token past the embedding)."""
    return [i for i in ids if 0 <= i < net.config.vocab_size]


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}  # fmt: skip
    if dtype not in table:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(table)}")
    return table[dtype]
