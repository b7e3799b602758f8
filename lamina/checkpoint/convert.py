"""``lamina.convert``: any model lamina reads, written as a lamina checkpoint folder, a Hugging Face folder or
a GGUF file for llama.cpp."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from lamina.checkpoint.gguf_export import DEFAULT_GGUF_QUANT, GGUFQuant, export_gguf
from lamina.checkpoint.hf import export_hf
from lamina.checkpoint.lamina import save_checkpoint
from lamina.checkpoint.load import load
from lamina.checkpoint.peft import load_with_adapter, own_adapter
from lamina.checkpoint.sentence_transformers import EmbeddingConfig
from lamina.errors import CheckpointError, ConfigError


def convert(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    to: Literal["lamina", "hf", "gguf"] = "lamina",
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32",
    overwrite: bool = False,
    merge_lora: str | None = None,
    quant: GGUFQuant | None = None,
) -> Path:
    """Read ``src`` (a lamina folder, an HF folder or a GGUF file, by path or name) and write ``out``.

    GGUF weights are dequantized, except for ``to="gguf"`` with ``quant="keep"`` (see ``export_gguf``). With ``merge_lora`` the adapter is added into the base's fp32 weights
    (PEFT's ``merge_and_unload``) before the cast to ``dtype``. ``out`` is written atomically: it appears complete or not at all. A
    sentence-transformers model keeps its pooling files. Returns the folder written.

    Args:
        src: the model to read (path, models-directory name or packaged name)
        out: the output folder (--to gguf: the .gguf file)
        to: lamina (a lamina checkpoint folder), hf (a folder transformers loads) or gguf (a file llama.cpp runs)
        dtype: weights dtype of the output (lamina, hf; --to gguf: see quant)
        overwrite: replace an existing model folder at out (else an existing, non-empty out is refused)
        merge_lora: a PEFT LoRA adapter folder (lamina's or PEFT's) to merge into the weights first
        quant: --to gguf: tensor type, f32 f16 bf16 q8_0 q4_0 q4_1 q4_k q6_k, or keep (a GGUF source's own blocks); unset: f16

    Raises ``CheckpointError`` when ``out`` exists and is not empty, unless ``overwrite`` (which still
    never replaces a folder that is not a model folder), and ``ConfigError`` for ``quant`` without
    ``to="gguf"``, an ``out`` ending in ``.gguf`` with another ``to``, or a lamina LoRA checkpoint ``src``
    without ``merge_lora`` (its weights alone are the base: the adapter would be dropped).
    """
    target = Path(out)
    own = own_adapter(src)
    if own is not None and merge_lora is None:
        raise ConfigError(
            f"{src} is a LoRA checkpoint (its weights are the base without {own}): add --merge-lora {own} to "
            "write the adapted model"
        )
    if to != "gguf" and quant is not None:
        raise ConfigError(f"quant={quant!r} applies to GGUF output only; add --to gguf")
    if to != "gguf" and target.suffix == ".gguf":
        raise ConfigError(f"{target} names a GGUF file but to={to!r} writes a folder; add --to gguf")
    if to == "gguf":
        lm = load(src) if merge_lora is None else load_with_adapter(src, merge_lora)  # fp32: quant decides
        return export_gguf(lm, target, quant=quant or DEFAULT_GGUF_QUANT, overwrite=overwrite)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise CheckpointError(
            f"{target} already exists; choose a new folder, or pass --overwrite to replace it"
        )
    lm = load(src, dtype=dtype) if merge_lora is None else load_with_adapter(src, merge_lora, dtype=dtype)
    folder = lm.entry.path if lm.entry.path.is_dir() else lm.entry.path.parent
    embedding = EmbeddingConfig.from_folder(folder)  # a sentence-transformers model keeps its pooling
    if to == "hf":
        return export_hf(out, lm.model, lm.tokenizer, lm.generation, embedding=embedding)
    written = save_checkpoint(out, lm.model, lm.tokenizer, lm.generation)
    if embedding is not None:
        embedding.write(written, lm.model.config.d_model)
    return written
