"""``lamina eval``: a table and JSON (config, versions, per-item records) from fixture tasks, perplexity,
one-line errors for an unknown task, and ``lamina eval compare``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tiny_chat import tiny_lm

from lamina.cli.main import main

FIXTURES = Path(__file__).parents[1] / "eval" / "fixtures"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from lamina.checkpoint.lamina import save_checkpoint

    lm = tiny_lm()
    return str(save_checkpoint(tmp_path_factory.mktemp("tiny") / "m", lm.model, lm.tokenizer, lm.generation))


def test_eval_and_compare(model_dir: str, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "a.json"
    args = ["eval", model_dir, "--tasks", "arc_easy,truthfulqa_mc2", "--data", str(FIXTURES), "--limit", "3"]
    assert (
        main(
            [*args, "--shots", "1", "--perplexity", str(FIXTURES / "text" / "notes.jsonl"), "--out", str(out)]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "arc_easy" in table and "acc_norm" in table and "mc2" in table and "bits_per_byte" in table
    result = json.loads(out.read_text())
    assert result["config"]["tasks"] == ["arc_easy", "truthfulqa_mc2"] and result["config"]["shots"] == 1
    assert result["results"]["arc_easy"]["n"] == 3 and len(result["samples"]["arc_easy"]) == 3
    assert result["perplexity"]["documents"] == 3 and "torch" in result["versions"]
    assert main(["eval", "compare", str(out), str(out)]) == 0
    assert "+0.0000" in capsys.readouterr().out


def test_errors_are_one_line(model_dir: str, capsys: Any) -> None:
    assert main(["eval", model_dir, "--tasks", "arc_easyy", "--data", str(FIXTURES)]) == 1
    err = capsys.readouterr().err
    assert "unknown task 'arc_easyy'; known tasks: arc_challenge, arc_easy" in err and "Traceback" not in err
    assert main(["eval", model_dir]) == 1
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["eval", "compare", "a.json"]) == 1
