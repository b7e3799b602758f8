"""Agreement with lm-evaluation-harness and transformers on SmolLM2: every choice's log-likelihood on the
multiple-choice fixtures equals the ``hf`` backend's (tests/eval/reference.json, written by
make_reference.py) within 1e-4 and acc / acc_norm are equal; sliding-window perplexity equals the
transformers recipe within 1e-4 relative; a few items are re-checked live against lm-eval."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from lamina.eval.multiple_choice import build_requests, choice_metrics, score_continuations
from lamina.eval.tasks import load_task

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
FIXTURES = HERE / "fixtures"
REFERENCE = json.loads((HERE / "reference.json").read_text())


@pytest.mark.parametrize("key", sorted(REFERENCE["tasks"]))
def test_multiple_choice_equals_lm_eval(lamina_smollm2: Any, key: str) -> None:
    name, shots = key.split(":")
    rows = REFERENCE["tasks"][key]
    task = load_task(name, FIXTURES)
    _, requests = build_requests(lamina_smollm2, task, int(shots), REFERENCE["seed"], limit=len(rows))
    scored = score_continuations(lamina_smollm2.model, requests)
    for item, row, result in zip(task.items, rows, scored, strict=False):
        assert item.source.endswith(row["source"].rsplit("fixtures/", 1)[-1])
        lls = [ll for ll, _ in result]
        assert lls == pytest.approx(row["loglikelihoods"], abs=1e-4), item.source
        m = choice_metrics(lls, item.choices, item.gold)
        assert (m["acc"], m["acc_norm"]) == (row["acc"], row["acc_norm"]), item.source


def test_perplexity_equals_the_transformers_recipe(lamina_smollm2: Any) -> None:
    from lamina.eval.perplexity import token_nll

    ref = REFERENCE["perplexity"]
    ids = lamina_smollm2.tokenizer.encode((FIXTURES / ref["file"]).read_text(encoding="utf-8"))
    nll, count = token_nll(lamina_smollm2.model, ids, ref["max_length"], ref["stride"])
    assert count == ref["tokens"]
    assert math.exp(nll / count) == pytest.approx(ref["token_perplexity"], rel=1e-4)


@pytest.fixture(scope="module")
def hf_backend(lamina_smollm2: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """lm-eval's ``hf`` model on the HF export of the same SmolLM2 weights (fp32)."""
    from lm_eval.models.huggingface import HFLM

    from lamina.checkpoint.hf import export_hf

    lm = lamina_smollm2
    hf_dir = export_hf(tmp_path_factory.mktemp("hf"), lm.model, lm.tokenizer, lm.generation)
    return HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=16)


def test_live_against_lm_eval(lamina_smollm2: Any, hf_backend: Any) -> None:
    from lm_eval.api.instance import Instance

    from lamina.eval.harness import LaminaLM

    task = load_task("arc_easy", FIXTURES)
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=(task.context(item), " " + c), idx=k)
                for item in task.items[:3] for k, c in enumerate(item.choices)]  # fmt: skip
    want = hf_backend.loglikelihood(requests)
    got = LaminaLM(pretrained=lamina_smollm2).loglikelihood(requests)
    for r, (ll, greedy), (ref, ref_greedy) in zip(requests, got, want, strict=True):
        assert ll == pytest.approx(ref, abs=1e-4), r.arguments
        assert greedy == ref_greedy


def test_generate_until_equals_lm_eval(lamina_smollm2: Any, hf_backend: Any) -> None:
    """Greedy generations of SmolLM2 equal the ``hf`` backend's string for string: 2-shot GSM8K prompts
    (about 140 tokens) cut from the left to max_length 128 - 24 new tokens, and whole zero-shot SQuAD ones,
    each task with its stop strings, decoded in one batch by each side."""
    import random

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from lamina.eval.harness import LaminaLM

    requests = []
    for name, shots in (("gsm8k", 2), ("squad", 0)):
        task, rng = load_task(name, FIXTURES), random.Random(1234)
        for item in task.items[:3]:
            kwargs = {"until": list(task.until), "max_gen_toks": 24, "do_sample": False}
            requests.append(Instance(request_type="generate_until", doc={}, idx=0,
                                     arguments=(task.context(item, shots, rng), kwargs)))  # fmt: skip
    tok = lamina_smollm2.tokenizer
    gsm8k = [len(tok.encode(r.arguments[0], add_special_tokens=False)) for r in requests[:3]]
    assert min(gsm8k) > 128 - 24, gsm8k  # every GSM8K prompt loses tokens from the left
    ref = HFLM(pretrained=hf_backend.model, tokenizer=hf_backend.tokenizer, batch_size=16, max_length=128)
    want = ref.generate_until(requests)
    got = LaminaLM(pretrained=lamina_smollm2, max_length=128).generate_until(requests)
    assert got == want
    assert all(want) and len(set(want)) == len(want)
