"""The lm-eval model ``lamina``: registered under that name, its loglikelihood equals lamina's own
multiple-choice scores, its rolling log-likelihood equals one full forward, generate_until stops at
``until``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny_chat import tiny_lm

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def model() -> Any:
    from lamina.eval.harness import LaminaLM

    return LaminaLM(pretrained=tiny_lm(), batch_tokens=64)


def _instances(kind: str, args: list[tuple]) -> list[Any]:
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_registered() -> None:
    from lm_eval.api.registry import get_model

    from lamina.eval.harness import LaminaLM

    assert get_model("lamina") is LaminaLM


def test_loglikelihood(model: Any) -> None:
    lm = model.lm
    pairs = [("the cat", " sat"), ("the cat", " sat on the mat"), ("a dog ", "ran"), ("", "the dog")]
    got = model.loglikelihood(_instances("loglikelihood", pairs))
    for (ctx, cont), (ll, _) in zip(pairs, got, strict=True):
        c, k = (lm.tokenizer.encode(ctx.rstrip()), None) if ctx else ([model.prefix_token_id], None)
        whole = lm.tokenizer.encode((ctx + cont) if ctx else cont)
        if not ctx:
            whole = c + whole
        with torch.no_grad():
            lp = lm.model(torch.tensor([whole]))[0].float().log_softmax(-1)
        want = sum(float(lp[i - 1, whole[i]]) for i in range(len(c), len(whole)))
        assert ll == pytest.approx(want, abs=1e-5), (ctx, cont, k)


def test_rolling_and_generate(model: Any) -> None:
    lm = model.lm
    text = "the cat sat on the mat"
    (total,) = model.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]))
    ids = [model.prefix_token_id, *lm.tokenizer.encode(text)]
    with torch.no_grad():
        lp = lm.model(torch.tensor([ids]))[0].float().log_softmax(-1)
    assert total == pytest.approx(sum(float(lp[i - 1, ids[i]]) for i in range(1, len(ids))), abs=1e-5)
    outs = model.generate_until(
        _instances("generate_until", [("the cat", {"until": ["mat"], "max_gen_toks": 5})])
    )
    assert len(outs) == 1 and "mat" not in outs[0]
