"""Task readers: every fixture in its published format loads with lm-eval's prompts; bad input names the
file, row and field; an unknown task lists the known ones; an answer out of range is skipped and counted."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lamina.errors import ConfigError
from lamina.eval.tasks import TaskFormatError, known_tasks, load_task

FIXTURES = Path(__file__).parent / "fixtures"
COUNTS = {  # task: (kind, test items, few-shot pool)
    "arc_easy": ("multiple_choice", 18, 6),
    "hellaswag": ("multiple_choice", 24, 6),
    "mmlu": ("multiple_choice", 18, 10),
    "truthfulqa_mc1": ("multiple_choice", 20, 0),
    "truthfulqa_mc2": ("mc2", 20, 0),
    "wic": ("multiple_choice", 24, 6),
    "bigbench_cause_and_effect": ("multiple_choice", 20, 20),
    "bigbench_simple_answers": ("generate", 10, 10),
    "gsm8k": ("generate", 9, 3),
    "squad": ("generate", 10, 0),
}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_fixture_loads(name: str) -> None:
    task = load_task(name, FIXTURES)
    assert (task.kind, len(task.items), len(task.fewshot)) == COUNTS[name]
    assert task.skipped == []
    for item in task.items:
        assert item.source.startswith(str(FIXTURES))
        if task.kind != "generate":
            assert 0 <= item.gold < len(item.choices)


def test_prompts_are_lm_evals() -> None:
    arc = load_task("arc_easy", FIXTURES).items[0]
    assert arc.query == "Question: Which of these is a source of light?\nAnswer:"
    assert arc.choices[arc.gold] == "the Sun"
    hs = load_task("hellaswag", FIXTURES)
    brackets = next(i for i in hs.items if "spare" in i.query)  # " [title]" becomes ". "
    assert brackets.query.startswith(
        "Changing a tire: A driver pulls over with a flat tire. Find the spare. He"
    )
    mmlu = load_task("mmlu", FIXTURES)
    item = mmlu.items[0]
    assert item.choices == ["A", "B", "C", "D"] and item.query.endswith("\nD. 13\nAnswer:")
    two = mmlu.context(item, 2)  # first_n of the same subject's dev file, after the description
    assert two.startswith(
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
    )
    assert two.count("Answer:") == 3 and "How many minutes are in an hour?" in two
    wic = load_task("wic", FIXTURES).items[0]
    assert "Is the word 'bank' used in the same way" in wic.query and wic.choices == ["no", "yes"]
    mc2 = load_task("truthfulqa_mc2", FIXTURES)
    assert mc2.items[1].labels == [1, 1, 0, 0]
    assert mc2.context(mc2.items[0], 5) == mc2.context(mc2.items[0], 0)  # zero-shot only
    assert mc2.items[0].query.startswith("Q: What is human life expectancy")
    bb = load_task("bigbench_cause_and_effect", FIXTURES).items[0]
    assert bb.query.startswith("Q: If you drop a glass") and bb.query.endswith("\nA:")


def test_random_shots_follow_the_seed() -> None:
    import random

    task = load_task("arc_easy", FIXTURES)
    a = task.context(task.items[0], 3, random.Random(1))
    assert a == task.context(task.items[0], 3, random.Random(1))
    assert a != task.context(task.items[0], 3, random.Random(2))
    with pytest.raises(ConfigError, match="7-shot needs 7 examples"):
        task.context(task.items[0], 7)


def test_unknown_task_lists_the_known_ones() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown task 'mmlux'; known tasks: .*arc_easy.*bigbench_cause_and_effect"
    ):
        load_task("mmlux", FIXTURES)
    assert "bigbench_simple_answers" in known_tasks(FIXTURES)
    with pytest.raises(ConfigError, match=r"bigbench_NAME \(data/bigbench/NAME\) \(did you mean 'mmlu'\?\)$"):
        load_task("mmlx", FIXTURES)  # a typo gets the task meant


def test_missing_files_say_where_they_were_looked_for(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"ARC-Easy/ARC-Easy-Test.jsonl"):
        load_task("arc_easy", tmp_path)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_wrong_format_names_file_row_and_field(tmp_path: Path) -> None:
    good = {"id": "x", "question": {"stem": "Q?", "choices": [{"text": "a", "label": "A"}]}, "answerKey": "A"}
    f = _write(
        tmp_path / "ARC-Easy" / "ARC-Easy-Test.jsonl",
        json.dumps(good) + "\n" + json.dumps({"id": "y"}) + "\n",
    )
    with pytest.raises(TaskFormatError, match=f"{f}:2: missing field 'question'"):
        load_task("arc_easy", tmp_path)
    f.write_text("not json\n")
    with pytest.raises(TaskFormatError, match=f"{f}:1: not valid JSON"):
        load_task("arc_easy", tmp_path)
    m = _write(tmp_path / "mmlu" / "test" / "x_test.csv", "q,a,b,c,d,A\nq,a,b\n")
    with pytest.raises(TaskFormatError, match=f"{m}:2: expected 6 columns"):
        load_task("mmlu", tmp_path)
    w = _write(
        tmp_path / "WiC" / "val.jsonl", json.dumps({"sentence1": "a", "sentence2": "b", "start1": "0"}) + "\n"
    )
    with pytest.raises(TaskFormatError, match=f"{w}:1: field 'start1' must be int, got str"):
        load_task("wic", tmp_path)


def test_answer_out_of_range_is_skipped_and_counted(tmp_path: Path) -> None:
    rows = [
        json.loads(x) for x in (FIXTURES / "hellaswag" / "hellaswag_val.jsonl").read_text().splitlines()[:3]
    ]
    rows[1]["label"] = 7
    _write(tmp_path / "hellaswag" / "hellaswag_val.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    task = load_task("hellaswag", tmp_path)
    assert len(task.items) == 2 and len(task.skipped) == 1
    assert "hellaswag_val.jsonl:2: label 7 out of range for 4 endings" in task.skipped[0]
    path = tmp_path / "mmlu" / "test" / "s_test.csv"
    path.parent.mkdir(parents=True)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([["q1", "a", "b", "c", "d", "B"], ["q2", "a", "b", "c", "d", "E"]])
    task = load_task("mmlu", tmp_path)
    assert len(task.items) == 1 and "s_test.csv:2: answer 'E'" in task.skipped[0]


def test_hf_parquet_folder(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"id": "1", "question": "Which is hot?", "choices": {"text": ["ice", "fire"], "label": ["A", "B"]},
             "answerKey": "B"}]  # fmt: skip
    (tmp_path / "ARC-Easy").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "ARC-Easy" / "test-00000-of-00001.parquet")
    task = load_task("arc_easy", tmp_path)
    assert task.items[0].query == "Question: Which is hot?\nAnswer:" and task.items[0].gold == 1


def test_the_tasks_flag_help_names_every_task() -> None:
    """`lamina eval --help` lists the task names (it showed "mmlu,arc_easy,hellaswag," and nothing more)."""
    from lamina.eval.runner import EvalConfig
    from lamina.eval.tasks import TASKS
    from lamina.fields import fields_of

    text = next(f.help for f in fields_of(EvalConfig) if f.name == "tasks")
    assert not text.endswith(("...", ",")) and "bigbench_NAME" in text
    assert [t for t in TASKS if t not in text.replace(",", " ").split()] == []
