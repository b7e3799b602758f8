"""Watching training: the machine's matmul peak (for MFU), JSONL/TensorBoard metrics and a PNG of the curves."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

_PEAK_CACHE: dict[tuple[str, torch.dtype], float] = {}


def matmul_peak_flops(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048
) -> float:
    """Measured FLOP/s of an n x n matmul on this device (median of a few, after warm-up); cached.

    MFU (model-FLOPs utilisation) is reported against this measured rate, not a datasheet figure.
    """
    dev = torch.device(device)
    key = (str(dev), dtype)
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    g = torch.Generator(dev).manual_seed(0)  # its own generator: measuring must not move training's RNG
    a = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
    times = []
    for i in range(6):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t)
    peak = 2 * n**3 / sorted(times)[len(times) // 2]
    _PEAK_CACHE[key] = peak
    return peak


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
