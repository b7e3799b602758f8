"""What every benchmark shares: the machine it ran on, and the headline lines a script can read.

Each benchmark ends with one line per target it has (its docstring states the targets):

    headline: <what> = <ratio>x <reference> (target >= <t>x)

for example ``headline: decode batch 1 int4 = 4.42x transformers (target >= 4x)``. A benchmark whose
docs state no target uses 1x its reference. ``benchmarks/run_all.py`` collects these lines;
``parse_headline`` reads one back.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

HEADLINE = re.compile(
    r"^headline: (?P<what>.+?) = (?P<ratio>[0-9.]+|nan|inf)x (?P<reference>.+?) "
    r"\(target >= (?P<target>[0-9.]+)x\)$"
)


@dataclass(frozen=True)
class Headline:
    """One parsed headline line."""

    what: str
    ratio: float
    reference: str
    target: float

    @property
    def met(self) -> bool:
        """Whether the ratio reaches the target."""
        return self.ratio >= self.target


def headline(what: str, ratio: float, reference: str, target: float = 1.0) -> str:
    """Print and return the headline line of one target: ``ratio`` is lamina's figure over the
    reference's (higher is better), ``target`` the ratio the benchmark's docs ask for."""
    line = f"headline: {what} = {ratio:.2f}x {reference} (target >= {target:g}x)"
    print(line, flush=True)
    return line


def parse_headline(line: str) -> Headline | None:
    """The headline in ``line``, or None when it is not one."""
    m = HEADLINE.match(line.strip())
    if m is None:
        return None
    return Headline(m["what"], float(m["ratio"]), m["reference"], float(m["target"]))


def cpu_features() -> list[str]:
    """The CPU features that choose torch's CPU kernels, detected at run time by torch itself (so the
    same on every OS): the vector width torch dispatches to, and whether bf16 / int8 dot products and
    AMX tiles are native. On a CPU without AVX-512 BF16, bf16 matmuls are emulated (slow)."""
    import torch  # here, not at the top: run_all.py reads headlines without loading torch

    cpu = getattr(torch, "cpu", None)

    def has(name: str) -> bool:
        fn = getattr(cpu, name, None)
        try:
            return bool(fn()) if fn is not None else False
        except RuntimeError:
            return False

    found = [torch.backends.cpu.get_cpu_capability().lower()]  # "avx512", "avx2", "default", ...
    for flag, name in (("avx512_bf16", "_is_avx512_bf16_supported"), ("vnni", "_is_vnni_supported"),
                       ("amx", "_is_amx_tile_supported")):  # fmt: skip
        if has(name):
            found.append(flag)
    return found


def machine(threads: int | None = None) -> str:
    """One line: CPU model, the features that matter (``cpu_features``), cores, torch, threads, load."""
    import torch

    name = platform.processor() or platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
        name = next(
            (ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), name
        )
    except OSError:
        pass
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (
        f"{name} ({' '.join(cpu_features())}), {os.cpu_count()} cores, torch {torch.__version__}, "
        f"threads {threads if threads is not None else torch.get_num_threads()}, load average {load}"
    )
