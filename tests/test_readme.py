"""The README's examples run: every ```python block, and every `$ lamina ...` line of the tour."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from lamina.cli.main import main

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


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
def test_console_tour_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = re.findall(r"^\$ (lamina .*?)(?:\s+#.*)?$", README, flags=re.M)
    assert len(lines) >= 10
    for line in lines:
        argv = shlex.split(line.replace("/tmp/", f"{tmp_path}/"))[1:]
        try:
            code = main(argv)
        except SystemExit as e:  # --help exits
            code = int(e.code or 0)
        assert code == 0, f"{line}: {capsys.readouterr().err}"
        capsys.readouterr()
