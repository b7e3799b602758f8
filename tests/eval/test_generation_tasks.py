"""Generation metrics: SQuAD's normalisation, exact match and token F1; GSM8K's numeric extraction; a
generation task end to end through the batched engine."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_chat import tiny_lm

from lamina.eval.generation_tasks import (
    evaluate_generation,
    exact_match,
    extract_number,
    normalize_answer,
    token_f1,
)
from lamina.eval.tasks import load_task

FIXTURES = Path(__file__).parent / "fixtures"


def test_squad_metrics() -> None:
    assert normalize_answer("The  Eiffel, Tower!") == "eiffel tower"
    assert exact_match("the Atlantic.", ["Atlantic Ocean", "atlantic"]) == 1.0
    assert exact_match("Pacific", ["Atlantic"]) == 0.0
    assert token_f1("in Paris France", ["Paris"]) == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert token_f1("nothing", ["Paris", "nothing at all"]) == pytest.approx(0.5)  # P 1, R 1/3


def test_gsm8k_extraction() -> None:
    assert extract_number("so 2 * 1200 = 2,400 dollars.\n#### 2,400") == "2400"
    assert extract_number("The answer is $1,234.") is None
    assert extract_number("The answer is $1,234.", strict=False) == "1234"
    assert extract_number("3 apples then 7 apples", strict=False) == "7"


def test_generation_task_runs(tmp_path: Path) -> None:
    lm = tiny_lm()
    r = evaluate_generation(
        lm, load_task("bigbench_simple_answers", FIXTURES), shots=1, limit=3, max_new_tokens=4
    )
    assert r.metrics["n"] == 3 and set(r.metrics) >= {"exact_match", "f1", "exact_match_stderr"}
    assert r.samples[0]["context"].count("\nA:") == 2
    r = evaluate_generation(lm, load_task("gsm8k", FIXTURES), limit=2, max_new_tokens=3)
    assert set(r.metrics) >= {"strict_match", "flexible_extract"}
