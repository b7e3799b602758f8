"""Generation tasks against lm-eval itself: the shipped gsm8k_local / squad_local YAMLs run by lm-eval with
the ``lamina`` model give the same generated strings and the same exact match / F1 / GSM8K numbers as
``lamina eval`` on the same files (zero-shot: both pipelines then build the same prompts)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lm_eval  # (the test extra installs it: a missing reference fails, never skips)
import pytest
from tiny_chat import tiny_lm

FIXTURES = Path(__file__).parent / "fixtures"
TASKS = {"gsm8k_local": "gsm8k", "squad_local": "squad"}
METRICS = {  # lm-eval's key -> lamina's
    "gsm8k_local": {
        "exact_match,strict-match": "strict_match",
        "exact_match,flexible-extract": "flexible_extract",
    },
    "squad_local": {"exact_match,none": "exact_match", "f1,none": "f1"},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from lm_eval.tasks import TaskManager

    import lamina.eval
    from lamina.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("gen")
    for folder in ("gsm8k", "squad"):
        shutil.copytree(FIXTURES / folder, root / "data" / folder)
    lm = tiny_lm()  # a byte-level BPE in place of its word-level vocabulary: any text can come out
    texts = [f.read_text(encoding="utf-8") for f in (root / "data").rglob("*.json*")]
    lm.tokenizer = Tokenizer.train(texts, vocab_size=400, show_progress=False)
    lm.model = tiny_lm(vocab_size=lm.tokenizer.vocab_size, max_seq_len=256).model
    tm = TaskManager(
        include_path=str(Path(lamina.eval.__file__).parent / "lm_eval_tasks"), include_defaults=False
    )
    return root, lm, tm


def _both(setup: Any, monkeypatch: pytest.MonkeyPatch, max_new: int) -> tuple[dict, dict]:
    from lamina.eval.harness import LaminaLM
    from lamina.eval.runner import EvalConfig, evaluate

    root, lm, tm = setup
    monkeypatch.chdir(root)  # the YAMLs read data/... relative to the working directory
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    got = lm_eval.simple_evaluate(model=LaminaLM(pretrained=lm, max_gen_toks=max_new), tasks=list(TASKS),
                                  task_manager=tm, num_fewshot=0, log_samples=True)  # fmt: skip
    want = evaluate(lm, EvalConfig(tasks=list(TASKS.values()), data="data", max_new_tokens=max_new))
    return got, want


def _check(got: dict, want: dict) -> None:
    for local, name in TASKS.items():
        mine = want["samples"][name]
        theirs = {s["doc_id"]: s["resps"][0][0] for s in got["samples"][local]}  # (one record per filter)
        assert [theirs[n] for n in range(len(theirs))] == [s["output"] for s in mine], name
        for key, ours in METRICS[local].items():
            assert got["results"][local][key] == pytest.approx(want["results"][name][ours], abs=1e-12), key
        assert got["results"][local]["sample_len"] == want["results"][name]["n"], name


def test_tiny_model_generations_agree(setup: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    got, want = _both(setup, monkeypatch, max_new=6)
    _check(got, want)
    assert any(s["output"] for s in want["samples"]["squad"])  # it generated something


def test_metrics_agree_on_answers_with_known_scores(setup: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Answers built from the references (articles, punctuation, case, extra words, commas, $, wrong
    numbers) in place of the model's: lm-eval's exact_match filters and the SQuAD script give the same
    scores as lamina's, and those scores are neither all 0 nor all 1."""
    import importlib

    from lamina.eval.tasks import load_task

    gold = {i.query: i.answers for n in TASKS.values() for i in load_task(n, FIXTURES).items}
    squad = [" {}", " The {}.", " {} and more words", " nothing", " {}!", " an {} x", ""]
    gsm8k = [" so #### {}", " The answer is ${}.", " #### {}0", " {} then 5", " #### 1,{}", " 3,{}.", " none"]

    order = {q: n for n, q in enumerate(gold)}  # (the two pipelines send their requests in other orders)

    def answer(prompt: str) -> str:
        refs, n = gold[prompt], order[prompt]
        if "####" in refs[0]:
            return gsm8k[n % len(gsm8k)].format(refs[0].split("#### ")[-1])
        return squad[n % len(squad)].format(
            refs[n % len(refs)].upper() if n % 3 == 2 else refs[n % len(refs)]
        )

    def fake(lm: Any, contexts: list[str], *_: Any, **__: Any) -> list[str]:
        return [answer(c) for c in contexts]

    monkeypatch.setattr(importlib.import_module("lamina.eval.generation_tasks"), "generate_greedy", fake)
    got, want = _both(setup, monkeypatch, max_new=6)
    _check(got, want)
    for name, metric in (("gsm8k", "strict_match"), ("gsm8k", "flexible_extract"), ("squad", "f1")):
        assert 0 < want["results"][name][metric] < 1, (name, metric)


def test_gsm8k_few_shot_draws_equal_lm_eval(setup: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """k-shot GSM8K prompts: lamina draws the same train examples as lm-eval's default sampler for the
    same seed (one ``Random(seed)`` per task, ``sample(train, k)`` per item in order)."""
    import random

    from lm_eval.tasks import get_task_dict

    from lamina.eval.tasks import load_task

    root, _, tm = setup
    monkeypatch.chdir(root)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    task = get_task_dict(["gsm8k_local"], tm)["gsm8k_local"]
    task.set_fewshot_seed(seed=1234)  # (lm_eval.simple_evaluate's default fewshot_random_seed)
    theirs = [task.fewshot_context(doc, 2) for doc in task.eval_docs]
    ours = load_task("gsm8k", root / "data")
    rng = random.Random(1234)
    mine = [ours.context(item, 2, rng) for item in ours.items]
    assert mine == theirs
    assert len(set(mine)) > 1 and len({m.split("Question:")[1] for m in mine}) > 1  # the draws vary
