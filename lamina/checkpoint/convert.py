"""``lamina.convert``: any model lamina reads, written as a lamina checkpoint folder or a Hugging Face folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from lamina.checkpoint.hf import export_hf
from lamina.checkpoint.lamina import save_checkpoint
from lamina.checkpoint.load import load
from lamina.checkpoint.peft import load_with_adapter
from lamina.checkpoint.sentence_transformers import EmbeddingConfig
from lamina.errors import CheckpointError


def convert(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    to: Literal["lamina", "hf"] = "lamina",
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32",
    overwrite: bool = False,
    merge_lora: str | None = None,
) -> Path:
    """Read ``src`` (a lamina folder, an HF folder or a GGUF file, by path or name) and write ``out``.

    GGUF weights are dequantized. With ``merge_lora`` the adapter is added into the base's fp32 weights
    (PEFT's ``merge_and_unload``) before the cast to ``dtype``. ``out`` is written atomically: it appears complete or not at all. A
    sentence-transformers model keeps its pooling files. Returns the folder written.

    Args:
        src: the model to read (path, models-directory name or packaged name)
        out: the output folder
        to: lamina (a lamina checkpoint folder) or hf (a folder transformers loads)
        dtype: weights dtype of the output
        overwrite: replace an existing model folder at out (else an existing, non-empty out is refused)
        merge_lora: a PEFT LoRA adapter folder (lamina's or PEFT's) to merge into the weights first

    Raises ``CheckpointError`` when ``out`` exists and is not empty, unless ``overwrite`` (which still
    never replaces a folder that is not a model folder).
    """
    target = Path(out)
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
