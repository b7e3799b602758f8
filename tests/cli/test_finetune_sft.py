"""``lamina finetune --task sft``: flags of the sft section reach the run, a run prints its summary and
writes its samples, bad data is one line per problem and all-dropped data one error line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tiny_chat import tiny_lm

import lamina
from lamina.cli.main import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lm = tiny_lm(d_model=32, n_heads=2, n_kv_heads=2, d_ff=64)
    return lamina.save_checkpoint(tmp_path_factory.mktemp("tiny") / "model", lm.model, tokenizer=lm.tokenizer)


def _data(path: Path) -> Path:
    rows = [{"prompt": "the cat sat", "completion": "sat cat the"},
            {"instruction": "blue red", "input": "", "output": "red blue"}] * 6  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    return path


def test_print_config_has_the_sft_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["finetune", "--task", "sft", "--data", "x.jsonl", "--init", "m", "--sft.loss_on", "all",
            "--sft.packing", "--sft.samples", "2", "--print-config"]  # fmt: skip
    assert main(argv) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["task"]["task"] == "sft" and cfg["sft"]["loss_on"] == "all" and cfg["sft"]["packing"] is True
    assert cfg["sft"]["samples"] == 2 and cfg["train"]["lr"] == 5e-5  # the finetune preset


def test_a_run_prints_its_summary_and_names_bad_lines(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _data(tmp_path / "chat.jsonl")
    out = tmp_path / "out"
    argv = ["finetune", "--task", "sft", "--data", str(data), "--task.val_data", str(data), "--init", str(tiny),
            "--out", str(out), "--train.max_steps", "2", "--train.batch_size", "4", "--train.progress", "false",
            "--sft.samples", "1", "--sft.sample_max_new_tokens", "3"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "trained 2 steps" in captured.out
    assert "lamina: training data: chat.jsonl line 13: not JSON" in captured.err
    assert "training data: 12 conversations used, 1 skipped, 0 truncated" in captured.err
    assert [json.loads(line)["step"] for line in (out / "samples.jsonl").read_text().splitlines()] == [2]


def test_all_dropped_is_one_error_line(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    argv = ["finetune", "--task", "sft", "--data", str(data), "--task.val_data", str(data), "--init", str(tiny),
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lamina finetune: error: every training conversation was dropped (1 skipped")
    assert "bad.jsonl line 1: no assistant turn" in err[-1]
