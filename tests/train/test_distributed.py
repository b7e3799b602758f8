"""Data parallel (DDP) and sharded (FSDP2) training on 2 CPU processes (gloo) equal one process; so does
QLoRA under DDP (LoRA under FSDP is refused)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lamina
from lamina.config import ModelConfig, TrainConfig
from lamina.errors import ConfigError
from lamina.model.lora import LoraConfig, apply_lora
from lamina.model.transformer import Transformer
from lamina.train.objectives import causal_lm
from lamina.train.trainer import train

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
    return _losses(out)


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-process runs (plain, uneven, qlora), all in one process: ROOT/<mode>."""
    root = tmp_path_factory.mktemp("one")
    cmd = [sys.executable, str(WORKER), str(root), "references"]
    p = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def single(references: Path) -> tuple[Path, list[float]]:
    return references / "plain", _losses(references / "plain")


@pytest.fixture(scope="module")
def single_uneven(references: Path) -> tuple[Path, list[float]]:
    """The one-process reference of the uneven runs (the same for DDP and FSDP)."""
    return references / "uneven", _losses(references / "uneven")


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
def test_uneven_token_counts_across_processes_match_one_big_batch(
    parallel: str, single_uneven: tuple[Path, list[float]], tmp_path: Path
) -> None:
    """2 processes x 2 micro-batches scoring 18, 6, 30 and 12 tokens: the update equals that of one
    process on the whole global batch (the step's total count is summed over processes)."""
    one_dir, one = single_uneven
    two = _run(tmp_path / "two", parallel, 2, "uneven")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two, strict=True):
        assert abs(a - b) < 1e-6, (one, two)
    ours = lamina.load(tmp_path / "two" / "last").model.state_dict()
    ref = lamina.load(one_dir / "last").model.state_dict()
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


@pytest.mark.slow
def test_qlora_two_processes_match_one(references: Path, tmp_path: Path) -> None:
    """LoRA over a frozen int8 base under DDP: the losses and adapters of 2 processes equal one process's
    (to bf16 rounding: the base computes in bf16), and the checkpoint holds the same fp32 base."""
    one = _losses(references / "qlora")
    two = _run(tmp_path / "two", "ddp", 2, "qlora")
    assert len(one) == len(two) == 5
    for a, b in zip(one, two, strict=True):
        assert abs(a - b) < 2e-3, (one, two)
    ours = load_file(str(tmp_path / "two" / "last" / "adapter" / "adapter_model.safetensors"))
    ref = load_file(str(references / "qlora" / "last" / "adapter" / "adapter_model.safetensors"))
    assert ours.keys() == ref.keys() and any(
        float(v.abs().max()) > 0 for k, v in ref.items() if "lora_B" in k
    )
    for k, v in ref.items():
        torch.testing.assert_close(ours[k], v, atol=2e-3, rtol=0, msg=k)
    base_two = load_file(str(tmp_path / "two" / "last" / "model.safetensors"))
    base_one = load_file(str(references / "qlora" / "last" / "model.safetensors"))
    assert base_two.keys() == base_one.keys() and all(
        torch.equal(base_two[k], v) for k, v in base_one.items()
    )


def test_lora_under_fsdp_is_refused(tmp_path: Path) -> None:
    model = Transformer(ModelConfig.preset("tiny", vocab_size=64, max_seq_len=8))
    apply_lora(model, LoraConfig(r=2))
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=1, parallel="fsdp", progress=False)
    with pytest.raises(ConfigError, match=r"--train\.parallel ddp"):
        train(model, cfg, None, causal_lm(), tokens_per_batch=8)  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())


def test_finetune_refuses_lora_under_fsdp_before_loading(tmp_path: Path) -> None:
    from lamina.train.finetune import FinetuneRun, finetune

    run = FinetuneRun.from_dict({"task": {"task": "sft", "data": str(tmp_path / "absent.jsonl")},
                                 "init": str(tmp_path / "absent-model"), "lora": {"r": 2},
                                 "train": {"parallel": "fsdp", "out_dir": str(tmp_path / "out")}})  # fmt: skip
    with pytest.raises(ConfigError, match=r"--train\.parallel ddp"):  # not the missing model or data
        finetune(run)


def test_keep_freed_memory_on_cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training entry points keep freed memory (``lamina.malloc``'s ``keep_freed``) on CPU only."""
    from lamina import malloc
    from lamina.train.distributed import keep_freed_memory_on_cpu

    asked: list[str] = []
    monkeypatch.setattr(malloc, "set_malloc_policy", lambda policy: asked.append(policy) or True)
    assert keep_freed_memory_on_cpu("cuda:0") is False and asked == []
    assert keep_freed_memory_on_cpu("cpu") is True and asked == ["keep_freed"]
    assert (malloc.M_MMAP_MAX, 0) in malloc.POLICIES["keep_freed"]  # every size from the heap


def test_pretrain_verb_keeps_freed_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """``lamina pretrain`` (a CPU run owns its process) asks for ``keep_freed`` before training."""
    import lamina.cli.pretrain as verb
    from lamina.cli.main import main

    events: list[str] = []
    monkeypatch.setattr(verb, "keep_freed_memory_on_cpu", lambda device: events.append(f"malloc {device}"))
    monkeypatch.setattr(verb, "pretrain", lambda *a, **k: events.append("train") or (None, None, _Done()))
    assert main(["pretrain", "--train.device", "cpu"]) == 0
    assert events == ["malloc cpu", "train"]


class _Done:
    is_main = False
