"""Multiple-choice scoring: the shared-prefix KV-cache path equals one full forward per choice, in any
batching; lm-eval's pair encoding and metrics (acc, acc_norm by characters, acc_bytes, mc2, stderr)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_chat import tiny_lm

from lamina.eval.multiple_choice import (
    choice_metrics,
    encode_pair,
    evaluate_multiple_choice,
    score_continuations,
    stderr,
)
from lamina.eval.tasks import load_task

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def lm() -> Any:
    return tiny_lm()


def _naive(model: Any, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    with torch.no_grad():
        lp = model(torch.tensor([ctx + cont]))[0].float().log_softmax(-1)
    rows = lp[len(ctx) - 1 : len(ctx) + len(cont) - 1]
    target = torch.tensor(cont)
    return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


@pytest.mark.parametrize("batch_tokens,by_length", [(1, False), (40, False), (10_000, False), (10_000, True)])
def test_shared_prefix_equals_full_forward(
    lm: Any, batch_tokens: int, by_length: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if by_length:  # no padding allowed: every context / continuation length its own batch / group
        from lamina.eval import multiple_choice

        monkeypatch.setattr(multiple_choice, "SMALL", 0)
        monkeypatch.setattr(multiple_choice, "PADDING", 0.0)
    g = torch.Generator().manual_seed(0)
    V = lm.model.config.vocab_size

    def ids(n: int) -> list[int]:
        return torch.randint(3, V, (n,), generator=g).tolist()

    requests = [
        (ids(n), [ids(k) for k in ks])
        for n, ks in [(5, [1, 3, 2]), (1, [4]), (12, [1, 1]), (7, [6, 2, 5, 1])]
    ]
    got = score_continuations(lm.model, requests, batch_tokens=batch_tokens)
    for (ctx, conts), scores in zip(requests, got, strict=True):
        for cont, (ll, greedy) in zip(conts, scores, strict=True):
            want, want_greedy = _naive(lm.model, ctx, cont)
            assert ll == pytest.approx(want, abs=1e-5)
            assert greedy == want_greedy


def test_long_request_loses_context_from_the_left(lm: Any) -> None:
    limit = lm.model.config.max_seq_len
    V = lm.model.config.vocab_size
    ctx, cont = [3 + i % (V - 3) for i in range(limit)], [5, 6]
    ((ll, _),) = score_continuations(lm.model, [(ctx, [cont])])[0]
    want, _ = _naive(lm.model, ctx[len(ctx) + len(cont) - 1 - limit :], cont)
    assert ll == pytest.approx(want, abs=1e-5)


def test_encode_pair_moves_trailing_space(lm: Any) -> None:
    tok = lm.tokenizer
    ctx, cont = encode_pair(tok, "the cat ", "sat", 99)
    assert ctx == tok.encode("the cat") and cont == tok.encode("the cat sat")[len(ctx) :]
    assert encode_pair(tok, "", "the cat", 99) == ([99], tok.encode("the cat", add_special_tokens=False))


def test_choice_metrics() -> None:
    # the shorter choice wins on the sum, the longer per character
    m = choice_metrics([-2.0, -3.0], ["a", "abcdefgh"], gold=1)
    assert (m["acc"], m["acc_norm"], m["acc_bytes"]) == (0.0, 1.0, 1.0)
    # bytes differ from characters for non-ASCII text
    m = choice_metrics([-3.0, -2.2], ["ééé", "abc"], gold=0)
    assert (m["acc_norm"], m["acc_bytes"]) == (0.0, 1.0)
    mc2 = choice_metrics([math.log(0.2), math.log(0.1), math.log(0.1)], ["x", "y", "z"], 0, labels=[1, 1, 0])
    assert mc2["mc2"] == pytest.approx(0.75)
    assert choice_metrics([-1.0, -1.0], ["a", "b"], gold=0)["acc"] == 1.0  # first of equal maxima
    assert stderr([1.0, 0.0, 1.0, 0.0]) == pytest.approx(math.sqrt(1 / 3) / 2)


def test_evaluate_on_fixture(lm: Any) -> None:
    task = load_task("truthfulqa_mc2", FIXTURES)
    r = evaluate_multiple_choice(lm, task, limit=3)
    assert r.metrics["n"] == 3 and 0 <= r.metrics["mc2"] <= 1 and "mc2_stderr" in r.metrics
    assert len(r.samples[0]["loglikelihoods"]) == len(task.items[0].choices)
    r = evaluate_multiple_choice(lm, load_task("arc_easy", FIXTURES), shots=2, limit=4)
    assert set(r.metrics) >= {"acc", "acc_norm", "acc_bytes", "acc_stderr", "n", "skipped"}
    assert r.samples[0]["context"].count("Answer:") == 3


def test_length_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    from lamina.eval import multiple_choice

    conts = [[0] * n for n in (30, 1, 29, 2, 10, 9, 1, 28)]
    assert multiple_choice._length_groups(conts) == [[0, 2, 7], [4, 5, 3]]  # 1-token ones: no pass
    monkeypatch.setattr(multiple_choice, "SMALL", 0)  # (at most 64 positions: one group)
    assert multiple_choice._length_groups(conts) == [[0, 2, 7], [4, 5], [3]]
    monkeypatch.setattr(multiple_choice, "PADDING", 0.0)
    assert multiple_choice._length_groups(conts) == [[0], [2], [7], [4], [5], [3]]


def test_int8_scores_do_not_depend_on_batch_mates(lm: Any) -> None:
    """int8 layers run a forward of > 16 tokens per row another way (``path_lengths``): a short context or
    continuation padded to a longer batch- or group-mate's length would change its log-likelihood."""
    import copy

    from lamina.eval import multiple_choice
    from lamina.model.quant import convert_weights

    model = convert_weights(copy.deepcopy(lm.model), "int8")
    g = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist()

    ctx, short = ids(10), ids(3)  # 10 context tokens; the continuation runs 2 tokens per row
    ((alone, _),) = score_continuations(model, [(ctx, [short])])[0]
    with_long_context = score_continuations(model, [(ctx, [short]), (ids(30), [ids(2)])])[0]
    assert with_long_context[0][0] == pytest.approx(alone, abs=1e-5)  # contexts 10 and 30: not one batch
    with_long_choice = score_continuations(model, [(ctx, [short, ids(25)])])[0]
    assert with_long_choice[0][0] == pytest.approx(alone, abs=1e-5)  # continuations 3 and 25: not one group
    assert multiple_choice._length_groups([[0] * 3, [0] * 25], (17,)) == [[1], [0]]
