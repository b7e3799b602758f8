"""The lm-eval model ``lamina``: registered under that name, its loglikelihood equals lamina's own
multiple-choice scores, its rolling log-likelihood equals one full forward, generate_until stops at
``until``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lm_eval  # noqa: F401  (the test extra installs it: a missing reference fails, never skips)
import pytest
import torch
from tiny_chat import WORDS, tiny_lm


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


def test_generate_until_cuts_long_contexts_from_the_left(model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A context over ``max_length - max_gen_toks`` tokens is decoded from its last that many tokens (lm-eval's
    ``HFLM.generate_until``: ``left_truncate_len``), not refused; a short one goes in whole; a
    ``max_gen_toks`` that leaves no room is a ConfigError."""
    from lamina.errors import ConfigError
    from lamina.generate.engine import Engine

    sent: list[list[int]] = []
    submit = Engine.submit
    monkeypatch.setattr(
        Engine, "submit", lambda self, ids, *a, **k: sent.append(list(ids)) or submit(self, ids, *a, **k)
    )
    long = " ".join(WORDS[(i * 5) % len(WORDS)] for i in range(150))
    ids = model.lm.tokenizer.encode(long)
    assert len(ids) > model.max_length  # (over the whole window: the engine alone refuses it)
    args = [(long, {"until": ["zzz"], "max_gen_toks": 8}), ("the cat", {"until": ["zzz"], "max_gen_toks": 4})]
    outs = model.generate_until(_instances("generate_until", args))
    assert len(outs) == 2
    assert sent == [ids[-(model.max_length - 8) :], model.lm.tokenizer.encode("the cat")]
    with pytest.raises(ConfigError, match="max_gen_toks=64"):
        model.generate_until(_instances("generate_until", [("the cat", {"max_gen_toks": 64})]))


@pytest.mark.slow
def test_lm_eval_cli_finds_the_model(tmp_path: Path) -> None:
    """``python -m lamina.eval.harness`` is lm-eval's CLI with ``--model lamina``, on a local task YAML."""
    import os
    import subprocess
    import sys

    from lamina.checkpoint.lamina import save_checkpoint

    lm = tiny_lm()
    model = save_checkpoint(tmp_path / "tiny", lm.model, lm.tokenizer, lm.generation)
    fixture = Path(__file__).parent / "fixtures" / "WiC" / "val.jsonl"
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "wic_local.yaml").write_text(
        "task: wic_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    validation: {fixture}\noutput_type: multiple_choice\nvalidation_split: validation\n"
        'doc_to_text: "Sentence 1: {{sentence1}}\\nSentence 2: {{sentence2}}\\nAnswer:"\n'
        "doc_to_target: \"{{label | int}}\"\ndoc_to_choice: ['no', 'yes']\nmetric_list:\n  - metric: acc\n"
    )
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    args = ["--model", "lamina", "--model_args", f"pretrained={model}", "--tasks", "wic_local",
            "--include_path", str(tmp_path / "tasks"), "--limit", "3"]  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "lamina.eval.harness", *args], capture_output=True, text=True,
                         env=env, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "|wic_local|" in run.stdout and "acc" in run.stdout
