"""precision=auto: bf16 autocast where the hardware has native bf16, fp32 elsewhere; resolved once per run,
printed, recorded in run.yaml and the checkpoint, and kept on resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lamina.config import ModelConfig, TrainConfig
from lamina.model.transformer import Transformer
from lamina.train import precision as P
from lamina.train.objectives import causal_lm
from lamina.train.trainer import STATE_DIR, STATE_FILE, latest_checkpoint, train


def _cpu(monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool = False) -> None:
    monkeypatch.delenv("LAMINA_NATIVE_BF16", raising=False)  # conftest's pin: the probe itself here
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected", "evidence"),
    [
        (True, False, "bf16", "AVX512_BF16"),
        (False, True, "bf16", "AMX"),
        (False, False, "fp32", "neither AVX512_BF16 nor AMX"),
    ],
)
def test_auto_follows_the_cpu(
    monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool, expected: str, evidence: str
) -> None:
    _cpu(monkeypatch, avx512_bf16, amx)
    precision, why = P.resolve_precision("auto", "cpu")
    assert precision == expected and why.startswith("auto: ") and evidence in why


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_the_gpu(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.delenv("LAMINA_NATIVE_BF16", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native)
    assert P.resolve_precision("auto", "cuda")[0] == ("bf16" if native else "fp32")


@pytest.mark.parametrize("forced", ["0", "1"])
def test_the_environment_overrides_the_probe(monkeypatch: pytest.MonkeyPatch, forced: str) -> None:
    _cpu(monkeypatch, avx512_bf16=forced == "0")  # the probe says the opposite
    monkeypatch.setenv("LAMINA_NATIVE_BF16", forced)
    assert P.resolve_precision("auto") == (
        "bf16" if forced == "1" else "fp32",
        f"auto: LAMINA_NATIVE_BF16={forced}",
    )


def test_a_set_precision_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    _cpu(monkeypatch, avx512_bf16=True)
    assert [P.resolve_precision(p)[0] for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    assert P.resolve_precision("auto", "mps")[0] == "fp32"  # never chosen automatically off CPU/CUDA


class _Tokens:
    def batch(self, index: int) -> dict[str, torch.Tensor]:
        x = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(index))
        return {"input_ids": x[:, :-1], "targets": x[:, 1:]}


def _train(out: Path, steps: int, resume: bool = False) -> Any:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", n_layers=1, d_model=32, vocab_size=32, max_seq_len=8))
    cfg = TrainConfig(out_dir=str(out), max_steps=steps, warmup_steps=0, save_every=1, progress=False)
    assert cfg.precision == "auto"  # the default
    run = {"train": {"precision": cfg.precision}}
    return train(model, cfg, _Tokens(), causal_lm(), tokens_per_batch=16, run_config=run, resume=resume)


def test_the_trainer_says_records_and_resumes_its_choice(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _cpu(monkeypatch, avx512_bf16=True)
    _train(tmp_path, steps=1)
    assert "lamina: training in bf16 (auto: the CPU has AVX512_BF16)" in capsys.readouterr().err
    for run_yaml in (tmp_path / "run.yaml", tmp_path / "last" / "run.yaml"):
        assert yaml.safe_load(run_yaml.read_text())["train"]["precision"] == "bf16"
    state = torch.load(tmp_path / "last" / STATE_DIR / STATE_FILE, weights_only=True)
    assert state["precision"] == "bf16"
    _cpu(monkeypatch, avx512_bf16=False)  # resumed on a CPU without bf16: the recorded value wins
    _train(tmp_path, steps=2, resume=True)
    assert "training in bf16 (auto: as the run recorded when it started)" in capsys.readouterr().err
    state = torch.load(tmp_path / "last" / STATE_DIR / STATE_FILE, weights_only=True)
    assert state["precision"] == "bf16"
    _cpu(monkeypatch, avx512_bf16=True)  # a checkpoint from before auto (no recorded value) trained in fp32
    newest = latest_checkpoint(tmp_path)
    assert newest is not None
    state = torch.load(newest / STATE_DIR / STATE_FILE, weights_only=True)
    del state["precision"]
    torch.save(state, newest / STATE_DIR / STATE_FILE)
    _train(tmp_path, steps=3, resume=True)
    assert "training in fp32 (auto: the checkpoint predates" in capsys.readouterr().err


def test_auto_trains_under_bf16_autocast_where_native(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """auto's bf16 is bf16 autocast in the loop (the objective sees bf16 logits) and in ``run_autocast``
    (what a batch source computes, e.g. GRPO's reference log-probs); neither outside the run."""
    _cpu(monkeypatch, avx512_bf16=True)
    seen: dict[str, list[Any]] = {"loss": [], "batch": []}
    inner = causal_lm()

    class Source(_Tokens):
        def batch(self, index: int) -> dict[str, torch.Tensor]:
            with P.run_autocast():
                seen["batch"].append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
            return super().batch(index)

    def objective(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        seen["loss"].append(model(batch["input_ids"]).dtype)
        return inner(model, batch)

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", n_layers=1, d_model=32, vocab_size=32, max_seq_len=8))
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=1, warmup_steps=0, progress=False)
    train(model, cfg, Source(), objective, tokens_per_batch=16)
    assert seen == {"loss": [torch.bfloat16], "batch": [torch.bfloat16]}
    with P.run_autocast():
        assert not torch.is_autocast_enabled("cpu")  # outside a run: none
