"""``lamina.load(MODEL)``: any model lamina can read (lamina folder, HF folder, GGUF file), by path or name."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lamina.checkpoint.eos import eos_token_ids
from lamina.checkpoint.gguf import gguf_to_hf, read_gguf
from lamina.checkpoint.hf import config_from_hf, read_hf_folder, state_dict_from_hf
from lamina.checkpoint.lamina import build_model, load_checkpoint
from lamina.checkpoint.registry import ModelEntry, lamina_home, resolve
from lamina.config import GenerationConfig, from_dict
from lamina.errors import CheckpointError, ConfigError, TokenizerError
from lamina.model import aot, int4_cpu
from lamina.model.quant import FORMATS, WeightFormat, convert_weights, use_int4_kernel
from lamina.model.transformer import Transformer
from lamina.tokenizer import Tokenizer


@dataclass
class LoadOptions:
    """How ``load`` prepares a model for inference (the ``--dtype/--weights/--compile/--int4-kernel/
    --head-topk/--threads`` flags)."""

    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # weights dtype when --weights is not given
    # convert the weights for inference: int4 (4-bit groups of 32, GGUF Q4_1's layout) decodes fastest
    # on CPU, then int8, then bf16; overrides dtype (none: the checkpoint's weights in dtype)
    weights: WeightFormat | None = None
    # decode through an ahead-of-time compiled step (lamina.model.aot): minutes of compiling the first time
    # for a model architecture and weight format, kept in compile_cache_dir() ($LAMINA_COMPILE_CACHE, else
    # compile/ in lamina's data directory), about a second to load after; prompts stay eager. Unset: the
    # compiled step when the cache already holds it for this model, weight format and CPU (it pays then:
    # int4 SmolLM2 decodes 1.6-2.4x eager's tokens/s), else eager; true: compile it if missing; false:
    # eager. Models the step does not cover (ALiBi, a copy head, LoRA, prepacked fp32) stay eager unless
    # true: torch.compile then (every start traces)
    compile: bool | None = None
    # int4: decode steps (and prompts of fewer than 64 tokens a row) through lamina's AVX-512 BF16 kernel
    # (lamina.model.int4_cpu; outputs equal aten's up to one bf16 rounding; built once into
    # compile_cache_dir()/int4: a C++ compiler and ninja, the kernels extra). Unset: used where it can be
    # (x86-64 Linux with AVX-512 BF16, the build works), else aten's kernel; no row limit: it was not
    # slower at 1 or 8 rows (eager SmolLM2 through the engine, 1 thread: 1.17x and 1.47x aten's tokens/s;
    # 2 threads: 1.23x and 1.29x; under load, A/B in one process); true: an error where it cannot be;
    # false: aten's
    int4_kernel: bool | None = None
    # int4: score the vocabulary with an int4 copy of the output head and rescore each position's k best
    # with the int8 head (RescoredHead: about half the head's time; the other logits keep int4's error)
    head_topk: int | None = None
    threads: int | None = None  # torch CPU threads of this process (None: torch's choice, one per core)

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads={self.threads} must be >= 1 (or unset: torch's choice)")
        check_int4_options(self.weights, self.int4_kernel, self.head_topk)


def check_int4_options(weights: str | None, int4_kernel: bool | None, head_topk: int | None) -> None:
    """Raise ``ConfigError`` when ``int4_kernel=True`` or ``head_topk`` is given without ``weights="int4"``,
    or ``head_topk`` is under 1."""
    if int4_kernel and weights != "int4":
        raise ConfigError(
            f"int4_kernel=true runs int4 weights (got weights={weights!r}): add --weights int4 or drop it"
        )
    if head_topk is not None and weights != "int4":
        raise ConfigError(
            f"head_topk={head_topk} rescores int4's head (got weights={weights!r}): add --weights int4 or "
            "drop it"
        )
    if head_topk is not None and head_topk < 1:
        raise ConfigError(f"head_topk={head_topk} must be >= 1 (or unset: the int8 head)")


@dataclass
class LoadedModel:
    """A model with everything needed to use it: tokenizer, default decoding controls, where it came from."""

    model: Transformer
    tokenizer: Tokenizer | None
    generation: GenerationConfig
    entry: ModelEntry


def load(
    model: str | os.PathLike[str],
    dtype: torch.dtype | str = LoadOptions.dtype,
    device: torch.device | str = "cpu",
    weights: str | None = LoadOptions.weights,
    compile: bool | None = LoadOptions.compile,
    int4_kernel: bool | None = LoadOptions.int4_kernel,
    head_topk: int | None = LoadOptions.head_topk,
) -> LoadedModel:
    """Load MODEL (a path, a name in the models directory, or a packaged short name such as ``smollm2``).

    ``weights`` converts the model for inference to a weight format of ``lamina.model.quant.FORMATS``
    ("fp32", "bf16", "int8" and "int4" weight-only, "w8a8"); it then decides the dtype (the integer
    formats quantize the fp32 weights). ``compile`` makes the decoding steps (one token per row with a
    KV cache) run an ahead-of-time compiled step (``lamina.model.aot.attach_decode_step``): compiled the
    first time (minutes for SmolLM2 on 2 cores) into ``compile_cache_dir()``, loaded in about a second
    by later processes. A model the step does not cover runs ``model(...)`` through ``torch.compile``
    instead (dynamic shapes; each process traces again). When the step cannot be built, one line on
    stderr says why and the model decodes eagerly. ``compile=None`` (the default) attaches the step only
    when the cache already holds it (``attach_cached_step``: loading it takes about a second, nothing
    is compiled); ``False`` never.

    ``int4_kernel`` and ``head_topk`` (``weights="int4"`` only) are ``LoadOptions``' fields of the same
    names: lamina's int4 kernel (None: where it can run) and the rescored output head; see
    ``prepare_for_inference``, which converts the loaded model.

    ``generation.eos_token_ids`` holds every end-of-generation id the checkpoint names (generation
    files, config.json, GGUF eos/eot/eom, the tokenizer's eos, the chat template's end of turn; see
    ``lamina.checkpoint.eos``), so a chat reply stops at the end of its turn. ``generation`` also holds
    the checkpoint's decoding defaults: lamina's generation.yaml, a HF folder's generation_config.json
    (``hf_decoding_defaults``), a GGUF file's ``general.sampling.*`` (``gguf_decoding_defaults``).
    Raises ``CheckpointError`` when a generation file cannot be read or holds an invalid value;
    ``ConfigError`` for an unknown weight format, ``int4_kernel=True`` or ``head_topk`` without int4
    weights, and ``int4_kernel=True`` where the kernel cannot run.
    """
    if weights is not None and weights not in FORMATS:
        raise ConfigError(f"weight format {weights!r} is not one of {', '.join(FORMATS)}")
    check_int4_options(weights, int4_kernel, head_topk)
    entry = resolve(model)
    dt = torch.float32 if weights is not None else torch_dtype(dtype)
    if entry.format == "lamina":
        net, gen = load_checkpoint(entry.path, dtype=dt, device=device)
        tok = _tokenizer_of(entry)
        gen = replace(gen, eos_token_ids=_in_vocab(eos_token_ids(gen.eos_token_ids, tokenizer=tok), net))
        net = prepare_for_inference(net, weights, compile, int4_kernel, head_topk)
        return LoadedModel(net, tok, gen, entry)
    hf_gen: dict[str, Any] = {}
    if entry.format == "gguf":
        gf = read_gguf(entry.path)
        hf, sd = gguf_to_hf(gf)
        tok = _tokenizer_of(entry, gf.metadata)
        defaults, source = gguf_decoding_defaults(gf.metadata), f"{entry.path} (general.sampling.*)"
    else:
        hf, sd = read_hf_folder(entry.path)
        tok = _tokenizer_of(entry)
        gen_file = entry.path / "generation_config.json"
        hf_gen = _read_generation_config(gen_file) if gen_file.is_file() else {}
        defaults, source = hf_decoding_defaults(hf_gen), str(gen_file)
    cfg = config_from_hf(hf)
    net = build_model(cfg, state_dict_from_hf(hf, sd, cfg), dtype=dt, device=device)
    eos = _in_vocab(eos_token_ids(hf_gen.get("eos_token_id"), hf.get("eos_token_id"), tokenizer=tok), net)
    try:
        gen = from_dict(GenerationConfig, {**defaults, "eos_token_ids": eos})
    except ConfigError as e:
        raise CheckpointError(f"{source}: decoding default {e}; fix or delete the value") from None
    net = prepare_for_inference(net, weights, compile, int4_kernel, head_topk)
    return LoadedModel(net, tok, gen, entry)


def load_tokenizer(model: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer of MODEL without its weights: the one resolver every verb uses.

    MODEL is a ``tokenizer.json``, a folder holding one (a lamina checkpoint, a Hugging Face model folder,
    a saved tokenizer), or anything :func:`load` takes (``smollm2``, a name in the models directory, a
    ``.gguf``, whose tokenizer is built from its metadata: the tensors are not read).

    Raises:
        ModelNotFoundError: MODEL is none of these.
        TokenizerError: the model has no tokenizer (a folder without ``tokenizer.json``, a GGUF without
            tokenizer metadata) or its tokenizer files cannot be read.
    """
    path = Path(model)
    if (path.is_file() and path.suffix == ".json") or (path.is_dir() and (path / "tokenizer.json").is_file()):
        return Tokenizer.from_file(path)
    entry = resolve(model)
    tok = _tokenizer_of(entry)
    if tok is None:
        raise TokenizerError(
            f"model {os.fspath(model)!r} ({entry.path}) has no tokenizer.json; fix: pass a tokenizer "
            "explicitly (a tokenizer.json or a folder holding one)"
        )
    return tok


def _tokenizer_of(entry: ModelEntry, gguf_metadata: Mapping[str, Any] | None = None) -> Tokenizer | None:
    """The tokenizer stored with a resolved model (GGUF: from its metadata, read here unless given)."""
    if entry.format == "gguf":
        return Tokenizer.from_gguf_metadata(
            read_gguf(entry.path).metadata if gguf_metadata is None else gguf_metadata
        )
    return Tokenizer.from_file(entry.path) if (entry.path / "tokenizer.json").is_file() else None


def compile_cache_dir() -> Path:
    """Where ``--compile`` keeps its compiled artefacts between runs: ``$LAMINA_COMPILE_CACHE``, else
    ``compile/`` in lamina's data directory (``lamina_home()``: ``~/.cache/lamina/compile`` by default).
    A ``TORCHINDUCTOR_CACHE_DIR`` set by the user takes precedence (``use_compile_cache``)."""
    if env := os.environ.get("LAMINA_COMPILE_CACHE"):
        return Path(env).expanduser()
    return lamina_home() / "compile"


def use_compile_cache() -> Path | None:
    """Point inductor's on-disk cache at ``compile_cache_dir()`` unless the user chose one
    (``TORCHINDUCTOR_CACHE_DIR`` set: kept). Returns the directory the cache uses, or None when lamina's
    cannot be made (an unwritable home): then one line on stderr, and torch compiles without lamina's
    persistent caches (in its own default directory).

    Sets ``TORCHINDUCTOR_CACHE_DIR`` for this process (inductor reads it when it first needs its cache,
    and any later compile in the process caches there too). Inductor's FX graph cache and the AOTAutograd
    cache are turned on only for lamina's own compile (``_compile_with_caches``)."""
    if user := _user_inductor_cache():
        return Path(user)
    path = compile_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"lamina: --compile without its cache: cannot make {path} ({e.strerror or e}); set "
              "LAMINA_COMPILE_CACHE to a writable directory", file=sys.stderr)  # fmt: skip
        return None
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


def _user_inductor_cache() -> str | None:
    """``TORCHINDUCTOR_CACHE_DIR`` when the user chose it: inductor writes its own default there when it
    first needs a directory (importing parts of torch._dynamo does), and that is no one's choice."""
    value = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not value:
        return None
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # an older torch: a value set is the user's
        return value
    return None if os.path.abspath(value) == os.path.abspath(default_cache_dir()) else value


def _compile_with_caches(
    gm: torch.fx.GraphModule,
    example_inputs: list[torch.Tensor],
    *,
    config_patches: dict[str, Any] | None = None,
) -> Any:
    """torch.compile's inductor backend with its FX graph cache (generated kernels) and the AOTAutograd
    cache (traced graphs) on, for this compile only, so that a later process compiling the same graphs
    reads them instead of generating them again (an environment variable forcing either off still wins)."""
    import torch._functorch.config as functorch_config
    from torch._inductor.compile_fx import compile_fx

    with functorch_config.patch(enable_autograd_cache=True):
        return compile_fx(
            gm, example_inputs, config_patches={**(config_patches or {}), "fx_graph_cache": True}
        )


def prepare_for_inference(
    net: Transformer,
    weights: str | None = LoadOptions.weights,
    compile: bool | None = LoadOptions.compile,
    int4_kernel: bool | None = LoadOptions.int4_kernel,
    head_topk: int | None = LoadOptions.head_topk,
    fuse: bool = True,
) -> Transformer:
    """What ``load`` does to the model it read (in place; returns ``net``): converted to weight format
    ``weights`` (``convert_weights``; fp32 prepacked for oneDNN unless compiled: inductor cannot lower
    that; ``fuse=False`` keeps q/k/v and gate/up apart, for adapters), int4's rescored head
    (``head_topk``), int4's kernel (``use_int4_kernel_or_explain``), then the compiled decode step
    (``compile_model``), in that order: the step calls the kernel it was traced with.

    Raises ``ConfigError`` as ``load`` does (``check_int4_options``, an ``int4_kernel=True`` that cannot
    run) and as ``convert_weights`` does (a model already converted)."""
    check_int4_options(weights, int4_kernel, head_topk)
    if weights is not None:
        convert_weights(net, weights, fuse=fuse, pack=not compile, head_topk=head_topk or 0)
    if weights == "int4":
        use_int4_kernel_or_explain(net, int4_kernel)
    if compile:
        compile_model(net)
    elif compile is None:
        attach_cached_step(net)
    return net


def attach_cached_step(net: Transformer) -> bool:
    """``compile`` unset: attach ``net``'s compiled decode step when ``compile_cache_dir()`` already holds
    it (``aot.attach_decode_step(..., compile_missing=False)``: about a second), else leave ``net`` eager;
    nothing is compiled. A cached package that fails to load: one line on stderr, eager decoding.
    Returns whether a step was attached."""
    path = compile_cache_dir() / "aot"
    if not path.is_dir() or aot.supported(net) is not None:
        return False
    try:
        return aot.attach_decode_step(net, path, compile_missing=False) is not None
    except Exception as e:  # a damaged package: --compile would compile it again
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"lamina: decoding eagerly: {first} (--compile compiles it again)", file=sys.stderr)
        return False


def use_int4_kernel_or_explain(net: nn.Module, int4_kernel: bool | None = LoadOptions.int4_kernel) -> None:
    """``int4_kernel`` (``LoadOptions``) on an int4 model: False leaves aten's kernel; None takes lamina's
    (``quant.use_int4_kernel``: built on the first use, one line on stderr then) where it can run, else
    quietly aten's; True takes it or raises ``ConfigError`` naming why not and the fix."""
    if int4_kernel is False:
        return
    why = use_int4_kernel(net, log=lambda line: print(f"lamina: {line}", file=sys.stderr))
    if why is not None and int4_kernel:
        build = "" if int4_cpu.unavailable_reason() else "a C++ compiler and ninja (lamina[kernels]), or "
        raise ConfigError(f"int4_kernel=true: {why}; fix: {build}leave int4_kernel unset (aten's kernel)")


def compile_model(net: Transformer) -> None:
    """What ``compile=True`` does to a loaded (converted) model: the compiled decode step of
    ``lamina.model.aot`` where it covers the model (``attach_decode_step_or_warn``), else ``torch.compile``
    (dynamic: the KV cache and the batch change shape from step to step; inductor's caches in
    ``compile_cache_dir()``)."""
    if aot.supported(net) is None:
        attach_decode_step_or_warn(net)
        return
    cached = use_compile_cache() is not None
    net.compile(backend=_compile_with_caches if cached else "inductor", dynamic=True)


def attach_decode_step_or_warn(net: Transformer) -> None:
    """``--compile`` for the models ``lamina.model.aot`` covers (``aot.supported(net)`` is None): its
    compiled decode step, from ``compile_cache_dir()/aot`` or compiled into it; on failure (an unwritable
    cache directory, a failed compile) one line on stderr, and eager decoding."""
    path = compile_cache_dir() / "aot"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"lamina: --compile: cannot make {path} ({e.strerror or e}); decoding without it (set "
              "LAMINA_COMPILE_CACHE to a writable directory)", file=sys.stderr)  # fmt: skip
        return
    use_compile_cache()  # inductor's own working files in lamina's directory too (made just above)
    try:
        aot.attach_decode_step(net, path, log=lambda line: print(f"lamina: {line}", file=sys.stderr))
    except Exception as e:  # torch.export / AOTInductor on an op or build it does not handle
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        print(f"lamina: --compile: the compiled decode step failed ({type(e).__name__}: {first}); "
              "decoding eagerly", file=sys.stderr)  # fmt: skip


def _read_generation_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not a JSON object ({e}); fix or delete the file") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object; fix or delete the file")
    return data


# generation_config.json keys (transformers' GenerationConfig) read as the model's decoding defaults
_HF_SAMPLING_KEYS = ("temperature", "top_k", "top_p", "typical_p", "min_p")  # only when it samples
_HF_KEYS = ("repetition_penalty", "no_repeat_ngram_size", "max_new_tokens", "min_new_tokens")


def hf_decoding_defaults(gen: Mapping[str, Any]) -> dict[str, Any]:
    """The decoding defaults of a HF ``generation_config.json`` (``gen``), as GenerationConfig fields.

    ``temperature``, ``top_k``, ``top_p``, ``typical_p`` and ``min_p`` are read as vLLM reads them (its
    ``generation_config="auto"``), unless ``do_sample`` is false: then decoding is greedy
    (``temperature=0``) and they are ignored, as transformers ignores them. ``repetition_penalty``,
    ``no_repeat_ngram_size``, ``max_new_tokens`` and ``min_new_tokens`` apply either way. ``max_length``
    is not read: it counts the prompt too (transformers' default is 20), and lamina's budget counts only
    new tokens, bounded by the context window. Keys that are absent or null keep lamina's defaults, so a
    file with only token ids gives ``{}`` (then the verbs' own defaults apply; see ``model_defaults``).
    """
    greedy = gen.get("do_sample") is False
    keys = _HF_KEYS if greedy else _HF_SAMPLING_KEYS + _HF_KEYS
    out = {k: gen[k] for k in keys if gen.get(k) is not None}
    if greedy:
        out["temperature"] = 0.0
    return out


# GGUF general.sampling.* keys (llama.cpp's sampling defaults of a model) -> GenerationConfig fields
_GGUF_SAMPLING_KEYS = {
    "temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
    "xtc_probability": "xtc_probability", "xtc_threshold": "xtc_threshold",
    "penalty_repeat": "repetition_penalty", "penalty_last_n": "repetition_penalty_last_n",
    "mirostat": "mirostat", "mirostat_tau": "mirostat_tau", "mirostat_eta": "mirostat_eta",
}  # fmt: skip


def gguf_decoding_defaults(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The decoding defaults a GGUF file states (``general.sampling.temp``, ``.top_k``, ...; llama.cpp
    reads the same keys), as GenerationConfig fields; ``general.sampling.sequence`` is not read."""
    found = {f: metadata.get(f"general.sampling.{k}") for k, f in _GGUF_SAMPLING_KEYS.items()}
    return {f: v for f, v in found.items() if v is not None}


def _in_vocab(ids: list[int], net: Transformer) -> list[int]:
    """The ids the model can generate (a file may name a token past the embedding)."""
    return [i for i in ids if 0 <= i < net.config.vocab_size]


def torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The torch dtype a ``dtype`` setting names (``fp32``/``bf16``/``fp16`` or torch's names); raises
    ``ConfigError`` for another name."""
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}  # fmt: skip
    if dtype not in table:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(table)}")
    return table[dtype]
