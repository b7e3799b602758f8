import json
from pathlib import Path

import pytest

from lamina.data.grpo_tasks import THINGS, length_target, main, reward_gain, write_prompts
from lamina.data.preference import read_prompts


def test_length_target_and_prompts(tmp_path: Path) -> None:
    ids = [[1] * n for n in (1, 3, 6, 9, 12, 16)]
    assert length_target([], [""] * 6, ids) == [1 - 5 / 6, 0.5, 1.0, 0.5, 0.0, 0.0]
    path = write_prompts(tmp_path / "p.jsonl")
    assert json.loads(path.read_text().splitlines()[0])["prompt"][0]["content"] == "Name a color."
    assert len(read_prompts(path).prompts) == len(THINGS)


def test_gain_and_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"step": 1, "loss": 0.1}] + [{"step": s, "reward": s / 10} for s in range(1, 11)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert reward_gain(tmp_path / "metrics.jsonl") == pytest.approx((0.3, 0.8))
    assert main([str(tmp_path), "--gain"]) == 0
    assert "first 5 steps 0.300 -> last 5 steps 0.800 (+0.500)" in capsys.readouterr().out
    assert main([str(tmp_path / "none"), "--gain"]) == 1  # no metrics.jsonl: one line, no traceback
    assert "lamina:" in capsys.readouterr().err
    assert main([str(tmp_path / "sub" / "p.jsonl")]) == 0
    assert len((tmp_path / "sub" / "p.jsonl").read_text().splitlines()) == len(THINGS)
