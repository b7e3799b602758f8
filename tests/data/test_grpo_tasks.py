import json
from pathlib import Path

from lamina.data.grpo_tasks import THINGS, length_target, write_prompts
from lamina.data.preference import read_prompts


def test_length_target_and_prompts(tmp_path: Path) -> None:
    ids = [[1] * n for n in (1, 3, 6, 9, 12, 16)]
    assert length_target([], [""] * 6, ids) == [1 - 5 / 6, 0.5, 1.0, 0.5, 0.0, 0.0]
    path = write_prompts(tmp_path / "p.jsonl")
    assert json.loads(path.read_text().splitlines()[0])["prompt"][0]["content"] == "Name a color."
    assert len(read_prompts(path).prompts) == len(THINGS)
