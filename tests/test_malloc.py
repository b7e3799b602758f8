"""lamina.malloc: the decision is tested on a fake C library in this process (the worker's allocator is
never changed); the real glibc calls run in a subprocess."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from lamina import malloc
from lamina.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_the_environment_s_choice_wins() -> None:
    assert malloc.skip_reason({"PATH": "/bin", "LAMINA_MALLOC": "on"}) is None
    assert malloc.skip_reason({"LAMINA_MALLOC": "OFF"}) == "LAMINA_MALLOC=off"
    for key in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES", "LD_PRELOAD"):
        assert malloc.skip_reason({key: "1"}) == f"{key} is set (the environment chooses malloc)"


class FakeLibc:
    def __init__(self, refuse: int | None = None) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.refuse = refuse  # the mallopt parameter that fails

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 0 if param == self.refuse else 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("trim", pad, 0))
        return 1


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeLibc:
    """A fake glibc, no policy applied yet, an environment that leaves malloc to lamina."""
    libc = FakeLibc()
    monkeypatch.setattr(malloc, "_glibc", lambda: libc)
    monkeypatch.setattr(malloc, "_active", None)
    monkeypatch.setattr(malloc, "_complete", False)
    for key in [k for k in os.environ if malloc.skip_reason({k: os.environ[k]})]:
        monkeypatch.delenv(key)
    return libc


def test_one_policy_per_process_with_mallopt_checked(
    fake: FakeLibc, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match="malloc policy 'fast' is not one of keep_freed, release"):
        malloc.set_malloc_policy("fast")  # type: ignore[arg-type]
    monkeypatch.setenv("LAMINA_MALLOC", "off")
    assert (
        malloc.set_malloc_policy("release") is False and fake.calls == [] and malloc.active_policy() is None
    )
    monkeypatch.delenv("LAMINA_MALLOC")
    assert malloc.set_malloc_policy("release") is True and malloc.active_policy() == "release"
    assert fake.calls == [
        ("mallopt", -8, 2),
        ("mallopt", -3, 4 << 20),
        ("mallopt", -1, 8 << 20),
        ("trim", 0, 0),
    ]
    assert malloc.set_malloc_policy("release") is True and fake.calls[-1] == ("trim", 0, 0)  # trims again
    n = len(fake.calls)
    assert malloc.set_malloc_policy("keep_freed") is False and len(fake.calls) == n  # the first one stays
    assert "keep_freed not set: release is already in force" in capsys.readouterr().err
    assert malloc.active_policy() == "release"

    monkeypatch.setattr(malloc, "_active", None)
    fake.calls.clear()
    fake.refuse = -1  # M_TRIM_THRESHOLD refused: recorded, reported, not in force
    assert malloc.set_malloc_policy("keep_freed") is False
    assert fake.calls == [("mallopt", -3, 32 << 20), ("mallopt", -4, 0), ("mallopt", -1, 1 << 30)]
    assert "keep_freed only partly set" in capsys.readouterr().err
    assert malloc.active_policy() == "keep_freed" and malloc.set_malloc_policy("keep_freed") is False
    assert malloc.set_malloc_policy("release") is False


def test_trim_frees_mkl_s_buffers_unless_asked_to_keep_them(
    fake: FakeLibc, monkeypatch: pytest.MonkeyPatch
) -> None:
    class FakeMkl:
        def mkl_serv_free_buffers(self) -> None:
            fake.calls.append(("mkl", 0, 0))

    monkeypatch.setattr(malloc, "_mkl", FakeMkl)
    malloc.trim()
    assert fake.calls == []  # no policy: nothing
    assert malloc.set_malloc_policy("release") is True
    fake.calls.clear()
    malloc.trim()
    malloc.trim(mkl=False)
    assert fake.calls == [("mkl", 0, 0), ("trim", 0, 0), ("trim", 0, 0)]


def test_torch_s_mkl_is_looked_up_once() -> None:
    import torch  # noqa: F401  (the lookup finds its library)

    first = malloc._mkl()
    hits = malloc._torch_mkl.cache_info().hits
    assert malloc._mkl() is first and malloc._torch_mkl.cache_info().hits == hits + 1


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_the_real_glibc_takes_a_policy() -> None:
    env = {k: v for k, v in os.environ.items() if not malloc.skip_reason({k: v})}
    env["PYTHONPATH"] = str(ROOT)
    code = "from lamina.malloc import *; print(set_malloc_policy('keep_freed'), set_malloc_policy('release'), active_policy())"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False", "keep_freed"]
