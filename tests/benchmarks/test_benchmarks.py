"""benchmarks/: every benchmark has a short mode and ends with machine-readable headline lines;
run_all.py collects them and fails only on a crash. (The benchmarks themselves take minutes even in
their short mode, so the suite checks their source and runs run_all.py on stand-in scripts.)"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"


@pytest.fixture(autouse=True)
def _benchmarks_importable(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import their neighbour `common`
    yield


def _scripts() -> list[Path]:
    from run_all import benchmark_files

    return benchmark_files(BENCH)


def test_the_benchmarks_are_found() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        names = [p.stem for p in _scripts()]
    finally:
        sys.path.remove(str(BENCH))
    assert names == [
        "align",
        "decode",
        "diffusion",
        "embed",
        "eval",
        "finetune",
        "forward",
        "lora",
        "rag",
        "seq2seq",
        "serve",
        "speculative",
        "structured",
        "train_throughput",
    ]


@pytest.mark.parametrize(
    "name",
    [
        "align",
        "decode",
        "diffusion",
        "embed",
        "eval",
        "finetune",
        "forward",
        "lora",
        "rag",
        "seq2seq",
        "serve",
        "speculative",
        "structured",
        "train_throughput",
    ],
)
def test_each_benchmark_has_quick_and_headlines(name: str) -> None:
    """Read from the source: a ``--quick`` flag, and ``headline(...)`` calls naming a reference and, where
    the benchmark's docstring states a target, that target."""
    tree = ast.parse((BENCH / f"{name}.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    flags = [c.args[0].value for c in calls if c.args and isinstance(c.args[0], ast.Constant)
             and getattr(c.func, "attr", None) == "add_argument"]  # fmt: skip
    assert "--quick" in flags
    headlines = [c for c in calls if getattr(c.func, "id", None) == "headline"]
    assert headlines, f"{name}.py prints no headline"
    for call in headlines:
        assert len(call.args) >= 3, ast.unparse(call)  # what, ratio, reference (, target)
    doc = ast.get_docstring(tree) or ""
    assert "target" in doc.lower() and "--quick" in doc, f"{name}.py: say the targets and the short mode"


def test_headline_lines_round_trip() -> None:
    from common import headline, parse_headline

    line = headline("decode batch 1 int4", 4.4213, "transformers", 4)
    assert line == "headline: decode batch 1 int4 = 4.42x transformers (target >= 4x)"
    h = parse_headline(line)
    assert h is not None and (h.what, h.ratio, h.reference, h.target, h.met) == (
        "decode batch 1 int4",
        4.42,
        "transformers",
        4.0,
        True,
    )
    h = parse_headline(headline("train fp32 MFU", 0.5, "fp32 matmul peak", 0.6))
    assert h is not None and h.target == 0.6 and not h.met
    assert parse_headline("best at batch 1: lamina int4, 4.42x transformers") is None


def test_cpu_features_come_from_torch_at_run_time() -> None:
    """What the benchmarks print about the CPU is what torch dispatches to on this machine, not a
    guess: an AVX2-only CPU shows "avx2" and no avx512_bf16."""
    from common import cpu_features, machine

    features = cpu_features()
    assert features[0] == torch.backends.cpu.get_cpu_capability().lower()
    assert ("avx512_bf16" in features) == torch.cpu._is_avx512_bf16_supported()
    assert "cores" in machine(2) and "threads 2" in machine(2)


def _fake(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(f"import sys\n{body}\n")
    return path


def test_run_all_prints_every_headline_and_fails_only_on_a_crash(tmp_path: Path) -> None:
    ok = _fake(tmp_path, "ok", "assert sys.argv[1:] == ['--quick']\n"
               "print('table')\nprint('headline: a = 1.50x ref (target >= 1x)')\n"
               "print('headline: b = 0.50x ref (target >= 4x)')")  # fmt: skip
    run = [sys.executable, str(BENCH / "run_all.py"), "--quick"]
    res = subprocess.run([*run, str(ok)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr  # a missed target is not a failure
    tail = res.stdout.split("=== headlines (1 benchmarks,")[1].splitlines()[1:]
    assert tail == [
        "headline: a = 1.50x ref (target >= 1x)",
        "headline: b = 0.50x ref (target >= 4x)",
        "targets met: 1 of 2; missed: b",
    ]
    crash = _fake(tmp_path, "crash", "print('headline: c = 2.00x ref (target >= 1x)')\nraise SystemExit(3)")
    silent = _fake(tmp_path, "silent", "print('no headline here')")
    res = subprocess.run([*run, str(ok), str(crash), str(silent)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert (
        "FAILED: crash.py (exit status 3" in res.stdout
        and "FAILED: silent.py (printed no headline" in res.stdout
    )
    assert "headline: c = 2.00x ref (target >= 1x)" in res.stdout.split("=== headlines")[1]
    slow = _fake(tmp_path, "slow", "import time\ntime.sleep(30)")
    res = subprocess.run([*run, "--timeout", "1", str(slow)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "FAILED: slow.py (timed out" in res.stdout


def test_train_throughput_runs_without_the_train_extra(
    monkeypatch: pytest.MonkeyPatch, recwarn: pytest.WarningsRecorder
) -> None:
    """With TensorBoard and matplotlib not importable, lamina's timed loop still runs (on a tiny model
    here: the benchmark's own takes seconds per step)."""
    import train_throughput as tt

    import lamina.train.trainer as trainer
    from lamina.config import ModelConfig
    from lamina.model.transformer import Transformer

    # MFU's denominator is measured with 2048^2 matmuls (seconds on 2 cores); not what this test is about
    monkeypatch.setattr(trainer, "matmul_peak_flops", lambda *args, **kwargs: 1e11, raising=False)

    for module in ("tensorboard", "torch.utils.tensorboard", "matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, module, None)  # `import` raises ImportError
    monkeypatch.setattr(tt, "B", 2)
    monkeypatch.setattr(tt, "T", 16)
    monkeypatch.setattr(
        tt,
        "model",
        lambda: Transformer(ModelConfig(n_layers=1, d_model=32, n_heads=2, vocab_size=64, max_seq_len=16)),
    )
    assert tt.lamina_loop(steps=2, warmup=1) > 0 and tt.bare_loop(steps=2, warmup=1) > 0
