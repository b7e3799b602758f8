"""Helpers for the interrupt tests of pretrain and finetune (imported by them; not a test module)."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch


def losses(out: Path) -> list[tuple[int, float]]:
    """(step, loss) of every training record in OUT/metrics.jsonl."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _signal_after(proc: subprocess.Popen[str], out: Path, sig: int, steps: int, timeout: float = 120) -> None:
    """Send ``sig`` once metrics.jsonl shows ``steps`` training steps (a step marker, not a sleep)."""
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len(losses(out)) >= steps:
            proc.send_signal(sig)
            return
        time.sleep(0.002)
    raise AssertionError(f"the run ended before {steps} steps: {proc.communicate()[1][-2000:]}")


def interrupt_and_resume(cmd: list[str], out: Path, sig: int, env: dict[str, str]) -> str:
    """Run ``cmd``, send ``sig`` after a few steps, check the checkpoint of the step it stopped at and
    the printed ``--resume`` command, then run that command to the end; returns the interrupted run's
    stderr."""
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _signal_after(p, out, sig, 3)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 128 + sig, err[-3000:]  # 130 for SIGINT, 143 for SIGTERM
    stopped = losses(out)[-1][0]
    assert stopped < 40, "the signal should stop the run long before its end"
    saved = sorted(e.name for e in (out / "checkpoints").iterdir())
    assert saved == [f"step-{stopped:08d}"], saved  # save_every is beyond the end: this is the interrupt's
    assert (out / "checkpoints" / saved[0] / "train_state" / "state.pt").is_file()
    name = signal.Signals(sig).name
    line = next(x for x in err.splitlines() if x.startswith("lamina: interrupted"))
    assert f"by {name} after step {stopped} of " in line, err[-3000:]
    command = line.split("continue with: ", 1)[1]
    argv = shlex.split(command)
    assert argv[0] == "lamina" and argv[-1] == "--resume" and argv[1:-1] == cmd[3:], command
    subprocess.run([sys.executable, "-m", "lamina", *argv[1:]], env=env, check=True, capture_output=True,
                   timeout=300)  # fmt: skip
    return err


def assert_same_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
