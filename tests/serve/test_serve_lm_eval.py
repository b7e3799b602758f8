"""Scores through the server equal scores in process: lm-evaluation-harness's ``local-completions`` model
against a live ``lamina serve`` of SmolLM2 gives the log-likelihoods its ``hf`` backend gives on the HF
export of the same model, also where the model's next token after the continuation is end-of-sequence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.slow

# a tiny multiple-choice task; the model's next token after " green", " orange" and " red" is <|im_end|>
QUESTIONS = [
    ("Question: What color do you get by mixing blue and yellow?\nAnswer:", [" green", " orange", " red", " purple"]),
    ("Question: What is the capital of France?\nAnswer:", [" Paris", " London", " Berlin"]),
    ("Question: Which planet is closest to the sun?\nAnswer:", [" Mercury", " Venus", " Earth"]),
]  # fmt: skip


@pytest.fixture(scope="module")
def hf_export(lamina_smollm2: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lamina.checkpoint.hf import export_hf

    lm = lamina_smollm2
    return export_hf(tmp_path_factory.mktemp("smollm2-hf"), lm.model, lm.tokenizer, lm.generation)


def test_local_completions_scores_equal_the_hf_backend(
    make_server: Any, lamina_smollm2: Any, hf_export: Path
) -> None:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = lamina_smollm2
    with torch.no_grad():  # the fault this guards: an eos right after the continuation
        q, choices = QUESTIONS[0]
        for c in choices[:3]:
            ids = lm.tokenizer.encode(q + c)
            assert int(lm.model(torch.tensor([ids]))[0, -1].argmax()) in lm.generation.eos_token_ids
    requests = [
        Instance(request_type="loglikelihood", doc={}, arguments=(q, c), idx=i)
        for q, choices in QUESTIONS
        for i, c in enumerate(choices)
    ]
    server = make_server()
    api = LocalCompletionsAPI(
        model="smollm2",
        base_url=server.url + "/v1/completions",
        tokenizer_backend="huggingface",
        tokenizer=str(hf_export),  # offline: the export's tokenizer.json (token-id prompts)
        max_retries=1,
        batch_size=16,
    )
    served = api.loglikelihood(requests)
    ref = HFLM(pretrained=str(hf_export), device="cpu", dtype="float32", batch_size=16).loglikelihood(
        requests
    )
    for r, (got, greedy), (want, want_greedy) in zip(requests, served, ref, strict=True):
        assert got == pytest.approx(want, abs=1e-4), r.arguments
        assert greedy == want_greedy, r.arguments
    green, orange, red = (x for x, _ in served[:3])
    assert (green, orange, red) == pytest.approx((-9.71, -8.22, -6.73), abs=0.01)  # the numbers
