"""Greedy decoding on the real SmolLM2 GGUF equals `transformers` loading the same file."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lamina.generate.engine import greedy_decode

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "List three primary colors:",
    "Translate to French: Good morning, my friend.",
    "1, 2, 3, 5, 8, 13,",
]


@pytest.mark.slow
@torch.no_grad()
def test_greedy_32_tokens_and_last_logits_equal_transformers(
    lamina_smollm2: Any, hf_smollm2: Any, hf_smollm2_tokenizer: Any
) -> None:
    model, tok = lamina_smollm2.model, lamina_smollm2.tokenizer
    eos = lamina_smollm2.generation.eos_token_ids
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        assert ids == hf_smollm2_tokenizer(prompt)["input_ids"]
        x = torch.tensor([ids])
        ours_last = model(x)[0, -1]
        ref_last = hf_smollm2(x).logits[0, -1]
        assert (ours_last - ref_last).abs().max().item() < 1e-3, prompt
        ref = hf_smollm2.generate(
            x, max_new_tokens=32, do_sample=False, eos_token_id=eos, pad_token_id=eos[0]
        )
        ref_new = ref[0, len(ids) :].tolist()
        ref_new = ref_new[: ref_new.index(eos[0])] if eos[0] in ref_new else ref_new
        ours = greedy_decode(model, [ids], 32, eos)[0]
        assert ours == ref_new, f"{prompt!r}: {tok.decode(ours)!r} != {tok.decode(ref_new)!r}"


@pytest.mark.slow
@torch.no_grad()
def test_batched_prompts_of_different_lengths_equal_alone(lamina_smollm2: Any) -> None:
    model, tok = lamina_smollm2.model, lamina_smollm2.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS[:4]]
    batched = greedy_decode(model, prompts, 12)
    for p, out in zip(prompts, batched, strict=True):
        assert out == greedy_decode(model, [p], 12)[0]


def test_empty_prompt_and_overlong_prompt_are_clear_errors(lamina_smollm2: Any) -> None:
    from lamina.errors import ConfigError

    with pytest.raises(ConfigError, match="empty prompt"):
        greedy_decode(lamina_smollm2.model, [[]], 4)
    with pytest.raises(ConfigError, match="max_seq_len"):
        greedy_decode(lamina_smollm2.model, [[1] * 9000], 4)
