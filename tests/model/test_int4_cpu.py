"""``lamina.model.int4_cpu``'s single-query attention (the compiled decode step's) against SDPA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from int4_kernel import built_or_skip

from lamina.model import int4_cpu


@pytest.fixture(scope="module")
def kernel() -> None:
    """``int4_cpu`` built and loaded (``int4_kernel.built_or_skip``)."""
    built_or_skip()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attn_is_sdpa_over_the_valid_slots(kernel: None, dtype: torch.dtype) -> None:
    """GQA's query rows per KV head (3 of 9 heads; 1 and 5 too), cache views of S of C slots (S = 1, 15,
    16, 17, 40: keys are read 16 at a time), padded slots masked: SDPA's output within fp32 rounding (bf16: the
    same fp32 result rounded once; SDPA's bf16 path rounds its own sums too)."""
    g = torch.Generator().manual_seed(0)
    for S, R in (
        (1, 3),
        (15, 3),
        (16, 1),
        (17, 5),
        (40, 3),
    ):  # R: query rows per KV head (computed 4 at a time)
        C = S + 5
        q = torch.randn(2, 3, R, 64, generator=g).to(dtype)
        kc, vc = (torch.randn(2, 3, C, 64, generator=g).to(dtype) for _ in range(2))
        valid = torch.rand(2, C, generator=g) > 0.4
        valid[:, S - 1] = True  # the step's own slot
        k, v = kc[:, :, :S], vc[:, :, :S]  # strided views, as the step slices its cache
        out = int4_cpu.attn(q.float() * 0.125, k, v, valid[:, :S])
        assert out.dtype == dtype and out.shape == q.shape
        ref = F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=valid[:, None, None, :S], scale=0.125
        )
        if dtype == torch.float32:
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(out, ref.to(dtype), rtol=0.008, atol=1e-3)  # one bf16 rounding
        if S > 1:  # the mask is read: a masked slot changed does not change the output, an unmasked one does
            masked = (~valid[0, : S - 1]).nonzero()
            if len(masked):
                v2 = vc.clone()
                v2[0, :, masked[0, 0]] += 100
                assert torch.equal(int4_cpu.attn(q.float() * 0.125, k, v2[:, :, :S], valid[:, :S]), out)
            v2 = vc.clone()
            v2[0, :, S - 1] += 100
            assert not torch.equal(int4_cpu.attn(q.float() * 0.125, k, v2[:, :, :S], valid[:, :S]), out)


def test_attn_checks_its_shapes(kernel: None) -> None:
    """Mismatched shapes or dtypes are refused (a RuntimeError naming the argument), not read past."""
    q, k = torch.randn(1, 3, 3, 64), torch.randn(1, 3, 8, 64)
    with pytest.raises(RuntimeError, match="shapes disagree"):
        int4_cpu.attn(q, k, k, torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="fp32"):
        int4_cpu.attn(q.bfloat16(), k, k, torch.ones(1, 8, dtype=torch.bool))


@pytest.mark.parametrize("d_model", [64, 256])  # head_dim 16 (the plain loop over columns) and 64
def test_decode_step_attends_through_the_kernel_as_through_sdpa(kernel: None, d_model: int) -> None:
    """``aot.DecodeStep`` (the compiled step's module, run eagerly) with ``attn_kernel`` set gives the
    logits and cache writes of its SDPA path (GQA, padded slots masked) within fp32 rounding."""
    import dataclasses

    from tiny_chat import tiny_llama_config

    from lamina.model.aot import DecodeStep
    from lamina.model.transformer import Transformer

    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_llama_config(), d_model=d_model)
    model = Transformer(cfg).eval()
    step = DecodeStep(model)
    assert not step.attn_kernel  # the model runs no int4 kernel: off unless opted in
    B, C, S = 2, 24, 19
    assert cfg.n_kv_heads is not None and cfg.head_dim is not None
    kv = [torch.randn(B, cfg.n_kv_heads, C, cfg.head_dim) for _ in range(2 * cfg.n_layers)]
    valid = torch.rand(B, C) > 0.3
    valid[:, S - 1] = True
    ids, pos = torch.tensor([[5], [7]]), torch.tensor([[S - 1], [S - 3]])
    out = {}
    with torch.no_grad():
        for on in (False, True):
            step.attn_kernel, cache = on, [t.clone() for t in kv]
            out[on] = step(ids, pos, torch.empty(S, 0), valid, cache), cache
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(out[True][1], out[False][1], strict=True):  # layer 2's keys: from layer 1's output
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[True][1][0], out[False][1][0])  # layer 1's: the same inputs


def test_one_process_builds_at_a_time(tmp_path: Path) -> None:
    """While one process holds the build lock, another cannot take it (it waits, then loads the build
    instead of compiling it again); the lock is free again after."""
    fcntl = pytest.importorskip("fcntl")
    lock = tmp_path / ".build-lock"
    with int4_cpu._one_builder(tmp_path), open(lock, "a+") as other, pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(lock, "a+") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_failed_build_is_remembered_and_missing_tools_announce_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ninja or a compiler, ``load`` says so and announces no build; a build that failed is
    written down, so a later process does not build again at every start (the reason names the file)."""
    monkeypatch.setattr(int4_cpu, "unavailable_reason", lambda: None)
    monkeypatch.setattr(int4_cpu, "op_loaded", lambda: False)
    monkeypatch.setattr(int4_cpu, "_LOADED", {})
    lines: list[str] = []
    monkeypatch.setattr(int4_cpu, "_missing_build_tools", lambda: "ninja is not installed")
    assert int4_cpu.load(tmp_path, log=lines.append) == "ninja is not installed" and lines == []

    def fail(*args: object) -> None:
        raise RuntimeError("c++: error: bad flag")

    monkeypatch.setattr(int4_cpu, "_LOADED", {})  # ninja installed, then a new process
    monkeypatch.setattr(int4_cpu, "_missing_build_tools", lambda: None)
    monkeypatch.setattr(int4_cpu, "_build", fail)
    why = int4_cpu.load(tmp_path, log=lines.append)
    assert why is not None and "bad flag" in why and len(lines) == 2 and "bad flag" in lines[1]
    monkeypatch.setattr(int4_cpu, "_LOADED", {})  # a new process
    monkeypatch.setattr(int4_cpu, "_build", lambda *a: pytest.fail("built again"))
    again = int4_cpu.load(tmp_path, log=lines.append)
    assert again is not None and "bad flag" in again and ".failed" in again and len(lines) == 2
