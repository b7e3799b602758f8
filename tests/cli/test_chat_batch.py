"""`lamina generate --input prompts.jsonl` (a batch) and `lamina chat` (history, commands, streaming)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import lamina
from lamina.cli.chat import chat_loop
from lamina.cli.main import main


@pytest.mark.slow
def test_generate_input_jsonl_runs_a_batch_in_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], lamina_smollm2: Any
) -> None:
    lm = lamina_smollm2
    requests = [
        {"prompt": "What is the capital of France?"},
        {"id": "b", "messages": [{"role": "user", "content": "Name a color."}], "max_new_tokens": 5},
        {"prompt": "Write a word.", "temperature": 0.9, "seed": 4, "n": 2},
        {"prompt": "What is the capital of France?", "num_beams": 3},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in requests) + "\n\n")
    out_path = tmp_path / "out.jsonl"
    code = main(
        ["generate", "smollm2", "--input", str(path), "--out", str(out_path), "--max-new-tokens", "8"]
    )
    assert code == 0
    rows = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert [(r["index"], r["id"]) for r in rows] == [(0, 0), (1, "b"), (2, 2), (2, 2), (3, 3)]
    assert rows[0]["text"] == lamina.generate(lm, requests[0]["prompt"], max_new_tokens=8)
    assert rows[1]["text"] == lamina.generate(lm, requests[1]["messages"], max_new_tokens=5)
    assert rows[1]["completion_tokens"] <= 5 and rows[0]["completion_tokens"] <= 8
    assert rows[2]["text"] == lamina.generate(lm, "Write a word.", max_new_tokens=8, temperature=0.9, seed=4)
    assert [r["n"] for r in rows[2:4]] == [0, 1]
    assert rows[4]["text"] == lamina.generate(lm, requests[3]["prompt"], max_new_tokens=8, num_beams=3)


def test_generate_input_errors_name_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": \n')
    assert main(["generate", "smollm2", "--input", str(path)]) == 1
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    path.write_text('{"prompt": "ok", "top_p": 7}\n')
    assert main(["generate", "smollm2", "--input", str(path)]) == 1
    assert "bad.jsonl:1: top_p=7" in capsys.readouterr().err
    assert main(["generate", "smollm2"]) == 1
    assert "give a PROMPT or --input" in capsys.readouterr().err


@pytest.mark.slow
def test_chat_keeps_history_and_obeys_commands(lamina_smollm2: Any) -> None:
    lm = lamina_smollm2
    lines = iter(
        ["My name is Ada.", "What is my name?", "/reset", "What is my name?", "/bogus", "/exit", "never"]
    )
    written: list[str] = []
    history = chat_loop(lm, lambda: next(lines, None), written.append, max_new_tokens=8)
    out = "".join(written)
    first = lamina.generate(lm, [{"role": "user", "content": "My name is Ada."}], max_new_tokens=8)
    convo = [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "What is my name?"},
    ]
    second = lamina.generate(lm, convo, max_new_tokens=8)
    fresh = lamina.generate(lm, [{"role": "user", "content": "What is my name?"}], max_new_tokens=8)
    assert out.startswith(first + "\n" + second + "\n(conversation reset)\n" + fresh + "\n")
    assert "unknown command '/bogus'" in out
    assert history == [
        {"role": "user", "content": "What is my name?"},
        {"role": "assistant", "content": fresh},
    ]
    assert len(written) > 6  # the replies were streamed in pieces
