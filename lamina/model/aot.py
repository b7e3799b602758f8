"""An ahead-of-time compiled decode step: one token per row through a decoder, without Python per layer.

``attach_decode_step(model)`` exports a tensor-only step of ``model`` (``DecodeStep``: token ids (B, 1),
their positions, the KV cache's tensors -> logits (B, 1, V), the new keys and values written into the
cache in place) with ``torch.export``, compiles it with AOTInductor (``torch._inductor``: fused C++ kernels
for the small ops between the matmuls, no Python per layer) into a ``.pt2`` package in a folder
``decode-KEY`` under ``compile_cache_dir()/aot``, and attaches it to the model: from then on ``model(ids, cache=cache)`` with
one token per row, no attention mask and no position ids (every decoding step of ``lamina.generate``)
runs the compiled step; prompts and everything else stay eager. The package holds no weights: the
model's own tensors are handed to it at load (``load_constants``), so its key is the architecture (every
tensor's name, shape and dtype, the config, every module's ``repr``), torch's version, the CPU (inductor
builds for the host's instruction set) and lamina's model code (``step_key``); a later process with the
same key loads it in about a second instead of compiling it again (minutes).

The step reads the model's tensors in place: in-place writes (optimizer steps, ``load_state_dict``) are
seen; a tensor or module replaced, deleted or inserted after attaching (``load_state_dict(assign=True)``,
``p.data = t``, ``convert_weights``, ``torch.func.functional_call``, ``ModuleList.insert``) makes the step
stand aside (``CompiledStep.applies``, ``_Binding``: eager decoding until ``attach_decode_step`` binds it
again), and LoRA wrapping and ``.to()`` drop it.

Numerics: the step computes what the eager decode step computes, with inductor's fused kernels (fp32 logits
within ~1e-5 of eager's; bf16 activations within bf16 rounding), and attends over the cache's slots with
the explicit mask of its valid slots (eager skips the mask when no row has padding: the same values).

Supported: decoders with an LM head, pre- or post-norm, RoPE (not dynamic scaling), learned, sinusoidal
or no positions, any weight format of ``lamina.model.quant`` but the prepacked ``fp32`` one, no LoRA;
and the decoders of encoder-decoders (T5's relative bias, the 2017 Transformer's sinusoidal positions;
no copy head): ``EncDecStep`` takes the cross-attention keys and values the first, eager step computed
from the encoder output as inputs, with the source's mask. ``supported(model)`` says why not.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import operator
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lamina.model import int4_cpu
from lamina.model.layers import (
    Attention,
    KVCache,
    _InferenceCopies,
    _same_weights,
    _weights_key,
    inference_copy,
    onednn_available,
    packed_linear,
    prepack,
    rope_tables,
)
from lamina.model.quant import PackedLinear
from lamina.model.transformer import DECODE_STEP, Block, Transformer

STEP_VERSION = "2"  # bump when DecodeStep's computation changes: packages of other versions are not read
_PARTIAL_MAX_AGE_S = 24 * 3600  # a half-written package folder older than this was left by a killed compile


def supported(model: Transformer) -> str | None:
    """None when ``model`` can decode through a compiled step; else why not (one phrase)."""
    cfg = model.config
    if cfg.arch == "encoder-decoder":
        return _enc_dec_unsupported(model) or _weights_unsupported(model)
    if cfg.arch != "decoder" or model.lm_head is None:
        return f"arch={cfg.arch!r} head={cfg.head!r} (a decoder or an encoder-decoder with an LM head only)"
    if cfg.pos_encoding in ("alibi", "relative") or cfg.rope_scaling == "dynamic":
        return f"pos_encoding={cfg.pos_encoding!r} rope_scaling={cfg.rope_scaling!r}"
    if model.copy_head is not None or model.type_emb is not None or model.lm_transform is not None:
        return "a copy head, token types or an LM head transform"
    if cfg.scale_decoder_outputs:
        return "scale_decoder_outputs"
    return _weights_unsupported(model)


def _weights_unsupported(model: Transformer) -> str | None:
    """Why ``model``'s layers or device cannot be exported (None: they can)."""
    if any(type(m).__module__ == "lamina.model.lora" for m in model.modules()):
        return "LoRA adapters (merge them first)"
    if any(isinstance(m, PackedLinear) for m in model.modules()):  # an opaque weight export cannot take
        return (
            "fp32 weights prepacked for oneDNN (convert_weights(..., pack=False), as load(compile=True) does)"
        )
    if model.tok_emb.weight.device.type != "cpu":
        return f"device {model.tok_emb.weight.device} (CPU only)"
    return None


class DecodeStep(nn.Module):
    """The tensor-only decode step of a ``Transformer`` (what ``model(ids, cache=cache)`` computes for one
    token per row, after ``CompiledStep`` did the cache's bookkeeping).

    ``forward(ids, positions, span, valid, kv)``: ``ids`` and ``positions`` (B, 1) long; ``span`` (S, 0)
    carries S, the slots attended (the cache's length after this token) as a shape, so that the graph
    slices the cache symbolically; ``valid`` (B, C) bool, the cache's valid slots (slot S - 1 set);
    ``kv``: the n_layers key tensors then the n_layers value tensors (B, Hkv, C, hd). Writes each layer's
    new key and value at slot S - 1 and returns the logits (B, 1, vocab_size)."""

    inv_freq: Tensor | None

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model
        cfg = model.config
        rope = cfg.pos_encoding == "rope"
        self.register_buffer("inv_freq", model._fp32_table("inv_freq", torch.device("cpu")) if rope else None)
        # int4_cpu's kernel loaded and used by the model: its single-query attention too (opt-in with it)
        self.attn_kernel = int4_cpu.uses_kernel(model) and int4_cpu.attn_loaded()

    def forward(
        self, ids: Tensor, positions: Tensor, span: Tensor, valid: Tensor, kv: list[Tensor]
    ) -> Tensor:
        m = self.model
        S = span.shape[0]
        n = len(m.blocks)
        x = m._embed(ids, positions, None)
        rope = None if self.inv_freq is None else rope_tables(self.inv_freq, positions, x.dtype)
        mask = valid[:, None, None, :S]  # (B, 1, 1, S)
        for i, block in enumerate(m.blocks):
            assert isinstance(block, Block)
            a = block.attn
            k = self.attn_kernel
            if block.pre_norm:
                x = x + _attend(a, block.attn_norm(x), rope, mask, kv[i], kv[n + i], S, k)
                x = x + block.mlp(block.mlp_norm(x))
            else:
                x = block.attn_norm(x + _attend(a, x, rope, mask, kv[i], kv[n + i], S, k))
                x = block.mlp_norm(x + block.mlp(x))
        if m.final_norm is not None:
            x = m.final_norm(x)
        assert m.lm_head is not None
        return m.lm_head(x)  # (B, 1, V); supported() refused the heads _lm_logits transforms first


def _attend(
    a: Attention, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor, k_cache: Tensor,
    v_cache: Tensor, S: int, kernel: bool = False,
) -> Tensor:  # fmt: skip
    """``Attention.forward`` for one token per row with the cache as tensors: x (B, 1, d) -> (B, 1, d).
    ``kernel``: through ``int4_cpu.attn`` (a bool ``mask``; fp32 accumulation as SDPA's), ~2-3x faster
    than aten's flash attention at one query row."""
    B = x.shape[0]
    q, k, v = a._project(x, rope)  # q (B, H, 1, hd), k and v (B, Hkv, 1, hd)
    k_cache.select(2, S - 1).copy_(k[:, :, 0])
    v_cache.select(2, S - 1).copy_(v[:, :, 0])
    keys, values = k_cache[:, :, :S], v_cache[:, :, :S]
    rep = a.n_heads // a.n_kv_heads  # GQA: a KV head's query heads as query rows (as Attention.forward)
    q = q.reshape(B, a.n_kv_heads, rep, a.head_dim)
    if kernel and mask.dtype == torch.bool:  # the scale applied here in fp32 (fused into q's kernel)
        scale = a.head_dim**-0.5 if a.scale is None else a.scale  # None: SDPA's default
        y = int4_cpu.attn(q.float() * scale, keys, values, mask[:, 0, 0])
    else:
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=a.scale)
    return a.o_proj(y.reshape(B, 1, -1))


class CompiledStep:
    """A loaded AOTInductor package of ``DecodeStep`` bound to ``model``'s tensors; called as
    ``step(ids, cache)`` -> logits (B, 1, V) with the cache's bookkeeping (valid slot, position, length)
    done as ``Transformer.hidden_states`` does it. ``runner(ids, positions, span, valid, kv)`` is the
    loaded package (or anything computing ``DecodeStep``'s forward)."""

    step_module: Callable[[Transformer], nn.Module] = DecodeStep  # the module the package was exported from

    def __init__(self, runner: Any, path: Path, constants: dict[str, Tensor], model: Transformer) -> None:
        self.runner, self.path = runner, path
        self.dtype, self.n_layers = model.tok_emb.weight.dtype, len(model.blocks)
        self._constants = constants  # the runner reads these tensors (user-managed): kept alive here
        self._bound = _Binding(self.step_module(model), constants.values())

    @property
    def runner(self) -> Any:
        """The loaded package (or a stand-in), called with the step's inputs."""
        return self._runner

    @runner.setter
    def runner(self, runner: Any) -> None:
        self._runner, self._run = runner, _flat_runner(runner)

    def applies(self, ids: Tensor, cache: KVCache | None) -> bool:
        """Whether this step computes ``model(ids, cache=cache)`` (no mask, no positions given): one token
        per row, a cache of the model's dtype and layer count (not a layer-skip draft's) holding at least
        one slot, no autograd, no autocast, and the model still holding the modules and tensors the step
        was bound to (``_Binding``)."""
        return (
            cache is not None
            and ids.dim() == 2
            and ids.shape[1] == 1
            and cache.length > 0
            and cache.dtype == self.dtype
            and len(cache.k) == self.n_layers
            and self._fits_cross(cache)
            and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")
            and self._bound.holds()
        )

    def _fits_cross(self, cache: KVCache) -> bool:
        """Whether the cache's cross-attention keys are what the package was exported for: none here."""
        return not cache.cross_k

    def __call__(self, ids: Tensor, cache: KVCache) -> Tensor:
        offset = cache.length
        if offset + 1 > cache.capacity:
            raise ValueError(f"KV cache full: {offset} + 1 tokens > capacity {cache.capacity}")
        positions = cache.next_pos[:, None].clone()  # (B, 1)
        cache.valid[:, offset] = True
        cache.positions[:, offset] = positions[:, 0]
        span = torch.empty(offset + 1, 0)
        logits = self._run(ids.contiguous(), positions, span, cache.valid, [*cache.k, *cache.v])
        cache.next_pos = positions[:, 0] + 1
        cache.length = offset + 1
        return logits


class _Binding:
    """What a step was bound to, checked before each step (``holds()``: False once the model no longer
    uses it, when the step would read tensors or run modules the model has dropped):

    - each tensor the step reads (``read``: those sharing a constant's data) with the table
      (``_parameters`` / ``_buffers`` of its module) and name it was found under: the table must still
      hold that tensor object (``table.get(name) is tensor``), and the tensor its data pointer
      (``p.data = t`` keeps the object). Direct table writes are seen too: ``torch.func.functional_call``
      (``torch.nn.utils._named_member_accessor`` writes ``module._parameters[name]``), ``del module.x``;
      ``setattr`` / ``load_state_dict(assign=True)`` replace the object;
    - every ``_modules`` table with children, equal to its copy made at binding (the same names, the same
      module objects: ``nn.Module`` compares by identity): a module swapped, deleted or inserted
      (``ModuleList.insert``, ``ModuleDict.pop``, direct ``_modules`` writes).

    Nothing global (no hooks) and nothing cached between calls: safe with several threads decoding.
    Cost on a 30-layer int4 model (305 tensors, 93 module tables), 1 thread, CPU time under load: ~40 us
    in a tight loop, ~0.3 ms with the caches flushed between calls (a decode loop's case: each step
    streams the weights), of which ~0.2 ms are the data pointers; every table entry walked: ~10% more."""

    def __init__(self, root: nn.Module, read: Iterable[Tensor] = ()) -> None:
        read_ptrs = {t.data_ptr() for t in read}
        self.tables: list[dict[str, Any]] = []
        self.names: list[str] = []
        self.tensors: list[Tensor] = []
        self.modules: list[dict[str, Any]] = []
        for m in root.modules():
            if m._modules:
                self.modules.append(m._modules)
            for table in (m._parameters, m._buffers):
                for name, t in table.items():
                    if t is not None and t.data_ptr() in read_ptrs:
                        self.tables.append(table)
                        self.names.append(name)
                        self.tensors.append(t)
        self.children = [dict(table) for table in self.modules]
        self.pointers = [t.data_ptr() for t in self.tensors]

    def holds(self) -> bool:
        return (
            all(map(operator.is_, map(dict.get, self.tables, self.names), self.tensors))
            and list(map(Tensor.data_ptr, self.tensors)) == self.pointers
            and self.modules == self.children
        )


def _flat_runner(runner: Any) -> Callable[..., Tensor]:
    """``runner`` (an ``aoti_load_package`` model returning one tensor, or a stand-in) as a function of
    the step's inputs (tensors and lists of tensors) returning that tensor. A loaded package's own
    ``__call__`` parses its input and output specs and flattens the inputs with ``torch.utils._pytree``
    each call (~0.1 ms); here the inputs are flattened into a list for its ``boxed_run`` directly (the
    order the spec gives: positional arguments in turn, a list's items in place)."""
    loader = getattr(runner, "loader", None)
    if loader is None or not hasattr(loader, "boxed_run"):
        return runner
    import torch.utils._pytree as pytree

    in_spec, out_spec = (pytree.treespec_loads(s) for s in loader.get_call_spec())
    if not out_spec.is_leaf():
        return runner
    leaves = in_spec.num_leaves

    def run(*args: Any) -> Tensor:
        flat: list[Tensor] = []
        for a in args:
            if isinstance(a, list):
                flat += a
            else:
                flat.append(a)
        if len(flat) != leaves:  # not the exported signature: the package's own call says why
            return runner(*args)
        return loader.boxed_run(flat)[0]

    return run


def attached_step(model: nn.Module) -> CompiledStep | None:
    """The compiled step attached to ``model`` (None: none, or dropped by ``.to()``,
    ``clear_inference_copies``, LoRA wrapping or ``detach_decode_step``)."""
    copies = model.__dict__.get("_inference_copies")
    return None if copies is None else copies.get(DECODE_STEP)


def detach_decode_step(model: nn.Module) -> CompiledStep | None:
    """Take the compiled step off ``model`` (decoding is eager again) and return it (None: none)."""
    copies = model.__dict__.get("_inference_copies")
    return None if copies is None else copies.pop(DECODE_STEP, None)


@contextlib.contextmanager
def decode_step_off(model: nn.Module) -> Iterator[None]:
    """``model`` decodes eagerly inside (its compiled step, if any, is put back after)."""
    step = detach_decode_step(model)
    try:
        yield
    finally:
        if step is not None:
            model.__dict__.setdefault("_inference_copies", _InferenceCopies())[DECODE_STEP] = step


def step_key(model: Transformer) -> str:
    """What decides the compiled code: every tensor's name, shape and dtype, the config, every module's
    ``repr`` (the Python attributes traced into the code, e.g. ``RescoredHead.k``), torch's version, the
    CPU (capability, machine, model name and flags: inductor builds with ``-march=native``),
    ``STEP_VERSION`` and the source of the code it is traced from (not the thread count: the kernels
    take OpenMP's at run time)."""
    step = _step_module(model)
    # and a non-contiguous tensor's strides: the package reads each tensor with the strides it was traced with
    tensors = [(k, list(t.shape), str(t.dtype), *([] if t.is_contiguous() else [list(t.stride())]))
               for k, t in _named_tensors(step).items()]  # fmt: skip
    what = {
        "config": asdict(model.config),
        "tensors": tensors,
        "modules": repr(step),
        "torch": torch.__version__,
        "cpu": [torch.backends.cpu.get_cpu_capability(), platform.machine(), _cpu_digest()],
        "step": STEP_VERSION,
        "code": _code_digest(),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _cpu_digest() -> str:
    """A digest of the first processor's model name and flags in ``/proc/cpuinfo`` ("" where there is none):
    two CPUs with the same capability level can still differ in what ``-march=native`` emits."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""
    first = text.split("\n\n", 1)[0].splitlines()
    wanted = [line for line in first if line.split(":", 1)[0].strip() in ("model name", "flags", "Features")]
    return hashlib.sha256("\n".join(wanted).encode()).hexdigest()[:16]


def _code_digest() -> str:
    """A digest of the source the step is traced from (this module and the model's: layers, transformer,
    quant; int4_cpu, whose ops a package calls), so that a package traced from other code is never loaded."""
    from lamina.model import layers, quant, transformer

    h = hashlib.sha256()
    for module in (sys.modules[__name__], layers, quant, transformer, int4_cpu):
        h.update(Path(module.__file__ or "").read_bytes())
    return h.hexdigest()


def _named_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Parameters and buffers by every name (tied weights under each of their names)."""
    out = {k: p.detach() for k, p in module.named_parameters(remove_duplicate=False)}
    out.update(module.named_buffers(remove_duplicate=False))
    return out


def export_step(model: Transformer, path: Path) -> Path:
    """Export ``model``'s ``DecodeStep`` and compile it with AOTInductor into the folder ``path``: the
    package ``step.pt2`` (its weights left out: see ``load_step``) and the small constants inductor's
    lowerings make (the int4 kernel's group size as a tensor) in ``constants.pt``. Both are written into
    a temporary folder renamed to ``path`` at once; when another process got there first, its folder is
    kept (the same key: the same package). Half-written folders a killed compile left (over a day old) are
    removed. Batch size and cache length are dynamic (up to 4096 rows and 2**20 slots). Minutes on a
    small CPU."""
    from torch._inductor import aoti_compile_and_package
    from torch.export import Dim, export

    cfg = model.config
    assert cfg.n_kv_heads is not None and cfg.head_dim is not None
    B, C, S = 2, 8, 5  # example sizes (not 0 or 1: those would be specialized)
    dtype = model.tok_emb.weight.dtype
    kv = [torch.zeros(B, cfg.n_kv_heads, C, cfg.head_dim, dtype=dtype) for _ in range(2 * len(model.blocks))]
    valid = torch.ones(B, C, dtype=torch.bool)
    ids = torch.zeros(B, 1, dtype=torch.long)
    pos = torch.full((B, 1), S - 1, dtype=torch.long)
    batch, slots = Dim("batch", min=1, max=4096), Dim("slots", min=2, max=2**20)
    span = Dim("span", min=2, max=2**20)
    if cfg.arch == "encoder-decoder":
        ep = _export_enc_dec(model, ids, pos, S, valid, kv, (batch, slots, span))
    else:
        shapes = ({0: batch}, {0: batch}, {0: span}, {0: batch, 1: slots}, [{0: batch, 2: slots}] * len(kv))
        with torch.no_grad():
            ep = export(
                DecodeStep(model).eval(), (ids, pos, torch.empty(S, 0), valid, kv), dynamic_shapes=shapes
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_partial(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=path.parent))
    try:
        with _recording_constants() as made:
            aoti_compile_and_package(
                ep,
                package_path=str(tmp / "step.pt2"),
                inductor_configs={
                    "aot_inductor.package_constants_in_so": False,
                    **int4_cpu.aoti_configs(model),
                },
            )
        torch.save(made, tmp / "constants.pt")
        try:
            os.replace(tmp, path)  # both files appear together
        except OSError:
            if not (path / "step.pt2").is_file():  # not another process's package: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _remove_partial(folder: Path) -> None:
    """Remove the temporary folders of compiles killed before their rename (older than a day: a running
    compile's is minutes old)."""
    for tmp in folder.glob(".partial-*"):
        with contextlib.suppress(OSError):
            if time.time() - tmp.stat().st_mtime > _PARTIAL_MAX_AGE_S:
                shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _recording_constants() -> Iterator[dict[str, Tensor]]:
    """The constants inductor's lowerings add to the graph while this is open (no name given: e.g. the
    int4 kernel's group size, ``torch.tensor(32)``), by the name the package gives them. A package
    without its weights needs them at load; only small ones are taken (a large one could be made from the
    example model's weights, which a later model must not get: refused)."""
    from torch._inductor.graph import GraphLowering

    made: dict[str, Tensor] = {}
    add = GraphLowering.add_tensor_constant

    def record(self: GraphLowering, data: Tensor, name: str | None = None) -> Any:
        box = add(self, data, name)
        if name is None:
            if data.numel() > 16:
                raise RuntimeError(f"inductor made a constant of shape {tuple(data.shape)} (only small ones)")
            made[box.get_name()] = data.detach().clone()
        return box

    GraphLowering.add_tensor_constant = record  # type: ignore[method-assign]
    try:
        yield made
    finally:
        GraphLowering.add_tensor_constant = add  # type: ignore[method-assign]


def load_step(model: Transformer, path: Path) -> CompiledStep:
    """The package folder ``path`` (from ``export_step`` for a model of this key) loaded and bound to
    ``model``'s own tensors (not copied: the package holds none) and its recorded small constants.

    Raises ``RuntimeError`` when the package wants a tensor neither gives; load errors pass through."""
    from torch._inductor import aoti_load_package

    runner = aoti_load_package(str(path / "step.pt2"))
    tensors = _named_tensors(_step_module(model))
    tensors.update(torch.load(path / "constants.pt", weights_only=True))
    missing = [k for k in runner.get_constant_fqns() if k not in tensors]
    if missing:
        raise RuntimeError(
            f"the compiled step {path} wants tensors the model lacks: {', '.join(missing[:3])}"
        )
    constants = {k: tensors[k] for k in runner.get_constant_fqns()}
    runner.load_constants(constants, check_full_update=True, user_managed=True)
    kind = EncDecCompiledStep if model.config.arch == "encoder-decoder" else CompiledStep
    return kind(runner, path, constants, model)


def attach_decode_step(
    model: Transformer,
    cache_dir: Path,
    log: Callable[[str], None] | None = None,
    compile_missing: bool = True,
) -> CompiledStep | None:
    """Compile (or load from ``cache_dir``) ``model``'s decode step and attach it (see the module
    docstring), in the folder ``cache_dir/decode-KEY``. The step reads ``model``'s tensors in place
    (module docstring: what makes it stand aside or drops it). ``log`` gets a line before and after
    compiling a package, and one naming a cached package that fails to load (removed and compiled again).
    ``compile_missing=False``: only a package already in ``cache_dir`` is attached (None when there is
    none; one that fails to load raises ``RuntimeError``): nothing is compiled.

    Raises ``ValueError`` for a model ``supported`` refuses; export or compile errors pass through, and a
    package that fails to load right after compiling raises ``RuntimeError`` naming it."""
    why = supported(model)
    if why is not None:
        raise ValueError(f"no compiled decode step for this model: {why}")
    model.eval()
    path = Path(cache_dir) / f"decode-{step_key(model)}"
    step = None
    if path.is_dir():
        try:
            step = load_step(model, path)
        except Exception as e:  # a damaged package (a full disk, another build): compiled again
            if not compile_missing:
                raise RuntimeError(f"the compiled decode step {path} failed to load: {e}") from e
            if log is not None:
                first = (str(e).strip().splitlines() or [""])[0][:300]
                log(f"the compiled decode step {path} failed to load ({type(e).__name__}: {first}); "
                    "compiling it again")  # fmt: skip
            shutil.rmtree(path, ignore_errors=True)
    if step is None and not compile_missing:
        return None
    if step is None:
        if log is not None:
            log(
                f"compiling the decode step of this model and weight format (once; minutes on a small CPU) into {path}"
            )
        t = time.perf_counter()
        export_step(model, path)
        if log is not None:
            log(f"compiled the decode step in {time.perf_counter() - t:.0f} s")
        try:
            step = load_step(model, path)
        except Exception as e:
            raise RuntimeError(f"the compiled decode step {path} failed to load: {e}") from e
    model.__dict__.setdefault("_inference_copies", _InferenceCopies())[DECODE_STEP] = step
    return step


# -- encoder-decoders (T5, the 2017 Transformer): the decoder's step, the cross-attention keys as inputs --


def _enc_dec_unsupported(model: Transformer) -> str | None:
    """Why the decoder of encoder-decoder ``model`` has no compiled step (None: it has one)."""
    cfg = model.config
    if model.lm_head is None or model.copy_head is not None or model.lm_transform is not None:
        return f"head={cfg.head!r} copy_attention={cfg.copy_attention} (an LM head only)"
    if cfg.pos_encoding in ("alibi", "rope"):
        return f"pos_encoding={cfg.pos_encoding!r} in an encoder-decoder"
    if cfg.pos_encoding == "relative" and cfg.n_kv_heads != cfg.n_heads:
        return "T5's relative bias with grouped KV heads"
    return None


def _step_module(model: Transformer) -> nn.Module:
    """The tensor-only step that is exported for ``model`` (its tensors are the package's constants)."""
    return EncDecStep(model) if model.config.arch == "encoder-decoder" else DecodeStep(model)


class EncDecStep(nn.Module):
    """The tensor-only decoder step of an encoder-decoder ``Transformer``: what ``model.decode(ids, None,
    cache=cache)`` computes for one token per row once the cache holds the cross-attention keys.

    ``forward(ids, positions, span, valid, key_positions, cross_mask, kv)``: as ``DecodeStep`` 's, plus
    ``key_positions`` (B, C) long, the cache's position ids (T5's relative bias, computed once per step
    for all layers), ``cross_mask`` (B, 1, 1, S_src) additive (``KVCache.cross_mask``; zeros without
    padding), and ``kv``: the n self-attention keys, the n values, then the n cross-attention keys and
    the n values (B, Hkv, S_src, hd), computed once from the encoder output (by the eager first step).
    Writes each layer's new key and value at slot S - 1 and returns the logits (B, 1, vocab_size)."""

    head_t: Tensor

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model
        assert model.lm_head is not None
        w = model.lm_head.weight  # the eager step's transposed head copy (Transformer._head_t), shared
        head_t = inference_copy(model, "_head_t", [w], lambda: w.detach().t().contiguous())
        self.register_buffer("head_t", w.detach().t().contiguous() if head_t is None else head_t)
        self.head_key = _weights_key([w])  # the step stands aside once the head's weight changed

    def forward(
        self, ids: Tensor, positions: Tensor, span: Tensor, valid: Tensor, key_positions: Tensor,
        cross_mask: Tensor, kv: list[Tensor],
    ) -> Tensor:  # fmt: skip
        m = self.model
        S, n = span.shape[0], len(m.blocks)
        x = m._embed(ids, positions, None)
        mask = valid[:, None, None, :S]  # (B, 1, 1, S)
        if m.rel_bias is not None:  # as Transformer._attention_mask: the bias where a key is read
            bias = m._relative_bias(m.rel_bias, positions, key_positions[:, :S], bidirectional=False)
            mask = bias.masked_fill(~mask, float("-inf")).to(x.dtype)  # (B, H, 1, S)
        for i, block in enumerate(m.blocks):
            assert isinstance(block, Block) and block.cross_attn is not None and block.cross_norm is not None
            a, c, ck, cv = block.attn, block.cross_attn, kv[2 * n + i], kv[3 * n + i]
            if block.pre_norm:
                x = x + _attend(a, block.attn_norm(x), None, mask, kv[i], kv[n + i], S)
                x = x + _cross_attend(c, block.cross_norm(x), ck, cv, cross_mask)
                x = x + block.mlp(block.mlp_norm(x))
            else:
                x = block.attn_norm(x + _attend(a, x, None, mask, kv[i], kv[n + i], S))
                x = block.cross_norm(x + _cross_attend(c, x, ck, cv, cross_mask))
                x = block.mlp_norm(x + block.mlp(x))
        if m.final_norm is not None:
            x = m.final_norm(x)
        if m.config.scale_decoder_outputs:  # as Transformer._lm_logits (T5 v1.0's tied embeddings)
            x = x * m.config.d_model**-0.5
        assert m.lm_head is not None
        # as Transformer._lm_logits on CPU: (B, d) @ (d, V) stored contiguous, MKL's matrix-vector product,
        # ~2x faster than F.linear's for one row against t5-small's head (the step's largest matmul)
        logits = (x.reshape(x.shape[0], -1) @ self.head_t).view(x.shape[0], 1, -1)
        return logits if m.lm_head.bias is None else logits + m.lm_head.bias


def _cross_attend(a: Attention, x: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """``Attention.cross_forward`` for one token per row with the cached keys: x (B, 1, d) -> (B, 1, d)."""
    B = x.shape[0]
    q = a.q_proj(x).view(B, 1, a.n_heads, a.head_dim).transpose(1, 2)  # (B, H, 1, hd)
    y = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, enable_gqa=a.n_heads > a.n_kv_heads, scale=a.scale
    )
    return a.o_proj(y.transpose(1, 2).reshape(B, 1, -1))


def _export_enc_dec(
    model: Transformer, ids: Tensor, pos: Tensor, S: int, valid: Tensor, kv: list[Tensor],
    dims: tuple[Any, Any, Any],
) -> Any:  # fmt: skip
    """``torch.export`` of ``EncDecStep`` with ``export_step`` 's example inputs and dims (batch, slots,
    span), the source length dynamic too."""
    from torch.export import Dim, export

    cfg = model.config
    assert cfg.n_kv_heads is not None and cfg.head_dim is not None
    batch, slots, span = dims
    B, C = valid.shape
    S_src = 6
    cross = [torch.zeros(B, cfg.n_kv_heads, S_src, cfg.head_dim, dtype=kv[0].dtype) for _ in kv]
    cross_mask = torch.zeros(B, 1, 1, S_src, dtype=kv[0].dtype)
    key_pos = torch.arange(C).expand(B, C).contiguous()
    source = Dim("source", min=2, max=2**20)
    shapes = (
        {0: batch}, {0: batch}, {0: span}, {0: batch, 1: slots}, {0: batch, 1: slots}, {0: batch, 3: source},
        [{0: batch, 2: slots}] * len(kv) + [{0: batch, 2: source}] * len(cross),
    )  # fmt: skip
    args = (ids, pos, torch.empty(S, 0), valid, key_pos, cross_mask, [*kv, *cross])
    with torch.no_grad():
        return export(EncDecStep(model).eval(), args, dynamic_shapes=shapes)


class EncDecCompiledStep(CompiledStep):
    """``CompiledStep`` for an encoder-decoder's decoder: called as ``step(ids, cache)`` once ``cache``
    holds the cross-attention keys (the first, eager step computes them from the encoder output)."""

    step_module = EncDecStep

    def __init__(self, runner: Any, path: Path, constants: dict[str, Tensor], model: Transformer) -> None:
        super().__init__(runner, path, constants, model)
        assert model.lm_head is not None
        self._head = model.lm_head  # EncDecStep's transposed head copy is current while its weight is
        self._head_key = _weights_key([model.lm_head.weight])

    def applies(self, ids: Tensor, cache: KVCache | None) -> bool:
        """As ``CompiledStep.applies``, for a cache holding one layer of cross-attention keys per block
        over a source of at least 2 slots (the package was exported for ``Dim("source", min=2)``: a
        one-token source, or ``keep`` trimming the cross keys to one slot, decodes eagerly)."""
        return (
            super().applies(ids, cache)
            and self._head is not None
            and _same_weights(self._head_key, [self._head.weight])  # its transposed copy is current
        )

    def _fits_cross(self, cache: KVCache) -> bool:
        return len(cache.cross_k) == self.n_layers and cache.cross_k[0].shape[2] >= 2

    def __call__(self, ids: Tensor, cache: KVCache) -> Tensor:
        offset = cache.length
        if offset + 1 > cache.capacity:
            raise ValueError(f"KV cache full: {offset} + 1 tokens > capacity {cache.capacity}")
        for kv in (cache.cross_k, cache.cross_v):  # the package reads them as laid out when exported
            for i, t in enumerate(kv):
                if not t.is_contiguous():
                    kv[i] = t.contiguous()
        cross = cache.cross_mask(self.dtype)
        if cross is None:  # no padded source slot: nothing masked
            B, S_src = cache.cross_k[0].shape[0], cache.cross_k[0].shape[2]
            cross = torch.zeros(B, 1, 1, S_src, dtype=self.dtype)
        positions = cache.next_pos[:, None].clone()  # (B, 1)
        cache.valid[:, offset] = True
        cache.positions[:, offset] = positions[:, 0]
        span = torch.empty(offset + 1, 0)
        kv = [*cache.k, *cache.v, *cache.cross_k, *cache.cross_v]
        logits = self._run(ids.contiguous(), positions, span, cache.valid, cache.positions, cross, kv)
        cache.next_pos = positions[:, 0] + 1
        cache.length = offset + 1
        return logits


# -- generation copies (GRPO's grpo.compile_generation): oneDNN's linear on prepacked weights in the step --


class StepLinear(nn.Module):
    """An ``nn.Linear`` of a generation copy (same ``weight`` and ``bias`` tensors) whose exported forward
    (the compiled decode step) is oneDNN's linear (``layers.packed_linear``) on a prepacked copy of its
    weight, the ``packed`` constant of the step, bound by ``PackedBinding.bind`` after each refresh
    (exported with the dense weight's shape as placeholder); eager forwards (prompts) are ``F.linear``.
    oneDNN's prepacked fp32 matmul reads these small weights ~1.3-1.6x faster than MKL's for a few rows
    (the eager decode step's ``layers.inference_linear`` uses it too). Defined here, so that
    ``step_key``'s code digest covers its forward."""

    weight: Tensor
    bias: Tensor | None
    packed: Tensor

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        # a placeholder of its own (export lifts tensors sharing storage as one constant); never written,
        # so its pages are never touched (no memory in practice)
        w = linear.weight
        self.register_buffer("packed", torch.empty(w.shape, dtype=w.dtype, device=w.device), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_exporting():
            return packed_linear(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def step_linears(model: nn.Module) -> dict[str, StepLinear]:
    """Every float32 ``nn.Linear`` of ``model`` (a generation copy on CPU) replaced by a ``StepLinear``
    (its tensors kept), by name; none where oneDNN is unavailable."""
    swapped: dict[str, StepLinear] = {}
    if not onednn_available():
        return swapped
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu":
            parent, _, child = name.rpartition(".")
            swapped[name] = StepLinear(m)
            setattr(model.get_submodule(parent) if parent else model, child, swapped[name])
    return swapped


class PackedBinding:
    """The prepacked weights of a generation copy's ``StepLinear`` s, bound to its compiled step:
    ``bind(step)`` packs the weights that changed since the last call (``layers._same_weights``: the
    same tensor object, version counter, data pointer and dtype) and hands the step every packed tensor
    (``load_constants``, user-managed: this object keeps them alive)."""

    def __init__(self, linears: dict[str, StepLinear]) -> None:
        self.linears = linears
        self.packed: dict[str, Tensor] = {}
        self.seen: dict[str, tuple] = {}

    def bind(self, step: Any) -> None:
        with torch.no_grad():
            for name, m in self.linears.items():
                key = self.seen.get(name)
                if key is None or not _same_weights(key, [m.weight]):
                    self.packed[f"model.{name}.packed"] = prepack(m.weight.detach().contiguous())
                    self.seen[name] = _weights_key([m.weight])
        step.runner.load_constants(self.packed, check_full_update=False, user_managed=True)
