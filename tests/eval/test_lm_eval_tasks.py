"""The lm-eval task YAMLs shipped in lamina/eval/lm_eval_tasks read the published files offline and, run
by lm-eval itself with the ``lamina`` model, give the same accuracies as ``lamina eval`` on the same
files (zero-shot: both pipelines then build identical requests)."""

from __future__ import annotations

import shutil
from pathlib import Path

import lm_eval  # (the test extra installs it: a missing reference fails, never skips)
import pytest
from tiny_chat import tiny_lm

FIXTURES = Path(__file__).parent / "fixtures"
TASKS = {"arc_easy_local": "arc_easy", "hellaswag_local": "hellaswag", "wic_local": "wic"}


@pytest.mark.slow
def test_shipped_task_yamls_agree_with_lamina_eval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lm_eval.tasks import TaskManager

    import lamina.eval
    from lamina.eval.harness import LaminaLM
    from lamina.eval.runner import EvalConfig, evaluate
    from lamina.tokenizer import Tokenizer

    for folder in ("ARC-Easy", "hellaswag", "WiC"):
        shutil.copytree(FIXTURES / folder, tmp_path / "data" / folder)
    monkeypatch.chdir(tmp_path)  # the YAMLs read data/... relative to the working directory
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lm = tiny_lm()  # a byte-level BPE in place of its word-level vocabulary: every prompt character counts
    texts = [f.read_text(encoding="utf-8") for f in (tmp_path / "data").rglob("*.jsonl")]
    lm.tokenizer = Tokenizer.train(texts, vocab_size=400, show_progress=False)
    lm.model = tiny_lm(vocab_size=lm.tokenizer.vocab_size).model
    include = Path(lamina.eval.__file__).parent / "lm_eval_tasks"
    tm = TaskManager(include_path=str(include), include_defaults=False)
    got = lm_eval.simple_evaluate(model=LaminaLM(pretrained=lm), tasks=list(TASKS), task_manager=tm,
                                  num_fewshot=0)["results"]  # fmt: skip
    want = evaluate(lm, EvalConfig(tasks=list(TASKS.values()), data="data"))["results"]
    for local, name in TASKS.items():
        assert got[local]["acc,none"] == pytest.approx(want[name]["acc"], abs=1e-12), name
        if name != "wic":  # lm-eval's wic reports acc only
            assert got[local]["acc_norm,none"] == pytest.approx(want[name]["acc_norm"], abs=1e-12), name
        assert got[local]["sample_len"] == want[name]["n"], name
