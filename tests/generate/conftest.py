"""A tiny random chat model with a word-level tokenizer: fast stand-ins for SmolLM2 in text-level tests."""

from __future__ import annotations

from typing import Any

import pytest
from tiny_chat import tiny_lm


@pytest.fixture
def tiny() -> Any:
    """``tiny_lm()``: a fresh tiny chat model."""
    return tiny_lm()
