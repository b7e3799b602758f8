"""``lamina.model.int4_cpu``'s kernels for tests (import as ``from int4_kernel import built_or_skip``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lamina.model import int4_cpu


def built_or_skip() -> Path:
    """Build (once per machine: the tests' shared compile directory) and load ``int4_cpu``'s kernels and
    return where; skips on CPUs without AVX-512 BF16 and without ninja or a C++ compiler (a failed build
    where all are there fails)."""
    from torch.utils.cpp_extension import is_ninja_available

    why = int4_cpu.unavailable_reason()
    if why is not None:
        pytest.skip(why)
    if not is_ninja_available():
        pytest.skip("torch's C++ extension builder needs ninja (pip install ninja)")
    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("the int4 kernel's build needs a C++ compiler")
    build = int4_cpu.default_build_dir()
    assert int4_cpu.load(build) is None and int4_cpu.attn_loaded()
    return build
