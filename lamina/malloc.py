"""glibc malloc policies for the processes lamina's entry points own (mallopt(3), malloc_trim(3)).

A policy changes the allocator of the whole process for the rest of its life, so only entry points that
own their process set one: ``lamina pretrain``, ``lamina finetune`` and ``lamina diffusion train`` on CPU
(``keep_freed``), ``lamina serve`` (``release``) and the benchmarks that measure them. Library calls (``train_diffusion``, ``DiffusionObjective``,
``lamina.serve.serve``, ``BackgroundServer``) never do; in a script of your own call ``set_malloc_policy``.

- ``keep_freed`` (CPU training): a training step allocates its activations (~100 MB for the diffusion
  benchmark's UNet at batch 64) and frees them all after the backward pass; by default glibc returns the
  top of its heap to the system and the next step page-faults it back in (~5,500 faults, 5% of a step's
  CPU time measured on that model). Freed memory up to 1 GiB stays with the process (``M_TRIM_THRESHOLD``)
  and blocks of every size come from the heap (``M_MMAP_MAX`` 0: none is mapped apart, so a language
  model's logits, 206 MB in bf16 for the train_throughput GPT, are not mapped and page-faulted in again at
  every step: its bf16 autocast steps ran 1.32x faster, 2,048 -> 2,710 tokens/s): the process's resident
  size stays at its peak.
- ``release`` (serving): by default glibc makes one heap per thread and, once a large block was freed,
  keeps blocks up to 32 MiB in its heaps; a server whose batches change size keeps memory it no longer
  uses. At most 2 heaps (``M_ARENA_MAX``); blocks from 4 MiB (a long prompt's activations, a large batch's
  KV cache) are mapped apart and go back to the system when freed, while a 16-row batch's logits (3 MiB
  for a 49k vocabulary) and short requests' KV layers stay in the heap, so a decoding step does not
  page-fault them in again (a 256 KiB threshold would map, free and re-fault them every step); free
  memory above 8 MiB at the heap's top is returned; what is free now is returned on applying
  (``malloc_trim(0)``: apply it after loading) and by ``trim()``.

Nothing is set off Linux/glibc, when the environment chooses malloc itself (a ``MALLOC_*`` variable,
``GLIBC_TUNABLES`` or ``LD_PRELOAD``: the user's choice wins), or with ``LAMINA_MALLOC=off``.
One policy per process: the first one applied stays, since glibc cannot report the values it replaced
(no way back); asking for a different one later changes nothing, says so on stderr and returns False.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Mapping
from typing import Any, Literal

from lamina.errors import ConfigError

MallocPolicy = Literal["keep_freed", "release"]

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -3, -4, -8
POLICIES: dict[str, tuple[tuple[int, int], ...]] = {
    "keep_freed": ((M_MMAP_THRESHOLD, 32 << 20), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 1 << 30)),
    "release": ((M_ARENA_MAX, 2), (M_MMAP_THRESHOLD, 4 << 20), (M_TRIM_THRESHOLD, 8 << 20)),
}
TRIMS = ("release",)  # policies that return free memory on applying and in trim()

_active: str | None = None  # the policy set in this process (None: none applied)
_complete = False  # every value of _active was accepted by mallopt


def skip_reason(environ: Mapping[str, str] = os.environ) -> str | None:
    """Why lamina leaves malloc alone in an environment (None: it may set a policy)."""
    if environ.get("LAMINA_MALLOC", "").lower() == "off":
        return "LAMINA_MALLOC=off"
    chosen = sorted(k for k in environ if k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD"))
    return f"{chosen[0]} is set (the environment chooses malloc)" if chosen else None


@functools.cache
def _glibc() -> Any:
    """This process's C library when it is glibc (with mallopt and malloc_trim), else None (looked up once:
    ``platform.libc_ver`` reads the interpreter's binary, and ``trim`` runs on the engine's steps)."""
    if not sys.platform.startswith("linux"):
        return None
    import platform

    if platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def active_policy() -> str | None:
    """The malloc policy set in this process by ``set_malloc_policy`` (None: none)."""
    return _active


def set_malloc_policy(policy: MallocPolicy) -> bool:
    """Set glibc malloc's ``policy`` (``"keep_freed"`` or ``"release"``, see the module doc) for this
    whole process. Returns True when it is in force, False when nothing was set: not glibc, the
    environment chooses (``skip_reason``), another policy is already in force (kept; one line on
    stderr), or mallopt refused a value (one line on stderr). Raises ConfigError for an unknown name."""
    global _active, _complete
    if policy not in POLICIES:
        raise ConfigError(f"malloc policy {policy!r} is not one of {', '.join(POLICIES)}")
    if _active is not None:
        if _active != policy:
            print(f"lamina: malloc policy {policy} not set: {_active} is already in force in this process "
                  "(one policy per process)", file=sys.stderr)  # fmt: skip
            return False
        trim()
        return _complete
    libc = _glibc() if skip_reason() is None else None
    if libc is None:
        return False
    for param, value in POLICIES[policy]:
        if libc.mallopt(param, value) != 1:  # 1: success, 0: the value was refused
            _active, _complete = policy, False  # its earlier values are in force: no second policy either
            print(f"lamina: malloc policy {policy} only partly set: mallopt({param}, {value}) failed",
                  file=sys.stderr)  # fmt: skip
            return False
    _active, _complete = policy, True
    trim()
    return True


def _mkl() -> Any:
    """The loaded torch library that carries MKL's service functions (``mkl_serv_free_buffers``), when
    torch is imported and has them (x86 builds link MKL statically), else None."""
    torch = sys.modules.get("torch")
    return None if torch is None else _torch_mkl(os.path.dirname(getattr(torch, "__file__", None) or "."))


@functools.cache
def _torch_mkl(folder: str) -> Any:
    """``_mkl`` for torch installed in ``folder``, looked up once (a trim runs every few decoding steps)."""
    path = os.path.join(folder, "lib", "libtorch_cpu.so")
    if not os.path.exists(path):
        return None
    lib = ctypes.CDLL(path)
    return lib if hasattr(lib, "mkl_serv_free_buffers") else None


def trim(mkl: bool = True) -> None:
    """Return free memory to the system now when the policy in force is ``release`` (nothing
    otherwise): with ``mkl``, MKL's buffers (its allocator keeps a packing buffer per thread for every
    sgemm row count it has seen, ~2.3 MiB each for SmolLM2's LM head: ``mkl_free_buffers``; the next call
    of a size makes its own again, so a caller whose next matmuls are the same keeps them, ``mkl=False``),
    then the free memory of every heap (``malloc_trim(0)``)."""
    if _active in TRIMS:
        lib = _mkl() if mkl else None
        if lib is not None:
            lib.mkl_serv_free_buffers()
        libc = _glibc()
        if libc is not None:
            libc.malloc_trim(0)
