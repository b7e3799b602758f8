"""``lamina.load(MODEL)``: any model lamina can read (lamina folder, HF folder, GGUF file), by path or name."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lamina.checkpoint.gguf import gguf_to_hf, read_gguf
from lamina.checkpoint.hf import config_from_hf, read_hf_folder, state_dict_from_hf
from lamina.checkpoint.lamina import build_model, load_checkpoint
from lamina.checkpoint.registry import ModelEntry, resolve
from lamina.config import GenerationConfig
from lamina.errors import ConfigError
from lamina.model.quant import FORMATS, convert_weights
from lamina.model.transformer import Transformer
from lamina.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    """A model with everything needed to use it: tokenizer, default decoding controls, where it came from."""

    model: Transformer
    tokenizer: Tokenizer | None
    generation: GenerationConfig
    entry: ModelEntry


def load(
    model: str | os.PathLike[str],
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    weights: str | None = None,
    compile: bool = False,
) -> LoadedModel:
    """Load MODEL (a path, a name in the models directory, or a packaged short name such as ``smollm2``).

    ``weights`` converts the model for inference to a weight format of ``lamina.model.quant.FORMATS``
    ("fp32", "bf16", "int8" and "int4" weight-only, "w8a8"); it then decides the dtype (the integer
    formats quantize the fp32 weights). ``compile`` makes ``model(...)`` run through ``torch.compile``
    (dynamic shapes; other methods such as ``hidden_states`` stay eager): the first calls of each new
    shape compile (minutes for SmolLM2 on 2 cores), later ones run faster.
    """
    if weights is not None and weights not in FORMATS:
        raise ConfigError(f"weight format {weights!r} is not one of {', '.join(FORMATS)}")
    entry = resolve(model)
    dt = torch.float32 if weights is not None else _dtype(dtype)
    if entry.format == "lamina":
        net, gen = load_checkpoint(entry.path, dtype=dt, device=device)
        tok = Tokenizer.from_file(entry.path) if (entry.path / "tokenizer.json").is_file() else None
        return LoadedModel(_convert(net, weights, compile), tok, gen, entry)
    if entry.format == "gguf":
        gf = read_gguf(entry.path)
        hf, sd = gguf_to_hf(gf)
        tok = Tokenizer.from_gguf_metadata(gf.metadata)
    else:
        hf, sd = read_hf_folder(entry.path)
        tok = Tokenizer.from_file(entry.path) if (entry.path / "tokenizer.json").is_file() else None
    cfg = config_from_hf(hf)
    net = build_model(cfg, state_dict_from_hf(hf, sd, cfg), dtype=dt, device=device)
    return LoadedModel(_convert(net, weights, compile), tok, _generation_defaults(entry.path, hf, tok), entry)


def _convert(net: Transformer, weights: str | None, compile: bool) -> Transformer:
    if weights is not None:
        convert_weights(net, weights)
    if compile:  # dynamic: the KV cache and the batch change shape from step to step
        net.compile(dynamic=True)
    return net


def _generation_defaults(path: Path, hf: dict[str, Any], tok: Tokenizer | None) -> GenerationConfig:
    """eos ids from generation_config.json, else config.json, else the tokenizer."""
    eos: Any = None
    gen_file = path / "generation_config.json" if path.is_dir() else None
    if gen_file is not None and gen_file.is_file():
        eos = json.loads(gen_file.read_text()).get("eos_token_id")
    if eos is None:
        eos = hf.get("eos_token_id")
    if eos is None and tok is not None:
        eos = tok.eos_token_id
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return GenerationConfig(eos_token_ids=ids)


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}  # fmt: skip
    if dtype not in table:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(table)}")
    return table[dtype]
