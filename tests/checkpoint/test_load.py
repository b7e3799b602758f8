"""``lamina.load`` reads a checkpoint's decoding defaults from every format: HF generation_config.json
(sampling fields, do_sample=false as greedy, max_new_tokens) and GGUF general.sampling.* keys."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import lamina
from lamina.checkpoint.hf import export_hf
from lamina.checkpoint.load import gguf_decoding_defaults, hf_decoding_defaults
from lamina.config import ModelConfig
from lamina.generate.text import model_defaults
from lamina.model.transformer import Transformer


def _tiny_hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf") / "tiny"
    export_hf(folder, Transformer(ModelConfig.preset("llama-tiny", vocab_size=101, max_seq_len=32)).eval())
    return folder


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_hf_folder(tmp_path_factory)


def _with_generation_config(folder: Path, gen: dict[str, Any]) -> Path:
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": [2, 3], **gen})
    )
    return folder


SAMPLING = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.05, "max_new_tokens": 77}


def test_hf_sampling_defaults_become_the_models_generation_config(hf_folder: Path) -> None:
    lm = lamina.load(_with_generation_config(hf_folder, {"do_sample": True, **SAMPLING, "max_length": 9}))
    g = lm.generation
    assert (g.temperature, g.top_p, g.top_k, g.repetition_penalty) == (0.6, 0.9, 20, 1.05)
    assert g.max_new_tokens == 77 and g.eos_token_ids == [2, 3] and g.sampling  # max_length counts the prompt
    assert model_defaults(lm) is g  # generate and chat start from them


def test_do_sample_false_is_greedy_and_ignores_the_sampling_fields(hf_folder: Path) -> None:
    lm = lamina.load(_with_generation_config(hf_folder, {"do_sample": False, **SAMPLING}))
    g = lm.generation
    assert not g.sampling and g.temperature == 0 and (g.top_p, g.top_k) == (1.0, 0)
    assert g.repetition_penalty == 1.05 and g.max_new_tokens == 77  # these apply to greedy decoding too


def test_a_file_with_only_token_ids_sets_no_decoding_defaults(hf_folder: Path) -> None:
    lm = lamina.load(_with_generation_config(hf_folder, {"max_length": 4096, "temperature": None}))
    assert model_defaults(lm) is None and lm.generation.max_new_tokens == 128


def test_an_invalid_value_names_the_file(hf_folder: Path) -> None:
    _with_generation_config(hf_folder, {"do_sample": True, "top_p": 1.5})
    with pytest.raises(lamina.CheckpointError, match=r"generation_config\.json: decoding default top_p=1\.5"):
        lamina.load(hf_folder)


def test_mapping_rules() -> None:
    assert hf_decoding_defaults({"temperature": 0.7, "min_p": None}) == {"temperature": 0.7}  # vLLM's reading
    assert hf_decoding_defaults({"do_sample": False, "top_k": 5}) == {"temperature": 0.0}
    meta = {"general.sampling.temp": 0.8, "general.sampling.penalty_last_n": 64, "general.sampling.top_k": 40}
    assert gguf_decoding_defaults(meta) == {"temperature": 0.8, "repetition_penalty_last_n": 64, "top_k": 40}


def test_compile_cache_is_lamina_s_own_directory_unless_the_user_chose_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--compile`` points inductor's on-disk cache at lamina's data directory or
    ``$LAMINA_COMPILE_CACHE``, where inductor then looks (no compilation needed to check); a user's own
    ``TORCHINDUCTOR_CACHE_DIR`` is kept; an unwritable directory means compiling without the cache (one
    line), not an error. The FX graph / AOTAutograd cache flags are not changed for the process."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    from lamina.checkpoint.load import compile_cache_dir, use_compile_cache

    flags = (torch._inductor.config.fx_graph_cache, torch._functorch.config.enable_autograd_cache)
    monkeypatch.delenv("LAMINA_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("LAMINA_HOME", str(tmp_path / "home"))
    assert compile_cache_dir() == tmp_path / "home" / "compile"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's choice wins
    assert use_compile_cache() == tmp_path / "mine" and not (tmp_path / "home").exists()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # torch's own default: no choice
    monkeypatch.setenv("LAMINA_COMPILE_CACHE", str(tmp_path / "cc"))
    assert use_compile_cache() == tmp_path / "cc"
    assert cache_dir() == str(tmp_path / "cc") and (tmp_path / "cc").is_dir()
    (tmp_path / "file").write_text("")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setenv("LAMINA_COMPILE_CACHE", str(tmp_path / "file" / "cc"))  # cannot be made
    assert use_compile_cache() is None and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    assert "--compile without its cache" in capsys.readouterr().err
    assert (torch._inductor.config.fx_graph_cache, torch._functorch.config.enable_autograd_cache) == flags


def test_compile_turns_the_caches_on_for_lamina_s_compile_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._functorch.config as functorch_config
    import torch._inductor.compile_fx

    from lamina.checkpoint.load import _compile_with_caches

    seen = []
    monkeypatch.setattr(functorch_config, "enable_autograd_cache", False)
    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx",
                        lambda gm, inputs, config_patches: seen.append((functorch_config.enable_autograd_cache,
                                                                        config_patches)))  # fmt: skip
    _compile_with_caches(None, [], config_patches={"max_autotune": False})  # type: ignore[arg-type]
    assert seen == [(True, {"max_autotune": False, "fx_graph_cache": True})]
    assert functorch_config.enable_autograd_cache is False


def test_compile_failures_are_one_line_and_decode_eagerly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``compile=True`` when the compiled decode step cannot be built (an export error; an unwritable cache
    directory): one line on stderr naming it, no step attached, and the model decodes eagerly."""
    from lamina.model import aot

    hf_folder = tmp_path / "tiny"  # its own: other tests write generation files into the shared one
    export_hf(hf_folder, Transformer(ModelConfig.preset("llama-tiny", vocab_size=101, max_seq_len=32)).eval())

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("aten.some_op has no lowering\nmore detail")

    monkeypatch.setattr(aot, "attach_decode_step", fail)
    model = lamina.load(hf_folder, compile=True).model
    err = capsys.readouterr().err
    assert (
        "the compiled decode step failed (RuntimeError: aten.some_op has no lowering); decoding eagerly"
        in err
    )
    assert aot.attached_step(model) is None and model._compiled_call_impl is None
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LAMINA_COMPILE_CACHE", str(tmp_path / "file" / "cc"))  # cannot be made
    model = lamina.load(hf_folder, compile=True).model
    err = capsys.readouterr().err  # one line: not use_compile_cache's too
    assert "--compile: cannot make" in err and "without its cache" not in err
    assert aot.attached_step(model) is None


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny HF folder of its own (tests above write generation files into ``hf_folder``)."""
    return _tiny_hf_folder(tmp_path_factory)


def test_int4_kernel_and_head_topk_reach_the_loaded_model(tiny_folder: Path) -> None:
    """``load(weights="int4", int4_kernel=True)`` runs every int4 linear (the tiny model's outputs are all
    multiples of 64) through ``int4_cpu``'s kernel; unset does too where it builds; False keeps aten's;
    ``head_topk`` gives the rescored head."""
    from int4_kernel import built_or_skip

    from lamina.model.quant import Int4Linear, RescoredHead

    built_or_skip()
    for kernel in (True, None):
        model = lamina.load(tiny_folder, weights="int4", int4_kernel=kernel, head_topk=4).model
        blocks = [m for m in model.blocks.modules() if isinstance(m, Int4Linear)]
        assert blocks and all(m.mv_packed is not None for m in blocks)
        assert isinstance(model.lm_head, RescoredHead) and model.lm_head.k == 4
    model = lamina.load(tiny_folder, weights="int4", int4_kernel=False).model
    assert all(m.mv_packed is None for m in model.modules() if isinstance(m, Int4Linear))
    assert not isinstance(model.lm_head, RescoredHead)


def test_int4_options_without_int4_or_the_kernel_are_one_line_errors(
    tiny_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``int4_kernel=True`` or ``head_topk`` with other weights, ``head_topk`` < 1, and ``int4_kernel=True``
    where the kernel cannot run are ``ConfigError`` s naming the fix; unset, the model quietly keeps
    aten's kernel there."""
    from lamina.model import int4_cpu
    from lamina.model.quant import Int4Linear

    with pytest.raises(lamina.ConfigError, match=r"int4_kernel=true runs int4 weights .*--weights int4"):
        lamina.load(tiny_folder, weights="int8", int4_kernel=True)
    with pytest.raises(lamina.ConfigError, match=r"head_topk=16 rescores int4's head \(got weights=None\)"):
        lamina.load(tiny_folder, head_topk=16)
    with pytest.raises(lamina.ConfigError, match=r"head_topk=0 must be >= 1"):
        lamina.load(tiny_folder, weights="int4", head_topk=0)
    why = "the CPU lacks AVX-512 BF16"
    monkeypatch.setattr(int4_cpu, "unavailable_reason", lambda: why)
    monkeypatch.setattr(int4_cpu, "load", lambda build_dir=None, log=None: why)
    with pytest.raises(lamina.ConfigError) as e:
        lamina.load(tiny_folder, weights="int4", int4_kernel=True)
    assert str(e.value) == f"int4_kernel=true: {why}; fix: leave int4_kernel unset (aten's kernel)"
    model = lamina.load(tiny_folder, weights="int4").model
    assert all(m.mv_packed is None for m in model.modules() if isinstance(m, Int4Linear))
