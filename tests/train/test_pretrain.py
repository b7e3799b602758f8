"""`lamina pretrain` end to end: flags over YAML, clear errors before training, exact resume after SIGKILL
(mid-step and mid-checkpoint-write) and Ctrl-C. The demo learning: tests/train/test_demo.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from interrupting import assert_same_weights, interrupt_and_resume  # tests/train/interrupting.py

from lamina.cli.main import main
from lamina.errors import ConfigError
from lamina.train.pretrain import RunConfig
from lamina.train.trainer import resume_command

LINES = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    for k in range(8):
        (d / f"part{k}.py").write_text("".join(LINES[k * 50 : (k + 1) * 50]))
    return d


def _flags(corpus: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "pretrain", "--data.sources", f"[{corpus}]", "--data.train_tokenizer", "300", "--data.out", str(data),
        "--data.val_fraction", "0.25", "--model.preset", "tiny", "--model.max_seq_len", "64",
        "--train.out_dir", str(out), "--train.batch_size", "4", "--train.seq_len", "32", "--train.max_steps", "12",
        "--train.save_every", "2", "--train.log_every", "1", "--train.eval_every", "6", "--train.progress", "false",
        "--train.warmup_steps", "2", *extra,
    ]  # fmt: skip


def _losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_flags_yaml_and_run_yaml(corpus: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: {preset: tiny, n_layers: 3}\ntrain: {lr: 1e-3}\n")
    argv = [*_flags(corpus, tmp_path / "data", tmp_path / "out"), "--config", str(cfg), "--train.lr", "2e-3"]
    assert main(argv) == 0
    run = json.loads(json.dumps(__import__("yaml").safe_load((tmp_path / "out" / "run.yaml").read_text())))
    assert run["model"]["n_layers"] == 3 and run["train"]["lr"] == 2e-3 and run["train"]["max_steps"] == 12
    assert run["model"]["vocab_size"] == 320  # the 300-token tokenizer, rounded up to a multiple of 64
    assert (tmp_path / "out" / "last" / "tokenizer.json").is_file()
    assert main(["generate", str(tmp_path / "out" / "last"), "def f", "--max-new-tokens", "4"]) == 0
    # --init continues from the trained model: its first loss is the trained one's, not a fresh model's
    again = [*_flags(corpus, tmp_path / "data", tmp_path / "out2"), "--init", str(tmp_path / "out" / "last")]
    assert main([*again, "--train.max_steps", "2", "--train.lr", "1e-6"]) == 0
    first, trained_last = _losses(tmp_path / "out2")[0][1], _losses(tmp_path / "out")[-1][1]
    assert first < _losses(tmp_path / "out")[0][1] - 1.0 and abs(first - trained_last) < 0.5


def test_a_folder_that_holds_a_run_needs_resume_or_overwrite(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = [*_flags(corpus, tmp_path / "data", out), "--train.max_steps", "2"]
    assert main(argv) == 0
    before = (out / "metrics.jsonl").read_text()
    summary = capsys.readouterr().out
    assert re.search(
        rf"trained 2 steps in \d+\.\d s, final loss \d\.\d{{4}}, .*; checkpoints in {out}$", summary
    )
    assert main(argv) == 1  # refused before anything is prepared or written
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "--resume" in err and "--overwrite" in err, err
    assert (out / "metrics.jsonl").read_text() == before  # nothing appended
    (out / "notes.txt").write_text("mine")
    assert main([*argv, "--overwrite", "--train.max_steps", "3"]) == 0
    assert [s for s, _ in _losses(out)] == [1, 2, 3]  # the old run's records are gone, not appended to
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own outputs are replaced
    assert main([*argv, "--overwrite", "--resume"]) == 1
    assert "pick one" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--train.weight_decy", "1"], "did you mean --train.weight_decay?"),
        (["--modle.n_layers", "2"], "did you mean --model."),
        (["--train.batch_size", "512"], "lower train.batch_size"),
        (["--train.seq_len", "128"], "lower train.seq_len or raise model.max_seq_len"),
        (["--model.vocab_size", "100"], "set model.vocab_size >= 3"),
    ],
)
def test_bad_runs_fail_before_training(
    corpus: Path, tmp_path: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main([*_flags(corpus, tmp_path / "data", tmp_path / "out"), *extra])
    except SystemExit as e:  # a flag argparse does not know: usage error, exit 2
        code = int(e.code or 0)
    assert code in (1, 2)
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_empty_corpus_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "empty.txt").write_text("  \n")
    assert main(_flags(tmp_path / "c", tmp_path / "data", tmp_path / "out")) == 1
    assert "empty" in capsys.readouterr().err.lower()


def test_a_data_folder_without_data_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--data.out naming no prepared data, with nothing to prepare, says so (it was told to set a tokenizer)."""
    assert main(["pretrain", "--data.out", str(tmp_path / "nodata"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "holds no prepared data" in err and "nodata" in err and len(err.strip().splitlines()) == 1, err


def test_unknown_section_in_run_config() -> None:
    with pytest.raises(ConfigError, match="unknown run config section"):
        RunConfig.from_dict({"optim": {}})


def _kill_when(proc: subprocess.Popen[bytes], ready: object, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if ready():  # type: ignore[operator]
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.0005)
    raise AssertionError("the run finished before it could be killed")


@pytest.mark.slow
def test_sigkill_mid_step_and_mid_checkpoint_then_resume_is_exact(corpus: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    # a wide vocabulary makes checkpoints big enough (tens of MB) to be caught while being written
    extra = ["--model.vocab_size", "32768", "--train.dropout", "0.1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in every run: the same float sums
    ref_cmd = [sys.executable, "-m", "lamina", *_flags(corpus, data, tmp_path / "ref", *extra)]
    subprocess.run(ref_cmd, env=env, check=True, capture_output=True, timeout=300)
    ref = _losses(tmp_path / "ref")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lamina", *_flags(corpus, data, out, *extra)]
    ckpts = out / "checkpoints"

    # 1. killed mid-step: after step 5 was logged, before step 6's checkpoint
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(p, lambda: (out / "metrics.jsonl").exists() and len(_losses(out)) >= 5)
    # 2. resumed, then killed while a checkpoint is being written (its temp folder exists)
    p = subprocess.Popen([*cmd, "--resume"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(p, lambda: ckpts.is_dir() and any(e.name.startswith(".step-") for e in os.scandir(ckpts)))
    # 3. resumed to the end
    subprocess.run([*cmd, "--resume"], env=env, check=True, capture_output=True, timeout=300)
    got = _losses(out)
    assert [s for s, _ in got] == list(range(1, 13))
    for (s1, a), (s2, b) in zip(ref, got, strict=True):
        assert s1 == s2 and a == b, (ref, got)


@pytest.mark.slow
def test_ctrl_c_saves_the_current_step_and_resume_is_exact(corpus: Path, tmp_path: Path) -> None:
    """SIGINT mid-run: the step it stopped at is saved (no periodic checkpoint is due), the exit code is
    130, stderr says the exact --resume command, and that command ends with the uninterrupted weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in every run: the same float sums
    data = tmp_path / "data"
    extra = ["--train.max_steps", "60", "--train.save_every", "1000", "--train.eval_every", "20",
             "--train.dropout", "0.1"]  # fmt: skip
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-m", "lamina", *_flags(corpus, data, ref, *extra)], env=env, check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    out = tmp_path / "run"
    interrupt_and_resume([sys.executable, "-m", "lamina", *_flags(corpus, data, out, *extra)], out,
                         signal.SIGINT, env)  # fmt: skip
    assert _losses(out) == _losses(ref)
    assert_same_weights(out / "last", ref / "last")


def test_resume_command_is_this_command_line_with_resume() -> None:
    assert resume_command(["/usr/bin/lamina", "pretrain", "--out", "a b", "--overwrite"]) == (
        "lamina pretrain --out 'a b' --resume"
    )
    assert resume_command(["/x/lamina/__main__.py", "--debug", "finetune", "--resume"]) == (
        "lamina --debug finetune --resume"
    )
    assert "resume=True" in resume_command(["/usr/bin/pytest", "tests"])
