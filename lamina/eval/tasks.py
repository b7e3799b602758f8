"""Benchmark tasks read from local files in their published formats, with lm-eval's default prompts.

    task = load_task("arc_easy", "data/")          # data/ARC-Easy/ARC-Easy-Test.jsonl (+ -Train for shots)
    task.items[0].query, task.items[0].choices, task.items[0].gold

Where each task's files go under ``--data DIR`` (the names the publishers use; a folder of HF ``datasets``
parquet files, or one saved with ``Dataset.save_to_disk``, works in place of the published files):

- ``mmlu``: ``DIR/mmlu/test/*_test.csv`` and ``DIR/mmlu/dev/*_dev.csv`` (Hendrycks et al. 2021's
  ``data/`` folder: no header; question, A, B, C, D, answer letter). Few-shot: the first k of the subject's
  dev file, as lm-eval (``first_n``), after "The following are multiple choice questions (with answers)
  about SUBJECT.".
- ``arc_easy`` / ``arc_challenge``: ``DIR/ARC-Easy/ARC-Easy-{Test,Train}.jsonl`` (AI2's ARC-V1 JSONL:
  ``question.stem``, ``question.choices[].{text,label}``, ``answerKey``). "Question: ...\\nAnswer:".
- ``hellaswag``: ``DIR/hellaswag/hellaswag_{val,train}.jsonl`` (Zellers et al. 2019; lm-eval's
  preprocessing of ``activity_label``, ``ctx_a``, ``ctx_b``, ``endings``).
- ``truthfulqa_mc1`` / ``truthfulqa_mc2``: ``DIR/truthfulqa/mc_task.json`` (Lin et al. 2022's
  ``mc1_targets`` / ``mc2_targets``: answer -> 0/1), after lm-eval's six-question QA prompt; zero-shot.
- ``wic``: ``DIR/WiC/{val,train}.jsonl`` (SuperGLUE's WiC JSONL; choices "no" / "yes").
- ``bigbench_NAME``: ``DIR/bigbench/NAME/task.json`` (BIG-bench JSON: ``examples`` with ``target_scores``
  for multiple choice, or ``target`` for generation; ``example_input_prefix`` / ``example_output_prefix``).
- ``gsm8k``: ``DIR/gsm8k/{test,train}.jsonl`` (``question``, ``answer`` ending "#### N"); generation.
  Few-shot examples are drawn from the train file as lm-eval's default sampler draws them (one
  ``random.Random(seed)`` for the task, ``rng.sample(train, k)`` per item in order): the same seed gives
  lm-eval's ``gsm8k`` prompts.
- ``squad``: ``DIR/squad/dev-v1.1.json`` (+ ``train-v1.1.json``), SQuAD's nested JSON; generation, with
  lm-eval's ``squadv2`` prompt ("Title: ...\\n\\nBackground: ...\\n\\nQuestion: ...\\n\\nAnswer:").

Bad input raises ``TaskFormatError`` naming the file, the row and the field expected; an answer index out of
range skips that item and counts it in ``Task.skipped``.
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lamina.errors import ConfigError

Kind = Literal["multiple_choice", "mc2", "generate"]


class TaskFormatError(ConfigError):
    """A task file is not in the format its task expects (the message names file, row and field)."""


@dataclass
class Item:
    """One question. ``query``: the prompt (lm-eval's ``doc_to_text``); ``choices``: the answers scored
    (multiple choice); ``gold``: the right choice's index; ``labels``: MC2's 1 (true) / 0 (false) per
    choice; ``answers``: references of a generation task; ``group``: MMLU's subject (few-shot examples and
    the description come from the same group); ``source``: "file:row"."""

    query: str
    choices: list[str] = field(default_factory=list)
    gold: int = 0
    labels: list[int] | None = None
    answers: list[str] = field(default_factory=list)
    group: str = ""
    source: str = ""

    @property
    def target(self) -> str:
        """The answer text a few-shot example shows."""
        return self.answers[0] if self.answers else self.choices[self.gold]


@dataclass
class Task:
    """A task's test items and few-shot pool, with lm-eval's prompt pieces."""

    name: str
    kind: Kind
    items: list[Item]
    fewshot: list[Item] = field(default_factory=list)
    descriptions: dict[str, str] = field(default_factory=dict)  # group -> text before the examples
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    sampler: Literal["first_n", "random"] = "random"
    max_shots: int | None = None  # TruthfulQA: zero-shot only
    until: list[str] = field(default_factory=lambda: ["\n\n"])
    skipped: list[str] = field(default_factory=list)  # "file:row: why", one per item left out

    def context(self, item: Item, shots: int = 0, rng: random.Random | None = None) -> str:
        """The full prompt of ``item``: description, ``shots`` examples (first k of the group, or drawn with
        ``rng``, never the item itself), then the item's query (lm-eval's ``fewshot_context``)."""
        shots = min(shots, self.max_shots) if self.max_shots is not None else shots
        desc = self.descriptions.get(item.group, "")
        if shots <= 0:
            return desc + item.query
        pool = [x for x in self.fewshot if x.group == item.group and x is not item]
        if len(pool) < shots:
            raise ConfigError(
                f"task {self.name}: {shots}-shot needs {shots} examples, the few-shot split has {len(pool)}"
                + (f" for {item.group!r}" if item.group else "")
            )
        if self.sampler == "first_n":
            chosen = pool[:shots]
        else:
            chosen = (rng or random.Random(1234)).sample(pool, shots)
        shown = self.fewshot_delimiter.join(x.query + self.target_delimiter + x.target for x in chosen)
        return desc + shown + self.fewshot_delimiter + item.query


# -- readers: rows of published files --------------------------------------------------------------------


def read_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """("file:row", row) for each record of a .jsonl, .json (a list, or BIG-bench's ``examples``), .csv
    (lists, no header) or .parquet file, or of a folder saved by ``datasets``."""
    if path.is_dir():
        yield from _read_hf_folder(path)
        return
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    yield f"{path}:{n}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise TaskFormatError(
                        f"{path}:{n}: not valid JSON ({e.msg}); expected one object a line"
                    ) from None
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise TaskFormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        rows = data.get("examples") if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise TaskFormatError(f"{path}: expected a JSON list of records (or an object with 'examples')")
        for n, row in enumerate(rows, start=1):
            yield f"{path}:{n}", row
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.reader(f), start=1):
                if row:
                    yield f"{path}:{n}", row
    elif suffix == ".parquet":
        pq = _pyarrow_parquet(path)
        for n, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield f"{path}:{n}", row
    else:
        raise TaskFormatError(f"{path}: unknown file type; expected .jsonl, .json, .csv or .parquet")


def _pyarrow_parquet(path: Path) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{path}: reading parquet needs pyarrow: pip install 'lamina[eval]'") from None
    return pq


def _read_hf_folder(path: Path) -> Iterator[tuple[str, Any]]:
    parquet = sorted(path.glob("*.parquet"))
    if parquet:
        for p in parquet:
            yield from read_rows(p)
        return
    arrow = sorted(path.glob("*.arrow"))
    if not arrow:
        raise TaskFormatError(f"{path}: a folder with neither .parquet files nor a datasets save_to_disk")
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{path}: reading a datasets folder needs datasets: pip install datasets") from None
    for n, row in enumerate(datasets.load_from_disk(str(path)), start=1):
        yield f"{path}:{n}", row


def _get(row: Any, where: str, key: str, kind: type | tuple[type, ...] = str) -> Any:
    """``row[key]`` (dotted keys go down), checked against ``kind``; else a TaskFormatError."""
    value = row
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise TaskFormatError(f"{where}: missing field {key!r}")
        value = value[part]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise TaskFormatError(f"{where}: field {key!r} must be {names}, got {type(value).__name__}")
    return value


class _Skip(Exception):
    """An item left out (answer out of range): counted, not fatal."""


# -- documents -> items, one function per format ----------------------------------------------------------


def _mmlu(where: str, row: Any) -> Item:
    if isinstance(row, list):  # the published CSV: question, A, B, C, D, answer letter
        if len(row) != 6:
            raise TaskFormatError(
                f"{where}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}"
            )
        question, choices, letter = row[0], row[1:5], row[5].strip()
        if letter not in "ABCD" or len(letter) != 1:
            raise _Skip(f"{where}: answer {letter!r} is not one of A, B, C, D")
        gold = "ABCD".index(letter)
    else:  # cais/mmlu parquet: question, subject, choices, answer (int)
        question, choices = _get(row, where, "question"), list(_get(row, where, "choices", list))
        gold = _get(row, where, "answer", int)
        if len(choices) != 4:
            raise TaskFormatError(f"{where}: field 'choices' must hold 4 answers, got {len(choices)}")
    if not 0 <= gold < 4:
        raise _Skip(f"{where}: answer index {gold} out of range for 4 choices")
    query = question.strip() + "".join(f"\n{k}. {c}" for k, c in zip("ABCD", choices, strict=True))
    return Item(query + "\nAnswer:", ["A", "B", "C", "D"], gold, source=where)


def _arc(where: str, row: Any) -> Item:
    if "stem" in (row.get("question") if isinstance(row.get("question"), Mapping) else {}):  # AI2's JSONL
        question = _get(row, where, "question.stem")
        options = _get(row, where, "question.choices", list)
        texts = [_get(c, f"{where} (question.choices)", "text") for c in options]
        labels = [str(_get(c, f"{where} (question.choices)", "label", (str, int))) for c in options]
    else:  # allenai/ai2_arc parquet: question, choices {text, label}, answerKey
        question = _get(row, where, "question")
        texts, labels = (
            list(_get(row, where, "choices.text", list)),
            list(_get(row, where, "choices.label", list)),
        )
    key = str(_get(row, where, "answerKey", (str, int)))
    if key not in labels:
        raise _Skip(f"{where}: answerKey {key!r} is not among the labels {labels}")
    return Item(f"Question: {question}\nAnswer:", texts, labels.index(key), source=where)


def _hellaswag_pre(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def _hellaswag(where: str, row: Any) -> Item:
    ctx = _get(row, where, "ctx_a") + " " + _get(row, where, "ctx_b").capitalize()
    endings = [_hellaswag_pre(e) for e in _get(row, where, "endings", list)]
    gold = int(_get(row, where, "label", (int, str)))
    if not 0 <= gold < len(endings):
        raise _Skip(f"{where}: label {gold} out of range for {len(endings)} endings")
    return Item(_hellaswag_pre(_get(row, where, "activity_label") + ": " + ctx), endings, gold, source=where)


TRUTHFULQA_PROMPT = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\nA: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\nA: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\nA: The 1992 Olympics were held in Barcelona, Spain."
)  # lm-eval's truthfulqa_mc1.yaml prompt_qa (from the paper's QA prompt)


def _truthfulqa(targets: str) -> Callable[[str, Any], Item]:
    def convert(where: str, row: Any) -> Item:
        question = _get(row, where, "question")
        t = _get(row, where, targets, Mapping)
        if "choices" in t:  # the HF parquet: {choices: [...], labels: [...]}
            choices, labels = list(t["choices"]), [int(x) for x in t["labels"]]
        else:  # mc_task.json: {answer: 0/1}, the true answers first
            choices, labels = list(t), [int(v) for v in t.values()]
        if not choices or labels[0] != 1:
            raise TaskFormatError(f"{where}: field {targets!r} must list answers with the first one true (1)")
        query = TRUTHFULQA_PROMPT + "\n\nQ: " + question + "\nA:"
        return Item(query, choices, 0, labels=labels, source=where)

    return convert


def _wic(where: str, row: Any) -> Item:
    s1, s2 = _get(row, where, "sentence1"), _get(row, where, "sentence2")
    start, end = _get(row, where, "start1", int), _get(row, where, "end1", int)
    label = _get(row, where, "label", (bool, int))
    if int(label) not in (0, 1):
        raise _Skip(f"{where}: label {label} out of range for 2 choices")
    query = (
        f"Sentence 1: {s1}\nSentence 2: {s2}\nQuestion: Is the word '{s1[start:end]}' used in the same way "
        "in the two sentences above?\nAnswer:"
    )
    return Item(query, ["no", "yes"], int(label), source=where)


def _bigbench(prefixes: tuple[str, str]) -> Callable[[str, Any], Item]:
    def convert(where: str, row: Any) -> Item:
        text = _get(row, where, "input")
        query = prefixes[0].lstrip() + text + prefixes[1].rstrip()
        if "target_scores" in row:
            scores = _get(row, where, "target_scores", Mapping)
            if not scores:
                raise TaskFormatError(f"{where}: field 'target_scores' is empty")
            choices = list(scores)
            best = max(scores.values())
            return Item(
                query, choices, choices.index(next(c for c in choices if scores[c] == best)), source=where
            )
        target = _get(row, where, "target", (str, list))
        return Item(query, answers=[target] if isinstance(target, str) else list(target), source=where)

    return convert


GSM8K_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")


def _gsm8k(where: str, row: Any) -> Item:
    question, answer = _get(row, where, "question"), _get(row, where, "answer")
    if not GSM8K_ANSWER.search(answer):
        raise TaskFormatError(f"{where}: field 'answer' must end with '#### NUMBER'")
    return Item(f"Question: {question}\nAnswer:", answers=[answer], source=where)


def _squad_rows(rows: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """SQuAD's nested JSON (data -> paragraphs -> qas) or flat rows (HF parquet) as flat rows."""
    for where, row in rows:
        if isinstance(row, Mapping) and "paragraphs" in row:
            title = row.get("title", "")
            for p, para in enumerate(_get(row, where, "paragraphs", list)):
                for q, qa in enumerate(_get(para, f"{where} paragraph {p}", "qas", list)):
                    at = f"{where} paragraph {p} question {q}"
                    answers = [_get(a, at, "text") for a in _get(qa, at, "answers", list)]
                    yield at, {"title": title, "context": _get(para, at, "context"),
                               "question": _get(qa, at, "question"), "answers": {"text": answers}}  # fmt: skip
        else:
            yield where, row


def _squad(where: str, row: Any) -> Item:
    context, question = _get(row, where, "context"), _get(row, where, "question")
    answers = list(_get(row, where, "answers.text", list))
    if not answers:
        raise _Skip(f"{where}: no reference answers")
    title = row.get("title", "") if isinstance(row, Mapping) else ""
    return Item(f"Title: {title}\n\nBackground: {context}\n\nQuestion: {question}\n\nAnswer:",
                answers=answers, source=where)  # lm-eval's squadv2 prompt  # fmt: skip


# -- the registry ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's files are (globs under the data folder, first match wins) and how rows become items."""

    kind: Kind
    test: tuple[str, ...]
    train: tuple[str, ...]
    convert: Callable[[str, Any], Item]
    options: Mapping[str, Any] = field(default_factory=dict)


def _arc_spec(name: str) -> TaskSpec:
    return TaskSpec(
        "multiple_choice",
        (f"{name}/{name}-Test.jsonl", f"{name}/test", f"{name}/test-*.parquet"),
        (f"{name}/{name}-Train.jsonl", f"{name}/train", f"{name}/train-*.parquet"),
        _arc,
    )


TASKS: dict[str, TaskSpec] = {
    "mmlu": TaskSpec(
        "multiple_choice",
        ("mmlu/test/*_test.csv", "mmlu/data/test/*_test.csv", "mmlu/test-*.parquet", "mmlu/test"),
        ("mmlu/dev/*_dev.csv", "mmlu/data/dev/*_dev.csv", "mmlu/dev-*.parquet", "mmlu/dev"),
        _mmlu,
        {"sampler": "first_n"},
    ),
    "arc_easy": _arc_spec("ARC-Easy"),
    "arc_challenge": _arc_spec("ARC-Challenge"),
    "hellaswag": TaskSpec(
        "multiple_choice",
        ("hellaswag/hellaswag_val.jsonl", "hellaswag/validation-*.parquet", "hellaswag/validation"),
        ("hellaswag/hellaswag_train.jsonl", "hellaswag/train-*.parquet", "hellaswag/train"),
        _hellaswag,
    ),
    "truthfulqa_mc1": TaskSpec(
        "multiple_choice",
        ("truthfulqa/mc_task.json", "truthfulqa/validation-*.parquet", "truthfulqa/validation"),
        (),
        _truthfulqa("mc1_targets"),
        {"max_shots": 0},
    ),
    "truthfulqa_mc2": TaskSpec(
        "mc2",
        ("truthfulqa/mc_task.json", "truthfulqa/validation-*.parquet", "truthfulqa/validation"),
        (),
        _truthfulqa("mc2_targets"),
        {"max_shots": 0},
    ),
    "wic": TaskSpec(
        "multiple_choice",
        ("WiC/val.jsonl", "wic/val.jsonl", "wic/validation-*.parquet", "wic/validation"),
        ("WiC/train.jsonl", "wic/train.jsonl", "wic/train-*.parquet", "wic/train"),
        _wic,
    ),
    "gsm8k": TaskSpec(
        "generate",
        ("gsm8k/test.jsonl", "gsm8k/test-*.parquet", "gsm8k/test"),
        ("gsm8k/train.jsonl", "gsm8k/train-*.parquet", "gsm8k/train"),
        _gsm8k,
        {"until": ["Question:", "</s>", "<|im_end|>"]},
    ),
    "squad": TaskSpec(
        "generate",
        ("squad/dev-v1.1.json", "squad/validation-*.parquet", "squad/validation"),
        ("squad/train-v1.1.json", "squad/train-*.parquet", "squad/train"),
        _squad,
        {"until": ["\n"]},
    ),
}


def known_tasks(data_dir: str | Path | None = None) -> list[str]:
    """The task names: the fixed ones, and ``bigbench_NAME`` for each BIG-bench task under ``data_dir``."""
    names = sorted(TASKS)
    if data_dir is not None:
        names += sorted(f"bigbench_{p.parent.name}" for p in Path(data_dir).glob("bigbench/*/task.json"))
    return names


def _find(data_dir: Path, patterns: tuple[str, ...]) -> list[Path]:
    for pattern in patterns:
        found = sorted(data_dir.glob(pattern))
        if found:
            return found
    return []


def _items(
    paths: list[Path], convert: Callable[[str, Any], Item], group: Callable[[Path], str], name: str
) -> tuple[list[Item], list[str]]:
    items, skipped = [], []
    for path in paths:
        rows = read_rows(path)
        if name == "squad":
            rows = _squad_rows(_json_data(path) if path.suffix == ".json" else rows)
        for where, row in rows:
            if not isinstance(row, (Mapping, list)):
                raise TaskFormatError(f"{where}: expected an object, got {type(row).__name__}")
            try:
                item = convert(where, row)
            except _Skip as e:
                skipped.append(str(e))
                continue
            item.group = (
                group(path) if not isinstance(row, Mapping) or "subject" not in row else str(row["subject"])
            )
            items.append(item)
    return items, skipped


def _json_data(path: Path) -> Iterator[tuple[str, Any]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    rows = data.get("data") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise TaskFormatError(f"{path}: expected SQuAD's JSON: an object with 'data' (a list of articles)")
    for n, row in enumerate(rows, start=1):
        yield f"{path}:article {n}", row


def load_task(name: str, data_dir: str | Path) -> Task:
    """Read task ``name`` from ``data_dir`` (layout: the module docstring). Raises ``ConfigError`` for an
    unknown name (listing the known ones) or missing files (naming where they were looked for), and
    ``TaskFormatError`` for a file in the wrong format."""
    data_dir = Path(data_dir)
    if name.startswith("bigbench_"):
        return _load_bigbench(name, data_dir)
    spec = TASKS.get(name)
    if spec is None:
        import difflib

        known = known_tasks(data_dir)
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        meant = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"unknown task {name!r}; known tasks: {', '.join(known)}, bigbench_NAME (data/bigbench/NAME){meant}"
        )
    test = _find(data_dir, spec.test)
    if not test:
        raise ConfigError(
            f"task {name}: no files found under {data_dir} (looked for {', '.join(spec.test)}); "
            "see `lamina eval --help` for where each task's published files go"
        )
    subject = _mmlu_subject if name == "mmlu" else (lambda p: "")
    items, skipped = _items(test, spec.convert, subject, name)
    fewshot, _ = _items(_find(data_dir, spec.train), spec.convert, subject, name) if spec.train else ([], [])
    task = Task(name, spec.kind, items, fewshot, skipped=skipped, **spec.options)
    if name == "mmlu":
        for item in items:
            subj = item.group.replace("_", " ")
            task.descriptions[item.group] = (
                f"The following are multiple choice questions (with answers) about {subj}.\n\n"
            )
    return task


def _mmlu_subject(path: Path) -> str:
    return re.sub(r"_(test|dev|val)$", "", path.stem)


def _load_bigbench(name: str, data_dir: Path) -> Task:
    path = data_dir / "bigbench" / name.removeprefix("bigbench_") / "task.json"
    if not path.is_file():
        raise ConfigError(
            f"unknown task {name!r} (no {path}); known tasks: {', '.join(known_tasks(data_dir))}"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TaskFormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("examples"), list):
        raise TaskFormatError(f"{path}: expected BIG-bench's JSON: an object with 'examples' (a list)")
    prefixes = (meta.get("example_input_prefix", "\nQ: "), meta.get("example_output_prefix", "\nA: "))
    items, skipped = _items([path], _bigbench(prefixes), lambda p: "", name)
    kinds = {bool(i.choices) for i in items}
    if len(kinds) > 1:
        raise TaskFormatError(f"{path}: mixes 'target_scores' and 'target' examples; use one kind per task")
    prefix = meta.get("task_prefix", "")
    task = Task(name, "multiple_choice" if kinds == {True} else "generate", items, items, skipped=skipped,
                descriptions={"": prefix}, fewshot_delimiter="\n\n", until=["\n"])  # fmt: skip
    return task
