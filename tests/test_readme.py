"""The README's examples run: every ```python block, every `$ lamina ...` line of the tour and every
`lamina` command of the ```bash blocks (those that train, for two steps); the files they read ship in
examples/; the quick start's setup installs what the demo uses."""

from __future__ import annotations

import csv
import json
import re
import shlex
from pathlib import Path

import pytest

from lamina.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_quick_start_commands_are_the_scripts_ci_runs() -> None:
    assert "bash scripts/setup.sh && python3 -m lamina demo" in README
    assert "bash scripts/test.sh" in (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()


@pytest.mark.slow
def test_python_blocks_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


@pytest.mark.slow
def test_console_tour_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = re.findall(r"^\$ (lamina .*?)(?:\s+#.*)?$", README, flags=re.M)
    assert len(lines) >= 10
    monkeypatch.chdir(ROOT)  # the README's commands run from the repository's root (examples/...)
    for line in lines:
        argv = shlex.split(line.replace("/tmp/", f"{tmp_path}/"))[1:]
        try:
            code = main(argv)
        except SystemExit as e:  # --help exits
            code = int(e.code or 0)
        assert code == 0, f"{line}: {capsys.readouterr().err}"
        capsys.readouterr()


def _shell_commands() -> list[str]:
    """The ``lamina ...`` commands of the README's ```bash blocks, continuation lines joined, comments cut."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for command in re.sub(r"\\\n\s*", "", block).splitlines():
            command = re.sub(r"\s+#.*$", "", command).strip()
            if command.startswith("lamina "):
                commands.append(command)
    return commands


def _short(argv: list[str]) -> list[str]:
    """The documented short setting of a training command: two optimizer steps, and 200 KB of the
    built-in corpus."""
    if argv[0] not in ("pretrain", "finetune"):
        return argv
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--train.epochs", "--train.max_steps"):
            skip = True
        else:
            out.append(arg)
    out += ["--train.max_steps", "2"]
    if "--data.builtin" in argv:
        out += ["--data.max_bytes", "200K"]
    return out


@pytest.mark.slow
def test_shell_block_commands_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every ``lamina`` command of the ```bash blocks but ``lamina serve`` (it runs until Ctrl-C; the
    server's own tests start it), from the repository's root, writing under a temporary folder."""
    commands = [c for c in _shell_commands() if not c.startswith("lamina serve")]
    assert any("examples/reviews.csv" in c for c in commands) and len(commands) >= 4
    monkeypatch.chdir(ROOT)
    for command in commands:
        command = re.sub(r"(?<![\w/])(runs/|vectors\.npy)", lambda m: f"{tmp_path}/{m.group(1)}", command)
        argv = _short(shlex.split(command)[1:])
        assert main(argv) == 0, f"{command}: {capsys.readouterr().err}"
        capsys.readouterr()


def test_readme_example_files_exist_and_read() -> None:
    """Every examples/ file the README names ships, in the format its command reads."""
    from lamina.data.labeled import read_labeled
    from lamina.generate.batch import read_requests

    named = set(re.findall(r"examples/[\w.-]+", README))
    assert named >= {
        "examples/reviews.csv",
        "examples/chat.jsonl",
        "examples/prompts.jsonl",
        "examples/sentences.txt",
    }
    for name in named:
        assert (ROOT / name).is_file(), name
    reviews = read_labeled(ROOT / "examples" / "reviews.csv")
    assert len(reviews) >= 50 and sorted(set(reviews.labels)) == ["negative", "positive"]
    assert abs(reviews.labels.count("positive") - reviews.labels.count("negative")) <= 2
    with open(ROOT / "examples" / "reviews.csv", newline="") as f:
        assert next(csv.reader(f)) == ["text", "label"]
    for name, key in (("prompts.jsonl", "prompt"), ("chat.jsonl", "messages")):
        requests, _ = read_requests(ROOT / "examples" / name)
        assert requests and all(key in r for r in requests), name
        rows = [json.loads(line) for line in (ROOT / "examples" / name).read_text().splitlines()]
        assert len(rows) == len(requests)
    sentences = (ROOT / "examples" / "sentences.txt").read_text().splitlines()
    assert len(sentences) >= 4 and all(line.strip() for line in sentences)


def test_setup_installs_what_the_demo_uses() -> None:
    """The quick start's setup installs the train extra (the demo's TensorBoard events and curves.png),
    and on a CPU machine the CPU build of torch, never a CUDA one; the extra holds what the demo imports
    lazily."""
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert 'extras="[train]"' in setup and 'pip_install -e ".${extras}"' in setup
    assert '"torch==2.13.0+cpu" --extra-index-url https://download.pytorch.org/whl/cpu' in setup
    pyproject = (ROOT / "pyproject.toml").read_text()
    train = re.search(r"^train = \[(.*?)\]", pyproject, flags=re.M | re.S)
    assert train is not None and "tensorboard" in train.group(1) and "matplotlib" in train.group(1)
    assert '"lamina[train]"' in pyproject.split("test = [")[1]
    assert "done in" in (ROOT / "scripts" / "test.sh").read_text()
