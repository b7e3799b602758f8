"""MFU's denominator: the peak of the precision in use, from the CPU's features read at run time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lamina.config import ModelConfig, TrainConfig
from lamina.model.transformer import Transformer
from lamina.train import trainer
from lamina.train.metrics import cpu_flops_per_cycle, cpu_peak_flops, peak_flops
from lamina.train.objectives import causal_lm
from lamina.train.precision import cpu_features, native_bf16


def _cpuinfo(
    n: int, flags: str, mhz: str | None = "2000.000", cores_per_cpu: int = 1, name: str = "X"
) -> str:
    """/proc/cpuinfo of ``n`` logical CPUs; ``cores_per_cpu`` 2 makes pairs of them hyperthreads."""
    blocks = []
    for i in range(n):
        lines = [f"processor\t: {i}", f"model name\t: {name}", "physical id\t: 0",
                 f"core id\t\t: {i // (2 if cores_per_cpu == 2 else 1)}", f"flags\t\t: {flags}"]  # fmt: skip
        if mhz is not None:
            lines.append(f"cpu MHz\t\t: {mhz}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def test_flops_per_cycle_follow_the_vector_units() -> None:
    avx2 = {"avx", "avx2", "fma"}
    assert cpu_flops_per_cycle("fp32", avx2) == 32 and cpu_flops_per_cycle("bf16", avx2) == 32
    avx512 = avx2 | {"avx512f", "avx512_bf16"}
    assert cpu_flops_per_cycle("fp32", avx512) == 64 and cpu_flops_per_cycle("bf16", avx512) == 128
    assert cpu_flops_per_cycle("fp16", avx512) == 64  # no AVX512-FP16: fp16 is computed in fp32
    assert cpu_flops_per_cycle("bf16", avx512 | {"amx_bf16"}) == 1024
    assert cpu_flops_per_cycle("fp32", {"sse2"}) == 8


def test_cpu_peak_is_cores_times_clock_times_flops_per_cycle() -> None:
    flags = "fpu sse2 avx avx2 fma avx512f avx512_bf16"
    avx512 = frozenset(flags.split())
    fp32 = cpu_peak_flops("fp32", _cpuinfo(2, flags), threads=8, features=avx512)
    assert fp32 == pytest.approx(2 * 2.0e9 * 64)  # 2 cores (not 8 threads) x 2 GHz x 64
    assert cpu_peak_flops("bf16", _cpuinfo(2, flags), threads=8, features=avx512) == pytest.approx(2 * fp32)
    assert cpu_peak_flops("fp32", _cpuinfo(2, flags), threads=1, features=avx512) == pytest.approx(fp32 / 2)
    # hyperthreads share a core's vector units; without "cpu MHz" the model name's clock is used
    ht = _cpuinfo(2, "avx2 fma", mhz=None, cores_per_cpu=2, name="Intel(R) Xeon(R) CPU @ 2.50GHz")
    assert cpu_peak_flops("fp32", ht, threads=2, features=frozenset({"avx2", "fma"})) == pytest.approx(
        1 * 2.5e9 * 32
    )
    assert cpu_peak_flops("fp32", "processor\t: 0\nFeatures\t: fp asimd\n") is None  # ARM: measured


def test_the_peak_follows_the_probe_that_chooses_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """The vector extensions come from torch's probe (precision.cpu_features, which native_bf16 uses),
    never from /proc/cpuinfo's flags: the MFU peak and autocast's choice cannot disagree."""
    monkeypatch.delenv("LAMINA_NATIVE_BF16", raising=False)
    probes = {"_is_avx2_supported": True, "_is_avx512_supported": True, "_is_avx512_bf16_supported": False}
    probes |= {"_is_amx_tile_supported": False, "_is_amx_fp16_supported": False}
    for name, value in probes.items():
        monkeypatch.setattr(torch.cpu, name, lambda value=value: value)
    text = _cpuinfo(1, "avx2 fma avx512f avx512_bf16 amx_bf16")  # flags the probe does not confirm
    assert not native_bf16("cpu")[0]
    assert cpu_peak_flops("bf16", text, threads=1) == cpu_peak_flops("fp32", text, threads=1) == 2.0e9 * 64
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)  # AMX: AMX-BF16 and AVX512-FP16
    assert native_bf16("cpu")[0] and cpu_features() >= {"amx_bf16", "avx512_fp16"}
    assert cpu_peak_flops("bf16", text, threads=1) == 2.0e9 * 1024
    assert cpu_peak_flops("fp16", text, threads=1) == 2.0e9 * 128


def test_an_avx_only_cpu_gets_the_avx_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch probes AVX2 and up only; /proc/cpuinfo's avx is the floor (it got SSE's 8, halving the peak)."""
    import lamina.train.precision as precision

    for name in ("_is_avx2_supported", "_is_avx512_supported", "_is_avx512_bf16_supported",
                 "_is_amx_tile_supported", "_is_amx_fp16_supported"):  # fmt: skip
        monkeypatch.setattr(torch.cpu, name, lambda: False)
    monkeypatch.setattr(precision, "_proc_flags", lambda: {"sse4_2", "avx"})
    assert cpu_features() == {"avx"} and cpu_flops_per_cycle("fp32", set(cpu_features())) == 16
    monkeypatch.setattr(precision, "_proc_flags", set)
    assert cpu_features() == set()


def test_this_cpu_bf16_peak_is_at_least_the_fp32_peak() -> None:
    assert peak_flops("cpu", "bf16") >= peak_flops("cpu", "fp32") > 0
    with pytest.raises(ValueError, match="precision='int8'"):
        peak_flops("cpu", "int8")


def test_the_trainer_measures_mfu_against_the_precision_in_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[Any] = []

    def fake_peak(device: torch.device, precision: str = "fp32") -> float:
        asked.append((device.type, precision))
        return 1e12

    monkeypatch.setattr(trainer, "peak_flops", fake_peak)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=64, max_seq_len=16))
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=1, precision="bf16", log_every=1, progress=False)

    class Ones:
        def batch(self, index: int) -> dict[str, torch.Tensor]:
            x = torch.ones(2, 17, dtype=torch.long)
            return {"input_ids": x[:, :-1], "targets": x[:, 1:]}

    trainer.train(model, cfg, Ones(), causal_lm(), tokens_per_batch=32)
    assert asked == [("cpu", "bf16")]
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    flops = model.config.flops_per_token(16, training=True) * row["tokens_per_s"]
    assert row["mfu"] == pytest.approx(flops / 1e12)
