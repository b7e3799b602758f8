"""Data parallel (DDP) and sharded (FSDP2) training on 2 CPU processes (gloo) equal one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lamina

WORKER = Path(__file__).with_name("ddp_worker.py")


def _run(out: Path, parallel: str, nproc: int, *mode: str) -> list[float]:
    cmd = [sys.executable, str(WORKER), str(out), parallel, *mode]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            *cmd[1:],
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[float]]:
    out = tmp_path_factory.mktemp("single")
    return out, _run(out, "none", 1)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(parallel: str, single: tuple[Path, list[float]], tmp_path: Path) -> None:
    one_dir, one = single
    two = _run(tmp_path, parallel, 2)
    assert len(one) == len(two) == 5
    for a, b in zip(one, two, strict=True):
        assert abs(a - b) < 1e-5, (one, two)
    # the checkpoint written by the parallel run loads in a single process, with the same weights
    ours = lamina.load(tmp_path / "last").model.state_dict()
    ref = lamina.load(one_dir / "last").model.state_dict()
    for k, v in ref.items():
        torch.testing.assert_close(ours[k], v, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_uneven_token_counts_across_processes_match_one_big_batch(parallel: str, tmp_path: Path) -> None:
    """2 processes x 2 micro-batches scoring 18, 6, 30 and 12 tokens: the update equals that of one
    process on the whole global batch (the step's total count is summed over processes)."""
    one = _run(tmp_path / "one", "none", 1, "uneven")
    two = _run(tmp_path / "two", parallel, 2, "uneven")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two, strict=True):
        assert abs(a - b) < 1e-6, (one, two)
    ours = lamina.load(tmp_path / "two" / "last").model.state_dict()
    ref = lamina.load(tmp_path / "one" / "last").model.state_dict()
    for k, v in ref.items():
        assert float((ours[k] - v).abs().max()) < 1e-6, k


@pytest.mark.slow
def test_a_signal_to_one_process_stops_all_after_the_same_step(tmp_path: Path) -> None:
    """Rank 1 alone gets SIGINT during step 3: both ranks finish step 3 (the stop request rides on the
    step's all-reduce), rank 0 writes step 3's checkpoint, and both exit instead of hanging."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(WORKER), str(tmp_path), "ddp", "interrupt"]  # fmt: skip
    p = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert p.returncode != 0
    assert "interrupted by a signal to another process after step 3 of 50" in p.stderr, p.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert sorted(e.name for e in (tmp_path / "checkpoints").iterdir()) == ["step-00000003"]
    assert (tmp_path / "checkpoints" / "step-00000003" / "train_state" / "state.pt").is_file()
