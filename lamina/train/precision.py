"""The training precision ``auto`` resolves to: bf16 autocast where the hardware computes bf16 natively,
fp32 elsewhere.

bf16 halves the bytes every matmul reads and, on hardware with bf16 dot products, doubles (AVX-512 BF16)
or multiplies by ~16 (AMX, tensor cores) the matmul peak; without them torch converts bf16 to fp32 and
computes there, so bf16 autocast is slower than plain fp32 and ``auto`` keeps fp32. Detected at run time:

- CPU: torch's own CPU-feature probe (``torch.cpu._is_avx512_bf16_supported``, AVX512_BF16's
  VDPBF16PS; ``torch.cpu._is_amx_tile_supported``, AMX, whose CPUs all have AMX-BF16), the same on
  every OS.
- CUDA: ``torch.cuda.is_bf16_supported(including_emulation=False)`` (compute capability 8.0, Ampere, or
  newer).
- Anything else (MPS, ...): fp32.
- ``LAMINA_NATIVE_BF16=0`` (or ``1``) in the environment overrides the probe: the test suite sets 0, so
  its training numbers are the same on every CPU.

The trainer resolves ``auto`` once, at the start of a run (``run_precision``: under torchrun bf16 only
if every process has it), prints the choice with its reason and records the resolved value in run.yaml
and in every checkpoint's train state; ``--resume`` uses that recorded value, so a run resumed on other
hardware keeps its numerics. While it trains, ``run_autocast()`` is that precision's autocast, for what
an objective's data computes outside the trainer's own autocast (GRPO's old and reference log-probs,
DPO's precomputed reference log-probs), so they match the policy's log-probs at step 1.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from typing import Any

import torch

from lamina.train import distributed as D


def native_bf16(device: torch.device | str = "cpu") -> tuple[bool, str]:
    """Whether ``device`` computes bf16 matmuls natively, and the evidence in a few words
    (e.g. ``"the CPU has AVX512_BF16"``)."""
    forced = os.environ.get("LAMINA_NATIVE_BF16")
    if forced in ("0", "1"):
        return forced == "1", f"LAMINA_NATIVE_BF16={forced}"
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{name} has bf16 tensor cores"
        return False, f"{name} has no native bf16 (compute capability below 8.0)"
    if dev.type != "cpu":
        return False, f"bf16 autocast is not chosen automatically on {dev.type}"
    features = cpu_features()
    found = [name for name, flag in (("AMX", "amx_bf16"), ("AVX512_BF16", "avx512_bf16")) if flag in features]
    if found:
        return True, f"the CPU has {' and '.join(found)}"
    return False, "the CPU has neither AVX512_BF16 nor AMX (bf16 would be converted to fp32 and run slower)"


def cpu_features() -> frozenset[str]:
    """This CPU's vector extensions that decide matmul speed, by torch's own CPU-feature probe (the
    cpuinfo library's, the same on every OS), named as Linux's /proc/cpuinfo ``flags`` name them:
    ``avx2`` and ``fma``, ``avx512f``, ``avx512_bf16``, ``amx_bf16`` and ``avx512_fp16`` (every CPU with
    AMX tiles, Sapphire Rapids on, also has both), ``amx_fp16``; ``avx`` with AVX2, or where
    /proc/cpuinfo lists it (torch has no probe for AVX alone: Sandy/Ivy Bridge would get the SSE peak).
    Empty on CPUs that are not x86. The one detection lamina uses: ``native_bf16`` (autocast) and the MFU
    peak (``lamina.train.metrics``)."""
    cpu = getattr(torch, "cpu", None)
    found: set[str] = set()
    for probe, flags in (
        ("_is_avx2_supported", ("avx2", "fma")),  # every AVX2 CPU (Haswell, Zen on) has FMA3
        ("_is_avx512_supported", ("avx512f",)),
        ("_is_avx512_bf16_supported", ("avx512_bf16",)),
        ("_is_amx_tile_supported", ("amx_bf16", "avx512_fp16")),
        ("_is_amx_fp16_supported", ("amx_fp16",)),
    ):
        if _probe(cpu, probe):
            found.update(flags)
    if "avx2" in found or "avx" in _proc_flags():  # AVX alone decides only the fp32 peak, not autocast
        found.add("avx")
    return frozenset(found)


def _proc_flags() -> set[str]:
    """The first CPU's ``flags`` in /proc/cpuinfo (Linux x86); empty where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> tuple[str, str]:
    """``precision`` (a ``TrainConfig.precision``) as the one the run computes in, with the reason:
    ``auto`` becomes ``bf16`` where ``native_bf16(device)``, else ``fp32``; fp32 / bf16 / fp16 stay.

    Returns ``(precision, reason)``, e.g. ``("bf16", "auto: the CPU has AVX512_BF16")``."""
    if precision != "auto":
        return precision, "set in the config"
    native, why = native_bf16(device)
    return ("bf16" if native else "fp32"), f"auto: {why}"


def run_precision(
    precision: str, info: D.DistInfo, start_state: dict[str, Any] | None = None
) -> tuple[str, str]:
    """The precision a run computes in and why, decided once when it starts (the trainer's, and so GRPO's
    and DPO's reference log-probs'): ``resolve_precision`` on ``info.device``, except that a resumed run
    (``start_state``: its checkpoint's train state) keeps the value the checkpoint recorded (the same
    numerics on other hardware; a checkpoint from before ``auto`` existed trained in fp32, the default
    then), and under torchrun ``auto`` picks bf16 only if every process has it (a collective: every
    process calls it). Returns ``(precision, reason)``."""
    if precision == "auto" and start_state is not None:
        if "precision" not in start_state:  # saved before auto existed, when the default was fp32
            return "fp32", "auto: the checkpoint predates precision=auto (fp32 was the default then)"
        return str(start_state["precision"]), "auto: as the run recorded when it started"
    resolved, why = resolve_precision(precision, info.device)
    if precision == "auto" and info.world_size > 1:
        votes = D.sum_across(torch.tensor(float(resolved == "bf16"), device=info.device), info)
        if int(votes.item()) < info.world_size:
            resolved, why = "fp32", "auto: not every process has native bf16"
    return resolved, why


def _probe(module: object, name: str) -> bool:
    fn = getattr(module, name, None)
    try:
        return bool(fn()) if fn is not None else False
    except RuntimeError:
        return False


def autocast_for(
    precision: str, device: torch.device | str = "cpu"
) -> contextlib.AbstractContextManager[Any]:
    """The autocast context of a resolved ``precision`` (fp32: none; bf16 / fp16: ``torch.autocast``)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


# the (precision, device) of the run the trainer is training; None outside ``lamina.train.trainer.train``
_RUN: contextvars.ContextVar[tuple[str, torch.device] | None] = contextvars.ContextVar(
    "lamina_run_precision", default=None
)


@contextlib.contextmanager
def running_in(precision: str, device: torch.device) -> Iterator[None]:
    """Within it, ``run_autocast()`` is ``precision``'s autocast on ``device`` (the trainer's, over a run)."""
    token = _RUN.set((precision, torch.device(device)))
    try:
        yield
    finally:
        _RUN.reset(token)


def run_device() -> torch.device | None:
    """The device of the run being trained (``running_in``), None outside a run."""
    run = _RUN.get()
    return None if run is None else run[1]


def run_autocast() -> contextlib.AbstractContextManager[Any]:
    """The autocast of the run being trained (its ``run_precision``, as the trainer computes the
    objective in), for log-probs an objective's data computes outside the trainer's autocast (GRPO's old
    and reference log-probs, DPO's precomputed ones); no autocast outside a run."""
    run = _RUN.get()
    return contextlib.nullcontext() if run is None else autocast_for(*run)
