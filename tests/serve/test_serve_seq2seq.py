"""An encoder-decoder's request on the server (lamina/serve/params.py): the prompt is the source, checked
against the encoder's window (with T5's relative positions, the server's max_source_tokens, default
max_seq_len), and max_tokens against the decoder's (start token + new tokens), each its own ``max_seq_len``;
a decoder still counts prompt + completion against one window."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lamina.checkpoint.load import LoadedModel
from lamina.checkpoint.registry import ModelEntry
from lamina.config import GenerationConfig, ModelConfig
from lamina.model.transformer import Transformer
from lamina.serve.errors import APIError
from lamina.serve.params import prepare_completion
from lamina.serve.registry import ServedModel
from lamina.serve.schemas import CompletionRequest
from lamina.serve.settings import ServeConfig


def _served(preset: str, **size: int) -> ServedModel:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(preset, vocab_size=32, max_seq_len=16, **size)).eval()
    lm = LoadedModel(model, None, GenerationConfig(), ModelEntry(preset, Path("."), "path", "lamina"))
    return ServedModel(preset, "generation", lm)


@pytest.fixture(scope="module")
def t5() -> ServedModel:
    return _served("t5-tiny")


def _budget(served: ServedModel, source: int, max_tokens: int | None, n: int = 1, **limits: int) -> int:
    req = CompletionRequest(model=served.name, prompt=[5] * source, max_tokens=max_tokens, n=n)
    return prepare_completion(req, served, ServeConfig(**limits)).prompts[0].config.max_new_tokens


def _refused(served: ServedModel, source: int, max_tokens: int | None, n: int = 1, **limits: int) -> APIError:
    with pytest.raises(APIError) as e:
        _budget(served, source, max_tokens, n, **limits)
    assert e.value.status == 400 and e.value.code == "context_length_exceeded"
    return e.value


def test_a_source_and_its_output_each_get_their_own_window(t5: ServedModel) -> None:
    # a 12-token source with 15 new tokens: 27 > max_seq_len 16, yet each side fits its own stack
    assert _budget(t5, 12, 15) == 15
    assert _budget(t5, 16, None) == 15  # the default: the decoder's whole window after its start token
    assert _budget(t5, 16, None, max_tokens_in_flight=24) == 7  # 24 - 16 source - 1 start token
    assert _budget(t5, 40, 4, max_source_tokens=40) == 4  # relative positions: past max_seq_len if allowed
    e = _refused(t5, 17, 4)  # by default the server reads at most max_seq_len source tokens
    assert e.param == "prompt" and "at most 16 tokens (lamina serve --max-source-tokens)" in e.message
    e = _refused(t5, 9, None, max_source_tokens=8)
    assert "at most 8 tokens" in e.message and "has 9 tokens" in e.message
    e = _refused(t5, 7, None, max_tokens_in_flight=16, n=2)  # 8 per sequence: 7 source + start + 1 new > 8
    assert e.param == "prompt" and "max-tokens-in-flight" in e.message
    assert _budget(t5, 6, None, max_tokens_in_flight=16, n=2) == 1
    base = _served("transformer-base", n_layers=1, d_model=16, n_heads=2, d_ff=32)
    e = _refused(base, 17, 4, max_source_tokens=64)  # sinusoidal positions end at max_seq_len
    assert e.param == "prompt" and "encoder reads at most 16 tokens." in e.message and "17" in e.message
    e = _refused(t5, 3, 16)
    assert e.param == "max_tokens" and "start token and 15 new tokens" in e.message


def test_a_decoder_counts_prompt_and_completion_together() -> None:
    gpt = _served("tiny")
    assert _budget(gpt, 12, 4) == 4 and _budget(gpt, 12, None) == 4
    e = _refused(gpt, 12, 5)
    assert e.param == "max_tokens" and "16 tokens" in e.message
