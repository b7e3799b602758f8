"""Watching training: the machine's peak FLOP/s in the precision in use (for MFU), JSONL/TensorBoard
metrics and a PNG of the curves."""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from lamina.train.precision import cpu_features

_PEAK_CACHE: dict[tuple[str, torch.dtype], float] = {}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def peak_flops(device: torch.device | str = "cpu", precision: str = "fp32") -> float:
    """The peak FLOP/s of one process's ``device`` for matmuls in ``precision`` (fp32, bf16, fp16): the
    denominator of MFU (model-FLOPs utilisation), so MFU stays at most 100% whatever the precision.

    - CPU (Linux): the datasheet formula ``cores x clock x FLOPs per cycle per core``
      (:func:`cpu_peak_flops`), with the CPU's vector extensions probed at run time
      (``lamina.train.precision.cpu_features``, the probe bf16 autocast is chosen by).
      bf16 autocast on a CPU with AVX512_BF16 or AMX has a higher peak than fp32; on one without them
      bf16 matmuls run on the fp32 units, at the fp32 peak.
    - CUDA, MPS, or a CPU without /proc/cpuinfo: the measured rate of a large matmul in the precision's
      dtype (:func:`matmul_peak_flops`; fp32 as ``torch.backends.cuda.matmul.allow_tf32`` says).
    """
    dev = torch.device(device)
    if precision not in _DTYPES:
        raise ValueError(f"precision={precision!r} is not one of {', '.join(_DTYPES)}")
    if dev.type == "cpu":
        estimate = cpu_peak_flops(precision)
        if estimate is not None:
            return estimate
    return matmul_peak_flops(dev, _DTYPES[precision], n=8192 if dev.type == "cuda" else 2048)


def cpu_flops_per_cycle(precision: str, flags: set[str]) -> int:
    """Peak FLOPs per cycle of one x86 core for ``precision``, from its vector extensions ``flags``
    (named as /proc/cpuinfo names them; ``lamina.train.precision.cpu_features()`` for this CPU).

    An FMA is 2 FLOPs; the figures assume two vector FMA pipes per core (Intel's optimization manual for
    Skylake-SP and later; AMD Zen 2-4 have two 256-bit FMA pipes, so on Zen 4 AVX-512 and AVX512_BF16
    reach half the figure and MFU reads low, never high):

    - fp32: AVX-512 (``avx512f``) 2 x 16 lanes x 2 = 64; AVX2 + FMA 2 x 8 x 2 = 32; AVX 16; SSE 8.
    - bf16: AMX (``amx_bf16``, TDPBF16PS: 16x16x32 multiply-adds every 16 cycles) 1024; AVX512_BF16
      (``avx512_bf16``, VDPBF16PS: two products per fp32 lane) 2 x the AVX-512 fp32 figure = 128;
      otherwise the fp32 figure (bf16 is converted and computed in fp32).
    - fp16: AMX-FP16 (``amx_fp16``) 1024; AVX512-FP16 (``avx512_fp16``, 32 lanes) 128; else fp32's.
    """
    if "avx512f" in flags:
        fp32 = 64
    elif {"avx2", "fma"} <= flags:
        fp32 = 32
    elif "avx" in flags:
        fp32 = 16
    else:
        fp32 = 8
    if precision == "bf16":
        return 1024 if "amx_bf16" in flags else 128 if "avx512_bf16" in flags else fp32
    if precision == "fp16":
        return 1024 if "amx_fp16" in flags else 128 if "avx512_fp16" in flags else fp32
    return fp32


def cpu_peak_flops(
    precision: str = "fp32",
    cpuinfo: str | None = None,
    threads: int | None = None,
    features: frozenset[str] | None = None,
) -> float | None:
    """``cores x GHz x 1e9 x cpu_flops_per_cycle(precision, features)`` for this process, or None when
    the CPU cannot be read (no /proc/cpuinfo, or not x86).

    features: the vector extensions, by default ``cpu_features()`` (torch's probe, which also decides
    bf16 autocast: one detection, so the MFU peak and the precision chosen never disagree).

    cores: the physical cores (distinct ``physical id``/``core id``) among the CPUs this process may
    run on, at most ``threads`` (default ``torch.get_num_threads()``). clock: the highest of
    /sys/devices/system/cpu/cpu*/cpufreq/cpuinfo_max_freq (the turbo clock), else of the ``cpu MHz``
    lines, else the ``@ 2.40GHz`` of the model name. ``cpuinfo`` (the text of /proc/cpuinfo, read for the
    cores and clock only) and ``features`` are for tests.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    blocks = [dict(_fields(b)) for b in cpuinfo.split("\n\n") if b.strip()]
    blocks = [b for b in blocks if "processor" in b]
    if not blocks or "flags" not in blocks[0]:
        return None  # not x86 (ARM lists "Features"): measure instead
    if features is None:
        features = cpu_features()
    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        allowed = None
    mine = [b for b in blocks if allowed is None or int(b["processor"]) in allowed] or blocks
    cores = len({(b.get("physical id"), b.get("core id", b["processor"])) for b in mine})
    cores = max(1, min(cores, threads or torch.get_num_threads()))
    ghz = _max_ghz(mine)
    if ghz is None:
        return None
    return cores * ghz * 1e9 * cpu_flops_per_cycle(precision, set(features))


def _fields(block: str) -> list[tuple[str, str]]:
    return [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in block.splitlines())]


def _max_ghz(blocks: list[dict[str, str]]) -> float | None:
    khz = []
    for b in blocks:
        try:
            f = Path(f"/sys/devices/system/cpu/cpu{b['processor']}/cpufreq/cpuinfo_max_freq")
            khz.append(int(f.read_text()))
        except (OSError, ValueError):
            pass
    if khz:
        return max(khz) / 1e6
    mhz = [float(b["cpu MHz"]) for b in blocks if "cpu MHz" in b]
    if mhz:
        return max(mhz) / 1e3
    m = re.search(r"@\s*([\d.]+)\s*GHz", blocks[0].get("model name", ""))
    return float(m.group(1)) if m else None


def matmul_peak_flops(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048
) -> float:
    """Measured FLOP/s of an n x n matmul in ``dtype`` on this device (median of a few, after warm-up);
    cached per device and dtype. ``peak_flops`` uses it where no datasheet figure can be computed."""
    dev = torch.device(device)
    key = (str(dev), dtype)
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    g = torch.Generator(dev).manual_seed(0)  # its own generator: measuring must not move training's RNG
    a = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
    times = []
    for i in range(6):
        _synchronize(dev)
        t = time.perf_counter()
        a @ b
        _synchronize(dev)
        if i >= 2:
            times.append(time.perf_counter() - t)
    peak = 2 * n**3 / sorted(times)[len(times) // 2]
    _PEAK_CACHE[key] = peak
    return peak


def _synchronize(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps":
        torch.mps.synchronize()


class MetricsLog:
    """Appends metrics to ``metrics.jsonl`` and, when ``tensorboard`` is installed, to TensorBoard events."""

    def __init__(self, out_dir: Path, enabled: bool = True, resume_step: int | None = None) -> None:
        self.path = out_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb: Any = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():  # drop what the interrupted run logged past it
            keep = [r for r in self.read(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:
            warnings.warn(
                "tensorboard is not installed, so no TensorBoard events are written: pip install 'lamina[train]'",
                stacklevel=2,
            )

    def log(self, step: int, **values: float) -> None:
        """Record ``values`` at ``step``."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        """Flush TensorBoard."""
        if self.tb is not None:
            self.tb.close()

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        """The records of a metrics.jsonl file."""
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: Path, out_png: Path) -> Path | None:
    """A PNG of train/validation loss and learning rate against step; None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn(
            "matplotlib is not installed, so no loss plot is drawn: pip install 'lamina[train]'", stacklevel=2
        )
        return None
    rows = MetricsLog.read(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    lr = [(r["step"], r["lr"]) for r in rows if "lr" in r]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1])
    if train:
        ax1.plot(*zip(*train, strict=True), label="train loss", lw=1)
    if val:
        ax1.plot(*zip(*val, strict=True), "o-", label="validation loss", lw=1.5)
    ax1.set_ylabel("loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    if lr:
        ax2.plot(*zip(*lr, strict=True), color="tab:green", lw=1)
    ax2.set_ylabel("learning rate")
    ax2.set_xlabel("step")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
