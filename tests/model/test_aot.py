"""The ahead-of-time compiled decode step (lamina.model.aot): its math against the eager model, and the
compiled package through ``lamina.load(compile=True)`` (one tiny model; the package is cached on disk in
the tests' shared compile directory, so later sessions load it instead of compiling)."""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_chat import tiny_llama_config

import lamina
from lamina.checkpoint.lamina import save_checkpoint
from lamina.config import GenerationConfig, ModelConfig
from lamina.generate.engine import generate_ids, greedy_decode
from lamina.generate.speculative import layer_skip_draft
from lamina.model import aot, int4_cpu
from lamina.model.aot import (
    CompiledStep,
    DecodeStep,
    attach_decode_step,
    attached_step,
    export_step,
    step_key,
    supported,
)
from lamina.model.layers import _InferenceCopies
from lamina.model.lora import LoraConfig, apply_lora
from lamina.model.quant import Int4Linear, PackedLinear, convert_weights
from lamina.model.transformer import DECODE_STEP, Transformer

TINY = tiny_llama_config()  # fp32 tests with a tiny RoPE / SwiGLU / GQA decoder


def _ids(B: int, T: int) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))


def _steps(model: Transformer, decode: object = None) -> torch.Tensor:
    """Logits (3, 7, V) of a left-padded prefill then 6 one-token steps; ``decode(ids, cache)`` runs the
    steps instead of ``model`` when given (same bookkeeping as the compiled step)."""
    ids = _ids(3, 12)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, :2] = 0
    cache = model.new_cache(3, 16)
    with torch.inference_mode():
        out = [model(ids[:, :6], attention_mask=mask, cache=cache, last_only=True)]
        for t in range(6, 12):
            out.append(decode(ids[:, t : t + 1], cache) if decode else model(ids[:, t : t + 1], cache=cache))  # type: ignore[operator]
    return torch.cat(out, 1).float()


def _eager_step(model: Transformer) -> object:
    """``DecodeStep`` run eagerly with ``CompiledStep``'s bookkeeping: the compiled step's computation
    without compiling it."""
    step = DecodeStep(model)

    def run(ids: torch.Tensor, cache: object) -> torch.Tensor:
        offset = cache.length  # type: ignore[attr-defined]
        pos = cache.next_pos[:, None].clone()  # type: ignore[attr-defined]
        cache.valid[:, offset] = True  # type: ignore[attr-defined]
        cache.positions[:, offset] = pos[:, 0]  # type: ignore[attr-defined]
        logits = step(ids, pos, torch.empty(offset + 1, 0), cache.valid, [*cache.k, *cache.v])  # type: ignore[attr-defined]
        cache.next_pos, cache.length = pos[:, 0] + 1, offset + 1  # type: ignore[attr-defined]
        return logits

    return run


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_decode_step_computes_the_eager_step(pos: str) -> None:
    """DecodeStep (what is exported) gives the eager model's logits on a batch with a left-padded row,
    fp32 within 1e-5 (it attends with the explicit mask where eager skips it)."""
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(TINY, pos_encoding=pos)).eval()
    torch.testing.assert_close(_steps(model, _eager_step(model)), _steps(model), atol=1e-5, rtol=0)


def test_supported_and_key(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = Transformer(copy.deepcopy(TINY)).eval()
    assert supported(model) is None
    assert "alibi" in (supported(Transformer(dataclasses.replace(TINY, pos_encoding="alibi"))) or "")
    other = Transformer(copy.deepcopy(TINY)).eval()  # other weights, same architecture: the same package
    assert step_key(other) == step_key(model)
    assert step_key(convert_weights(other, "int4")) != step_key(model)
    packed = convert_weights(Transformer(copy.deepcopy(TINY)).eval(), "fp32")  # oneDNN-prepacked where it can
    if any(isinstance(m, PackedLinear) for m in packed.modules()):
        assert "prepacked" in (supported(packed) or "")
    assert supported(convert_weights(Transformer(copy.deepcopy(TINY)).eval(), "fp32", pack=False)) is None

    # head_topk's k is a Python attribute traced into the code: another k, another package
    def topk(k: int) -> Transformer:
        return convert_weights(Transformer(copy.deepcopy(TINY)).eval(), "int4", pack=False, head_topk=k)

    assert step_key(topk(4)) != step_key(topk(8))
    key = step_key(model)
    monkeypatch.setattr(aot, "_cpu_digest", lambda: "another CPU's model name and flags")
    assert step_key(model) != key


def _stand_in(model: Transformer) -> list[int]:
    """Attach a ``CompiledStep`` whose runner is ``DecodeStep`` run eagerly (nothing compiled) to
    ``model``; returns the batch sizes of the steps it runs."""
    calls: list[int] = []
    run = DecodeStep(model)

    def runner(*args: Any) -> torch.Tensor:
        calls.append(args[0].shape[0])
        return run(*args)

    step = CompiledStep(runner, Path("stand-in"), aot._named_tensors(DecodeStep(model)), model)  # reads all
    model.__dict__.setdefault("_inference_copies", _InferenceCopies())[DECODE_STEP] = step
    return calls


def test_the_step_stands_aside_where_it_would_not_compute_the_model() -> None:
    """A layer-skip draft (which shares the target's inference copies), autocast, and weights or modules
    the step was not bound to decode eagerly; LoRA wrapping drops the step; in-place writes keep it."""
    torch.manual_seed(0)
    model = Transformer(copy.deepcopy(TINY)).eval()
    calls = _stand_in(model)
    expected = _steps(model, _eager_step(model))
    assert calls == []
    assert _steps(model).equal(expected) and calls == [3] * 6
    calls.clear()
    draft = layer_skip_draft(model, 1)  # its cache has 1 layer: the 2-layer step would fail on it
    assert attached_step(draft) is attached_step(model)
    _steps(draft)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _steps(model)
    assert calls == []
    with torch.no_grad():
        model.blocks[0].mlp_norm.weight.mul_(2.0)  # in place: the step reads it
    _steps(model)
    assert calls == [3] * 6
    calls.clear()
    model.load_state_dict(copy.deepcopy(model.state_dict()), assign=True)  # new tensors
    torch.testing.assert_close(_steps(model), _steps(model, _eager_step(model)))
    assert calls == []
    fresh = Transformer(copy.deepcopy(TINY)).eval()
    calls = _stand_in(fresh)
    fresh.blocks[1].attn.q_proj.weight.data = torch.zeros_like(fresh.blocks[1].attn.q_proj.weight)
    _steps(fresh)
    assert calls == []
    calls = _stand_in(fresh)  # bound again: to the new tensor
    _steps(fresh)
    assert calls == [3] * 6
    calls.clear()
    fresh.blocks[0].mlp = copy.deepcopy(fresh.blocks[0].mlp)  # a module swapped
    _steps(fresh)
    assert calls == []
    adapted = Transformer(copy.deepcopy(TINY)).eval()
    _stand_in(adapted)
    apply_lora(adapted, LoraConfig(r=2, target_modules=["attn.q_proj"]))
    assert attached_step(adapted) is None


def test_direct_table_writes_make_the_step_stand_aside() -> None:
    """``torch.func.functional_call`` with other weights (it writes the modules' ``_parameters``
    directly: no registration hook fires) decodes eagerly with those weights while a step is attached,
    and through the step again once it restored them; a module written into a ``ModuleList``'s table
    (as ``ModuleList.insert`` does) and a parameter deleted then set as a plain attribute decode
    eagerly too."""
    torch.manual_seed(0)
    model = Transformer(copy.deepcopy(TINY)).eval()
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():  # the tied embedding and head once
            p.add_(torch.randn_like(p) * 0.1)
    calls = _stand_in(model)
    new = dict(other.named_parameters())
    swapped = _steps(
        model, lambda ids, cache: torch.func.functional_call(model, new, (ids,), {"cache": cache})
    )
    assert calls == []
    torch.testing.assert_close(swapped, _steps(model, lambda ids, cache: other(ids, cache=cache)))
    _steps(model)
    assert calls == [3] * 6
    calls.clear()
    model.blocks._modules["1"] = copy.deepcopy(model.blocks[1])
    _steps(model)
    assert calls == []
    calls = _stand_in(model)  # bound again: to the new block
    norm = model.blocks[0].mlp_norm
    weight = norm.weight
    del norm.weight
    norm.weight = weight.detach().clone()  # a plain attribute now (no table holds it)
    _steps(model)
    assert calls == []


@pytest.fixture(scope="session")
def tiny_int4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("aot") / "tiny"
    save_checkpoint(path, Transformer(dataclasses.replace(TINY, n_layers=1)))
    return path


@pytest.mark.slow
@pytest.mark.skipif(
    not (shutil.which("c++") or shutil.which("g++")), reason="AOTInductor needs a C++ compiler"
)
def test_load_with_compile_decodes_through_the_package(tiny_int4: Path) -> None:
    """``lamina.load(compile=True)`` attaches the compiled step (int4); decoding through it gives the eager
    model's logits within bf16 rounding and the same greedy tokens; a second load reads the package.
    Where ``int4_cpu``'s kernel builds, the compiled models use it (``load``'s ``int4_kernel`` unset: on
    where it builds, before the compile): the package calls its C shim, and the eager model
    (``int4_kernel=False``: the aten kernel) stays the reference."""
    from torch.utils.cpp_extension import is_ninja_available

    kernel = int4_cpu.unavailable_reason() is None and is_ninja_available() and int4_cpu.load() is None
    eager = lamina.load(tiny_int4, weights="int4", int4_kernel=False, compile=False).model
    compiled = lamina.load(tiny_int4, weights="int4", compile=True).model
    step = attached_step(compiled)
    assert step is not None and attached_step(eager) is None
    assert (step.path / "step.pt2").is_file() and (step.path / "constants.pt").is_file()
    if kernel:  # every int4 linear of the tiny model has 64 | outputs: all on the kernel, through the shim
        assert all(m.mv_packed is not None for m in compiled.modules() if isinstance(m, Int4Linear))
        with zipfile.ZipFile(step.path / "step.pt2") as pt2:
            assert any(b"aoti_torch_cpu_lamina_int4_mv" in pt2.read(n) for n in pt2.namelist())
    runner, calls = step.runner, []
    step.runner = lambda *args: calls.append(args[0].shape[0]) or runner(*args)  # counts the compiled steps
    stepped = _steps(compiled)  # through the package's own call
    torch.testing.assert_close(stepped, _steps(eager), atol=0.02, rtol=0)
    assert calls == [3] * 6
    step.runner = runner  # its boxed run, the inputs flattened by the step (not the package's call)
    assert step._run is not runner and torch.equal(_steps(compiled), stepped)
    step.runner = lambda *args: calls.append(args[0].shape[0]) or runner(*args)
    prompts = [[5, 7, 9], [11, 3, 8, 2, 4]]
    assert greedy_decode(compiled, prompts, 8) == greedy_decode(eager, prompts, 8)
    # continuous batching: rows leave at different steps and a queued one joins, the cache grows
    cfgs = [GenerationConfig(temperature=0.0, max_new_tokens=n) for n in (3, 12, 6)]
    runs = [generate_ids(m, [*prompts, [9, 9]], cfgs, max_batch_size=2) for m in (compiled, eager)]
    assert [s.tokens for s in runs[0]] == [s.tokens for s in runs[1]]
    assert 1 in calls and 2 in calls  # steps at batch 2 and, once rows left, at batch 1
    again = lamina.load(tiny_int4, weights="int4", compile=True).model
    assert attached_step(again).path == step.path  # type: ignore[union-attr]
    auto = lamina.load(tiny_int4, weights="int4").model  # compile unset: the cached package is attached
    assert attached_step(auto).path == step.path  # type: ignore[union-attr]
    assert greedy_decode(auto, prompts, 8) == greedy_decode(eager, prompts, 8)
    assert attached_step(lamina.load(tiny_int4, weights="int4", compile=False).model) is None
    assert attached_step(copy.deepcopy(compiled)) is None  # a copy's weights are its own: no step
    assert attached_step(compiled.to(torch.float32)) is None  # .to() drops it


def test_compile_unset_attaches_only_a_cached_step(
    tiny_int4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``load``'s ``compile`` unset with no package in the cache: eager decoding, nothing compiled (a
    compile would take minutes: ``export_step`` must not run)."""
    monkeypatch.setenv("LAMINA_COMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(aot, "export_step", lambda *a: pytest.fail("compile unset compiled a step"))
    model = lamina.load(tiny_int4, weights="int4", int4_kernel=False).model  # (no kernel build in tmp_path)
    assert attached_step(model) is None and aot.supported(model) is None
    (tmp_path / "cache" / "aot").mkdir(parents=True)  # an empty cache directory: still no package
    assert attached_step(lamina.load(tiny_int4, weights="int4", int4_kernel=False).model) is None


def test_the_rescored_int4_head_exports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """int4 with ``head_topk`` (``quant.RescoredHead``: top-k, gather, scatter) goes through
    ``export_step``'s ``torch.export`` with dynamic batch and cache length; the exported step gives the
    eager steps' logits (AOTInductor's compile itself is stubbed out here: minutes)."""
    import torch._inductor

    exported = []

    def stub(ep: object, package_path: str, **_: object) -> str:
        exported.append(ep)
        Path(package_path).write_bytes(b"")
        return package_path

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", stub)
    torch.manual_seed(0)
    model = convert_weights(
        Transformer(dataclasses.replace(TINY, n_layers=1)).eval(), "int4", pack=False, head_topk=4
    )
    assert supported(model) is None
    export_step(model, tmp_path / "step.pt2")
    run = exported[0].module()  # type: ignore[attr-defined]
    step = _eager_step(model)
    torch.testing.assert_close(
        _steps(model, lambda ids, cache: _run_exported(run, ids, cache)),
        _steps(model, step),
        atol=1e-2,
        rtol=0,
    )


def _run_exported(run: object, ids: torch.Tensor, cache: object) -> torch.Tensor:
    """One step through an exported ``DecodeStep`` with ``CompiledStep``'s bookkeeping (as _eager_step)."""
    offset = cache.length  # type: ignore[attr-defined]
    pos = cache.next_pos[:, None].clone()  # type: ignore[attr-defined]
    cache.valid[:, offset] = True  # type: ignore[attr-defined]
    cache.positions[:, offset] = pos[:, 0]  # type: ignore[attr-defined]
    logits = run(ids, pos, torch.empty(offset + 1, 0), cache.valid, [*cache.k, *cache.v])  # type: ignore[operator,attr-defined]
    cache.next_pos, cache.length = pos[:, 0] + 1, offset + 1  # type: ignore[attr-defined]
    return logits


def test_package_folder_is_written_at_once_and_rebuilt_when_broken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``attach_decode_step`` writes decode-KEY/ (package and constants) by one rename, keeps a folder
    another process renamed first, removes old half-written folders, and compiles again (once, naming the
    file) a cached package that fails to load (export and AOTInductor stubbed: no compiling here)."""
    import torch._inductor
    import torch.export

    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(TINY, n_layers=1)).eval()
    compiled: list[str] = []

    def compile_stub(ep: object, package_path: str, **_: object) -> str:
        compiled.append(package_path)
        Path(package_path).write_bytes(b"package")
        return package_path

    class Runner:
        def __init__(self, path: str) -> None:
            if Path(path).read_bytes() != b"package":
                raise RuntimeError("bad package")
            self.run = DecodeStep(model)

        def get_constant_fqns(self) -> list[str]:
            return []

        def load_constants(self, *args: object, **kwargs: object) -> None:
            pass

        def __call__(self, *args: Any) -> torch.Tensor:
            return self.run(*args)

    monkeypatch.setattr(torch.export, "export", lambda *args, **kwargs: None)
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_stub)
    monkeypatch.setattr(torch._inductor, "aoti_load_package", Runner)
    old, recent = tmp_path / ".partial-killed", tmp_path / ".partial-running"
    old.mkdir()
    recent.mkdir()
    os.utime(old, (1.0, 1.0))
    lines: list[str] = []
    step = attach_decode_step(model, tmp_path, log=lines.append)
    assert step.path == tmp_path / f"decode-{step_key(model)}" and len(compiled) == 1
    assert sorted(p.name for p in step.path.iterdir()) == ["constants.pt", "step.pt2"]
    assert not old.exists() and recent.exists()  # a day-old one removed, a running compile's kept
    assert sorted(p.name for p in tmp_path.iterdir()) == [".partial-running", step.path.name]
    torch.testing.assert_close(_steps(model), _steps(model, _eager_step(model)))

    (step.path / "step.pt2").write_bytes(b"truncated")
    lines.clear()
    assert attach_decode_step(model, tmp_path, log=lines.append).path == step.path
    assert len(compiled) == 2 and str(step.path) in lines[0] and "failed to load" in lines[0]
    assert attach_decode_step(model, tmp_path).path == step.path and len(compiled) == 2  # loaded

    (step.path / "step.pt2").write_bytes(b"theirs")  # another process renamed its folder first
    export_step(model, step.path)
    assert (step.path / "step.pt2").read_bytes() == b"theirs" and len(compiled) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [".partial-running", step.path.name]


# -- encoder-decoders: the decoder's step with the cross-attention keys as inputs ---------------------------


def _enc_dec(preset: str) -> Transformer:
    """A tiny random encoder-decoder of ``preset`` 's architecture."""
    torch.manual_seed(0)
    small = {} if preset == "t5-tiny" else dict(d_model=32, n_heads=4, d_ff=64, n_layers=2)
    return Transformer(ModelConfig.preset(preset, vocab_size=96, max_seq_len=64, **small)).eval()


def _enc_dec_steps(model: Transformer) -> torch.Tensor:
    """Logits (3, 7, V): sources of 9, 5 and 7 tokens (right-padded), the start token, then 6 steps."""
    g = torch.Generator().manual_seed(2)
    src = torch.randint(2, 96, (3, 9), generator=g)
    real = torch.ones(3, 9, dtype=torch.long)
    real[1, 5:], real[2, 7:] = 0, 0
    targets = torch.randint(2, 96, (3, 6), generator=g)
    cache = model.new_cache(3, 16)
    with torch.inference_mode():
        memory = model.encode(src, real)
        start = torch.zeros(3, 1, dtype=torch.long)
        out = [model.decode(start, memory, real, cache=cache, last_only=True, source_ids=src)]
        out += [model.decode(targets[:, t : t + 1], None, cache=cache) for t in range(6)]
    return torch.cat(out, 1).float()


def _enc_dec_stand_in(model: Transformer) -> list[int]:
    """Attach an ``EncDecCompiledStep`` whose runner is ``EncDecStep`` run eagerly; returns the batch sizes
    of the steps it runs."""
    calls: list[int] = []
    run = aot.EncDecStep(model)

    def runner(*args: Any) -> torch.Tensor:
        calls.append(args[0].shape[0])
        return run(*args)

    constants = aot._named_tensors(aot.EncDecStep(model))  # what a package reads: the binding checks them
    step = aot.EncDecCompiledStep(runner, Path("stand-in"), constants, model)
    model.__dict__.setdefault("_inference_copies", _InferenceCopies())[DECODE_STEP] = step
    return calls


@pytest.mark.parametrize("preset", ["t5-tiny", "transformer-base"])
def test_enc_dec_step_computes_the_eager_step(preset: str) -> None:
    """EncDecStep (what is exported for T5: relative bias, pre-norm; the 2017 Transformer: sinusoidal,
    post-norm) gives the eager decoder's logits with padded sources, fp32 within 1e-5; the first step
    (which computes the cross keys) stays eager, and so do all steps once a tensor the step reads was
    replaced (the stand-in is bound to the constants a package reads)."""
    model = _enc_dec(preset)
    assert supported(model) is None
    expected = _enc_dec_steps(model)
    calls = _enc_dec_stand_in(model)
    torch.testing.assert_close(_enc_dec_steps(model), expected, atol=1e-5, rtol=0)
    assert calls == [3] * 6
    calls.clear()
    q = model.blocks[0].cross_attn.q_proj  # type: ignore[union-attr]
    q.weight.data = q.weight.detach().clone()  # a constant of the step replaced: eager steps
    torch.testing.assert_close(_enc_dec_steps(model), expected, atol=1e-5, rtol=0)
    assert calls == []


def test_a_one_token_source_decodes_eagerly() -> None:
    """The package is exported for sources of >= 2 tokens (``Dim("source", min=2)``): a cache whose cross
    keys hold one source slot decodes eagerly, not through the step."""
    model = _enc_dec("t5-tiny")
    calls = _enc_dec_stand_in(model)
    src, real = torch.tensor([[7]]), torch.ones(1, 1, dtype=torch.long)
    cache = model.new_cache(1, 8)
    with torch.inference_mode():
        memory = model.encode(src, real)
        model.decode(torch.zeros(1, 1, dtype=torch.long), memory, real, cache=cache, last_only=True)
        for t in (5, 9):
            model.decode(torch.tensor([[t]]), None, cache=cache)
    assert cache.cross_k[0].shape[2] == 1 and cache.length == 3 and calls == []


@pytest.mark.slow
@pytest.mark.skipif(
    not (shutil.which("c++") or shutil.which("g++")), reason="AOTInductor needs a C++ compiler"
)
def test_load_with_compile_decodes_an_encoder_decoder_through_the_package(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """``lamina.load(compile=True)`` on a T5: the decoder's steps run the compiled package (batch and
    source length change: dynamic), the logits are eager's within 1e-4 and beam and greedy ids equal."""
    from lamina.generate.seq2seq import generate_seq2seq

    path = tmp_path_factory.mktemp("aot") / "t5"
    torch.manual_seed(0)
    save_checkpoint(
        path, Transformer(ModelConfig.preset("t5-tiny", vocab_size=96, max_seq_len=64, n_layers=1))
    )
    eager = lamina.load(path, weights="fp32").model
    compiled = lamina.load(path, weights="fp32", compile=True).model
    step = attached_step(compiled)
    assert isinstance(step, aot.EncDecCompiledStep)
    runner, calls = step.runner, []
    step.runner = lambda *args: calls.append(args[0].shape[0]) or runner(*args)
    stepped = _enc_dec_steps(compiled)
    torch.testing.assert_close(stepped, _enc_dec_steps(eager), atol=1e-4, rtol=0)
    assert calls == [3] * 6
    step.runner = runner  # its boxed run (the flattened inputs in the exported order)
    assert step._run is not runner and torch.equal(_enc_dec_steps(compiled), stepped)
    step.runner = lambda *args: calls.append(args[0].shape[0]) or runner(*args)
    sources = [[5, 7, 9], [11, 3, 8, 2, 4, 6, 7], [9, 9]]
    for cfg in (GenerationConfig(temperature=0.0, max_new_tokens=8, min_new_tokens=8),
                GenerationConfig(num_beams=2, max_new_tokens=5)):  # fmt: skip
        runs = [generate_seq2seq(m, sources, cfg) for m in (compiled, eager)]
        assert [[s.token_ids for s in r] for r in runs[0]] == [[s.token_ids for s in r] for r in runs[1]]
    assert 3 in calls and len(calls) > 6
