"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv:2106.09685) on lamina's linear layers.

``apply_lora(model, LoraConfig(...))`` freezes every parameter of ``model`` and wraps the linear layers
that ``target_modules`` names in ``LoraLinear``: ``y = base(x) + scaling * B(A(dropout(x)))`` with
``A`` (r, in), ``B`` (out, r) and ``scaling = lora_alpha / r`` (rsLoRA, Kalajdzievski 2023: ``lora_alpha
/ sqrt(r)``). Only ``A`` and ``B`` require grad, so only they get gradients and optimizer state. The
names and semantics are PEFT's (``peft.LoraConfig``, ``peft.tuners.lora.layer.Linear``): a wrapped layer
holds ``base_layer``, ``lora_A`` and ``lora_B``, so ``blocks.0.attn.q_proj.lora_A.weight`` is PEFT's
``...self_attn.q_proj.lora_A.weight`` (``lamina.checkpoint.peft`` writes and reads PEFT's files).

QLoRA-style (Dettmers et al. 2023, arXiv:2305.14314, with lamina's own formats instead of NF4):
``LoraConfig(base_weights="int8" | "int4")`` (or "bf16") first converts the frozen base to lamina's weight-only
int8 / int4 linears (``lamina.model.quant``; bf16 activations) and puts fp32 adapters on top
(``modules_to_save``, trained in full, stay fp32 and take fp32 inputs). Gradients reach the inputs of a
quantized layer through the layer's own backward, which dequantizes its weight on the fly
(``lamina.model.quant._FrozenMatmul``), so no dequantized weight is kept between forward and backward. The
fp32 base weights are kept out of memory (a temporary file, memory-mapped: pages are read only when a
checkpoint is written), so a trained QLoRA model saves its checkpoint with the fp32 base and a PEFT adapter for it
(``base_state_dict``), exactly as a LoRA run over the fp32 base does.

``merge_lora`` adds ``scaling * B @ A`` into the base weights (``unload=True`` then replaces each wrapper
by its merged ``nn.Linear``, PEFT's ``merge_and_unload``); ``unmerge_lora`` subtracts it again. A wrapped
model decodes with the KV-cache engine as it is (merged or not).

Serving several adapters over one base (vLLM's multi-LoRA, PEFT's mixed adapter batches):
``add_multi_adapter`` puts adapter 1, 2, ... on the base as ``MultiLoraLinear`` layers, and inside
``select_adapters(layers, rows)`` each batch row gets its own adapter's update (row adapter 0: the base
alone). The engine sets the rows' adapters around every forward (``Engine.submit(..., adapter=k)``).
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import itertools
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lamina.errors import ConfigError
from lamina.model.aot import detach_decode_step
from lamina.model.layers import MLP, Attention, _same_weights, _weights_key
from lamina.model.quant import Int4Linear, Int8Linear, convert_weights
from lamina.model.transformer import Transformer

ALL_LINEAR = "all-linear"  # target_modules shorthand: every linear layer of the blocks (not the output head)
_BASE_TYPES = (nn.Linear, Int8Linear, Int4Linear)


@dataclass
class LoraConfig:
    """Which layers get adapters and how (PEFT's ``LoraConfig`` field names and meanings)."""

    r: int = 8  # rank of the adapters: A is (r, in_features), B is (out_features, r)
    lora_alpha: float = 8.0  # the update B @ A is scaled by lora_alpha / r (rsLoRA: lora_alpha / sqrt(r))
    lora_dropout: float = 0.0  # dropout on the adapter's input while training
    # module name globs ('attn.q_proj', 'q_proj', 'blocks.0.mlp.*'), or 'all-linear' (every linear of the blocks)
    target_modules: list[str] = field(default_factory=lambda: [ALL_LINEAR])
    use_rslora: bool = False  # rank-stabilized LoRA: scale by lora_alpha / sqrt(r) instead of lora_alpha / r
    # true: A Kaiming-uniform, B zero (PEFT's default: starts as the base); gaussian: A ~ N(0, 1/r), B zero; false: both random
    init_lora_weights: bool | Literal["gaussian"] = True
    bias: Literal["none"] = "none"  # biases stay frozen (PEFT's "none"; the only choice lamina offers)
    # QLoRA: the frozen base in this format (int8/int4 weight-only, bf16 activations; TRL's load_in_8bit/_4bit) under fp32 adapters
    base_weights: Literal["bf16", "int8", "int4"] | None = None
    # modules trained in full and saved with the adapter (PEFT's modules_to_save), by name glob ('task_head');
    # a reward model's head is added by finetune --task reward, as PEFT adds its SEQ_CLS head
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if self.r < 1:
            raise ConfigError(f"r={self.r}: the adapters' rank must be >= 1")
        if self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha={self.lora_alpha} must be > 0 (PEFT's default: 8)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout={self.lora_dropout} must be in [0, 1)")
        if not self.target_modules:
            raise ConfigError(
                "target_modules is empty: name module globs such as 'attn.q_proj', or 'all-linear'"
            )
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ConfigError(f"init_lora_weights={self.init_lora_weights!r}: use true, false or gaussian")
        if self.bias != "none":
            raise ConfigError(f"bias={self.bias!r}: lamina's adapters train no bias (use 'none')")
        if self.base_weights not in (None, "bf16", "int8", "int4"):
            raise ConfigError(f"base_weights={self.base_weights!r}: use bf16, int8, int4 or none")

    @property
    def scaling(self) -> float:
        """The factor on ``B @ A``: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraLinear(nn.Module):
    """``base_layer(x) + scaling * lora_B(lora_A(dropout(x)))``: (..., in) -> (..., out) in x's dtype.

    ``base_layer`` is an ``nn.Linear`` or a frozen ``Int8Linear`` / ``Int4Linear``; ``lora_A`` (r, in)
    and ``lora_B`` (out, r) are fp32. ``merged`` says the update is inside ``base_layer.weight`` (the
    adapter branch is then skipped)."""

    def __init__(self, base_layer: nn.Module, cfg: LoraConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features: int = base_layer.in_features  # type: ignore[assignment]
        self.out_features: int = base_layer.out_features  # type: ignore[assignment]
        self.r, self.scaling = cfg.r, cfg.scaling
        device = next(itertools.chain(base_layer.parameters(), base_layer.buffers())).device
        self.lora_A = nn.Linear(self.in_features, cfg.r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(cfg.r, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout: nn.Module = nn.Dropout(cfg.lora_dropout) if cfg.lora_dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False  # True inside ``disable_adapters``: the base layer alone
        self.reset_lora_parameters(cfg.init_lora_weights)

    def reset_lora_parameters(self, init: bool | str) -> None:
        """PEFT's initialisations: True (A Kaiming-uniform, B zero), "gaussian" (A ~ N(0, 1/r), B zero),
        False (both Kaiming-uniform, as ``nn.Linear``: the adapter changes the output from the start)."""
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            if init is False:
                nn.init.kaiming_uniform_(self.lora_B.weight, a=math.sqrt(5))
            else:
                nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> Tensor:
        """``scaling * B @ A`` (out, in) in fp32: what merging adds to the base weight."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out) in x's dtype."""
        y = self.base_layer(x)  # a frozen Int8Linear / Int4Linear passes gradients to x by itself
        if self.merged or self.disabled:
            return y
        a = self.lora_A.weight
        h = F.linear(F.linear(self.lora_dropout(x).to(a.dtype), a), self.lora_B.weight)
        return y + (h * self.scaling).to(y.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"


def _targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the linear layers ``patterns`` select (globs matched against the full name or its tail)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, _BASE_TYPES) and ".lora_" not in n]
    in_blocks = [n for n in linears if n.startswith("blocks.")]
    chosen: set[str] = set()
    for pat in patterns:
        if pat == ALL_LINEAR:
            hits = in_blocks
        else:
            hits = [n for n in linears if fnmatch.fnmatchcase(n, pat) or fnmatch.fnmatchcase(n, "*." + pat)]
        if not hits:
            examples = sorted({n.split(".", 2)[-1] for n in in_blocks})
            raise ConfigError(
                f"target_modules={pat!r} matches no linear layer; use '{ALL_LINEAR}' or globs over names "
                f"such as {', '.join(examples[:7])}"
            )
        chosen.update(hits)
    return sorted(chosen, key=linears.index)


def apply_lora(model: Transformer, cfg: LoraConfig) -> Transformer:
    """Freeze ``model`` and put adapters on the layers ``cfg.target_modules`` names; in place, returned.

    With ``cfg.base_weights`` the base is first converted to that weight-only format (projections kept
    apart); its weights as they were (fp32) stay reachable, memory-mapped, for ``base_state_dict``. Afterwards only the ``lora_A`` / ``lora_B`` weights require grad (``count_trainable``).

    Raises:
        ConfigError: a target matches no linear layer; the model already has adapters; the model was
            converted with fused projections (``convert_weights(model, fmt, fuse=False)``, or
            ``LoraConfig.base_weights``, keep q/k/v and gate/up apart); a format LoRA cannot train over.
    """
    if lora_config_of(model) is not None:
        raise ConfigError("this model already has LoRA adapters: merge_lora(model, unload=True) first")
    saved = _saved_names(model, cfg.modules_to_save or [])
    if cfg.base_weights is not None:
        check_adaptable(model)  # before anything is written or converted
        kept = _spill(model.state_dict())
        full = {name: model.get_submodule(name) for name in saved}
        for name in full:  # trained in full: kept out of the conversion, in fp32
            _set_module(model, name, nn.Identity())
        convert_weights(model, cfg.base_weights, fuse=False)
        for name, module in full.items():
            module.float().register_forward_pre_hook(_inputs_to_fp32)
            _set_module(model, name, module)
        model.lora_base_state = kept  # type: ignore[assignment]  # read back by base_state_dict
    check_adaptable(model)
    names = _targets(model, list(cfg.target_modules))
    model.requires_grad_(False)
    for name in names:
        wrap_linear(model, name, cfg)
    for name in saved:
        model.get_submodule(name).requires_grad_(True)
    model.lora_config = cfg  # type: ignore[assignment]  # read back by lora_config_of / save_adapter
    return model


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _inputs_to_fp32(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """A fp32 module to save over a bf16 (quantized) base: its floating inputs in fp32 (output fp32)."""
    return tuple(a.float() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)


def _saved_names(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """The module names ``modules_to_save`` globs select (full name or its tail), outermost only."""
    names = [n for n, _ in model.named_modules() if n and ".lora_" not in n and ".base_layer" not in n]
    chosen: list[str] = []
    for pat in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat) or fnmatch.fnmatchcase(n, "*." + pat)]
        if not hits:
            raise ConfigError(
                f"modules_to_save={pat!r} matches no module; name one such as "
                f"{', '.join(n for n in names if '.' not in n)}"
            )
        chosen += [n for n in hits if n not in chosen]
    return [n for n in chosen if not any(n.startswith(o + ".") for o in chosen)]


def saved_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules a LoRA model trains in full and saves with its adapter (``LoraConfig.modules_to_save``),
    by name; empty for a model without them."""
    cfg = lora_config_of(model)
    if cfg is None or not cfg.modules_to_save:
        return {}
    return {n: model.get_submodule(n) for n in _saved_names(model, cfg.modules_to_save)}


def _spill(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` written to a temporary file and read back memory-mapped (tied tensors stay tied): the
    same values, paged in from disk only when read. The file is unlinked at once where the OS allows
    (the mapping keeps it alive), else when the process exits. The file goes to ``tempfile.gettempdir()``
    (``$TMPDIR``; where that is a tmpfs, the file is memory again: point ``TMPDIR`` at a disk).

    Raises ``ConfigError`` when that folder has too little free space for the fp32 base."""
    need = sum(v.numel() * v.element_size() for v in {v.data_ptr(): v for v in state.values()}.values())
    folder = tempfile.gettempdir()
    free = shutil.disk_usage(folder).free
    if free < need * 1.05 + 2**20:
        raise ConfigError(
            f"QLoRA keeps the fp32 base on disk ({need / 2**20:,.0f} MiB) but {folder} has "
            f"{free / 2**20:,.0f} MiB free; point TMPDIR at a folder with room"
        )
    fd, path = tempfile.mkstemp(prefix="lamina-lora-base-", suffix=".pt")
    os.close(fd)
    try:
        torch.save({k: v.detach() for k, v in state.items()}, path)
        kept: dict[str, Tensor] = torch.load(path, mmap=True, weights_only=True)
    finally:
        try:
            os.unlink(path)
        except OSError:  # Windows: a mapped file cannot be deleted
            import atexit

            atexit.register(_remove, path)
    return kept


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def base_state_dict(model: nn.Module, state: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The base weights of a LoRA model under their plain names (``blocks.0.attn.q_proj.weight``): what a
    checkpoint of it holds next to its adapter. For a base that ``apply_lora`` quantized
    (``LoraConfig.base_weights``) these are the fp32 weights it had before (memory-mapped; its
    ``modules_to_save`` as they are now); otherwise
    ``state`` (default: ``model.state_dict()``) without the adapters and with the wrappers' ``base_layer.``."""
    kept = getattr(model, "lora_base_state", None)
    if kept is not None:  # with the modules to save as they are now (trained)
        now = {k: v for k, v in lora_state_dict(model).items() if ".lora_" not in k}
        return {**kept, **now}
    state = model.state_dict() if state is None else state
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}


def check_adaptable(model: Transformer) -> None:
    """Raise ``ConfigError`` unless adapters can go on ``model``: unconverted (fp32 ``nn.Linear``), bf16,
    int8 or int4 weights with q/k/v and gate/up apart (``convert_weights(..., fuse=False)``); not the
    inference-only fp32 (``PackedLinear``) and w8a8 layouts."""
    if model.weight_format not in (None, "bf16", "int8", "int4"):
        raise ConfigError(
            f"weights={model.weight_format!r} is an inference-only layout LoRA cannot wrap: load the model "
            "without weights= (or convert_weights(..., pack=False)); LoraConfig.base_weights quantizes the base"
        )
    for m in model.modules():
        if (isinstance(m, Attention) and m.qkv_proj is not None) or (
            isinstance(m, MLP) and m.gate_up_proj is not None
        ):
            raise ConfigError(
                "this model's projections are fused (q/k/v in one matmul) for inference; for LoRA "
                "load it unconverted and set LoraConfig.base_weights (or convert_weights(..., fuse=False))"
            )


def wrap_linear(model: nn.Module, name: str, cfg: LoraConfig) -> LoraLinear:
    """Replace the linear layer ``name`` of ``model`` by a ``LoraLinear`` over it (rank and scaling from
    ``cfg``) and return the wrapper. Freezes nothing: ``apply_lora`` does that for the whole model. Drops
    ``model``'s compiled decode step (``lamina.model.aot``: it would decode without the adapter)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    base = getattr(parent, child)
    if not isinstance(base, _BASE_TYPES):
        raise ConfigError(f"{name} is a {type(base).__name__}, not a linear layer LoRA can adapt")
    layer = LoraLinear(base, cfg)
    setattr(parent, child, layer)
    detach_decode_step(model)
    return layer


def lora_config_of(model: nn.Module) -> LoraConfig | None:
    """The ``LoraConfig`` ``apply_lora`` used on ``model``, or None for a model without adapters."""
    cfg = getattr(model, "lora_config", None)
    return cfg if isinstance(cfg, LoraConfig) else None


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base inside this block: every unmerged adapter is skipped (PEFT's
    ``disable_adapter()``); DPO's reference model with LoRA, without a second copy in memory. Raises
    ``ConfigError`` if an adapter is merged (its update is inside the base weight then)."""
    layers = list(lora_layers(model).values())
    if any(m.merged for m in layers):
        raise ConfigError("cannot disable merged LoRA adapters; unmerge them first (unmerge_lora)")
    for m in layers:
        m.disabled = True
    try:
        yield
    finally:
        for m in layers:
            m.disabled = False


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Every ``LoraLinear`` of ``model`` by module name (``blocks.0.attn.q_proj``), in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """What a LoRA model trains: ``{"blocks.0.attn.q_proj.lora_A.weight": (r, in), ...lora_B...: (out, r)}``
    and the parameters of its ``modules_to_save`` (``"task_head.classifier.weight"``), under the names of
    ``model.state_dict()``."""
    out: dict[str, Tensor] = {}
    for name, layer in lora_layers(model).items():
        out[f"{name}.lora_A.weight"] = layer.lora_A.weight.detach()
        out[f"{name}.lora_B.weight"] = layer.lora_B.weight.detach()
    for name, module in saved_modules(model).items():
        for p, t in module.named_parameters():
            out[f"{name}.{p}"] = t.detach()
    return out


def adapter_state(model: nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tensors of ``state`` (a full state dict of ``model``, e.g. gathered across processes) that
    ``lora_state_dict`` names, cloned: the part of a LoRA run's training state that changes."""
    return {k: state[k].detach().clone() for k in lora_state_dict(model)}


def load_lora_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy adapter weights (names and shapes of ``lora_state_dict``) into ``model``'s adapters.

    Raises ``ConfigError`` naming missing / unexpected tensors or a shape (rank) mismatch."""
    own = lora_state_dict(model)
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise ConfigError(
            f"adapter tensors do not match the model's adapters: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}; were they made for this model and target_modules?"
        )
    with torch.no_grad():
        for k, t in own.items():
            if tuple(state[k].shape) != tuple(t.shape):
                raise ConfigError(
                    f"adapter tensor {k} has shape {tuple(state[k].shape)}, the model's is {tuple(t.shape)}"
                )
            t.copy_(state[k])


def merge_lora(model: Transformer, unload: bool = False) -> Transformer:
    """Add each adapter's ``scaling * B @ A`` into its base weight (fp32 sums, stored in the weight's
    dtype); ``unload=True`` also replaces every wrapper by its base ``nn.Linear`` (PEFT's
    ``merge_and_unload``): a plain model that saves, exports and converts like any other.

    Raises ``ConfigError`` for a quantized base (merge into the fp32 model instead)."""
    for layer in lora_layers(model).values():
        base = layer.base_layer
        if not isinstance(base, nn.Linear):
            raise ConfigError(
                "cannot merge adapters into an int8/int4 base; load the base unconverted, "
                "load_adapter on it, then merge"
            )
        if not layer.merged:
            with torch.no_grad():
                base.weight.copy_((base.weight.float() + layer.delta_weight()).to(base.weight.dtype))
            layer.merged = True
    if unload:
        unload_lora(model)
    return model


def unmerge_lora(model: Transformer) -> Transformer:
    """Subtract what ``merge_lora`` added (the adapters act apart again); the weights come back up to
    float rounding."""
    for layer in lora_layers(model).values():
        if layer.merged:
            base = layer.base_layer
            assert isinstance(base, nn.Linear)
            with torch.no_grad():
                base.weight.copy_((base.weight.float() - layer.delta_weight()).to(base.weight.dtype))
            layer.merged = False
    return model


def unload_lora(model: Transformer) -> Transformer:
    """Replace every wrapper by its base layer (merged adapters stay in the weights, unmerged ones are
    dropped) and forget the ``LoraConfig``."""
    for name in list(lora_layers(model)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, getattr(parent, child).base_layer)
    for attr in ("lora_config", "lora_base_state"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(parameters that require grad, all parameters); a tied tensor counts once."""
    params = list(model.parameters())  # nn.Module.parameters() yields a shared tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def expected_trainable(model: nn.Module) -> int:
    """What ``count_trainable`` must find for a LoRA model: ``r * (in + out)`` per wrapped layer, plus
    the parameters of its ``modules_to_save``."""
    saved = sum(p.numel() for m in saved_modules(model).values() for p in m.parameters())
    return saved + sum(m.r * (m.in_features + m.out_features) for m in lora_layers(model).values())


class MultiLoraLinear(nn.Module):
    """Several adapters over one frozen base layer, chosen per batch row: serving many LoRA adapters over
    one base in one running batch (vLLM's multi-LoRA batching; PEFT's mixed adapter batches,
    ``peft.tuners.lora.layer.LoraLayer._mixed_batch_forward``, computes the same sums).

    Adapter ``k`` (1, 2, ...; ``add_adapter``) holds ``A_k`` (r_k, in), ``B_k`` (out, r_k) in fp32 and
    ``scaling_k``. Inside ``select_adapters`` row ``b`` of x (B, ..., in) gets
    ``base_layer(x_b) + scaling_k * B_k(A_k(x_b))`` for its adapter ``k`` (in the same operations and
    order as ``LoraLinear``, so a row's output does not depend on what the other rows use); rows of
    adapter 0, and every row outside ``select_adapters``, get ``base_layer(x_b)`` alone."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features: int = base_layer.in_features  # type: ignore[assignment]
        self.out_features: int = base_layer.out_features  # type: ignore[assignment]
        self.lora_A: dict[int, Tensor] = {}  # adapter -> (r, in) fp32
        self.lora_B: dict[int, Tensor] = {}  # adapter -> (out, r) fp32
        self.scalings: dict[int, float] = {}
        # set by select_adapters: (adapter, the rows using it as a (n,) index, or None: every row)
        self.groups: list[tuple[int, Tensor | None]] = []

    def add_adapter(self, k: int, a: Tensor, b: Tensor, scaling: float) -> None:
        """Hold adapter ``k``: ``a`` (r, in), ``b`` (out, r), copied to fp32 on the base's device."""
        if k < 1:
            raise ConfigError(f"adapter index {k} must be >= 1 (0 is the base alone)")
        if a.shape[1] != self.in_features or b.shape[0] != self.out_features or a.shape[0] != b.shape[1]:
            raise ConfigError(
                f"adapter {k}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit a layer "
                f"{self.in_features} -> {self.out_features} (adapter made for another base?)"
            )
        device = next(itertools.chain(self.base_layer.parameters(), self.base_layer.buffers())).device
        self.lora_A[k] = a.detach().to(device, torch.float32).contiguous()
        self.lora_B[k] = b.detach().to(device, torch.float32).contiguous()
        self.scalings[k] = float(scaling)

    def forward(self, x: Tensor) -> Tensor:
        """(B, ..., in) -> (B, ..., out) in x's dtype."""
        y = self.base_layer(x)
        for k, rows in self.groups:
            a = self.lora_A.get(k)
            if a is None:  # adapter k does not adapt this layer
                continue
            xs = x if rows is None else x.index_select(0, rows)
            h = F.linear(F.linear(xs.to(a.dtype), a), self.lora_B[k])
            h = (h * self.scalings[k]).to(y.dtype)
            y = y + h if rows is None else y.index_add(0, rows, h)
        return y

    def extra_repr(self) -> str:
        return f"adapters={sorted(self.lora_A)}"


def add_multi_adapter(
    model: Transformer, name: str, layers: Mapping[str, tuple[Tensor, Tensor, float]]
) -> int:
    """Add one more adapter called ``name`` to ``model`` for per-row use (``MultiLoraLinear``): ``layers``
    maps module names (``blocks.0.attn.q_proj``) to (A (r, in), B (out, r), scaling). The linears it
    names are wrapped in ``MultiLoraLinear`` the first time. Returns the adapter's index (1, 2, ...),
    which ``select_adapters`` takes; ``adapter_names(model)[k - 1]`` is ``name``.

    Raises ``ConfigError`` for a model with ``LoraLinear`` adapters (``apply_lora`` / ``load_adapter``),
    fused projections, a repeated name, a module that is not a linear layer, or shapes that do not fit.
    """
    if lora_config_of(model) is not None:
        raise ConfigError(
            "this model already has a LoRA adapter applied (load the base alone to serve several adapters)"
        )
    check_adaptable(model)
    names: list[str] = getattr(model, "lora_adapters", [])
    if name in names:
        raise ConfigError(f"two adapters are named {name!r}")
    k = len(names) + 1
    for module, (a, b, scaling) in layers.items():
        parent_name, _, child = module.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = getattr(parent, child)
        except AttributeError:
            raise ConfigError(f"adapter {name!r}: the model has no module {module}") from None
        if isinstance(layer, _BASE_TYPES):
            layer = MultiLoraLinear(layer)
            setattr(parent, child, layer)
            detach_decode_step(model)  # lamina.model.aot's step would decode without the adapters
        if not isinstance(layer, MultiLoraLinear):
            raise ConfigError(f"adapter {name!r}: {module} is a {type(layer).__name__}, not a linear layer")
        layer.add_adapter(k, a, b, scaling)
    model.requires_grad_(False)
    model.lora_adapters = [*names, name]  # type: ignore[assignment]
    return k


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters ``add_multi_adapter`` put on ``model``, adapter 1 first."""
    return list(getattr(model, "lora_adapters", []))


def multi_lora_layers(model: nn.Module) -> list[MultiLoraLinear]:
    """Every ``MultiLoraLinear`` of ``model``, in model order."""
    return [m for m in model.modules() if isinstance(m, MultiLoraLinear)]


@contextlib.contextmanager
def select_adapters(layers: Sequence[MultiLoraLinear], rows: Sequence[int]) -> Iterator[None]:
    """Inside this block, batch row ``b`` of every forward through ``layers`` uses adapter ``rows[b]``
    (0: the base alone). When every row uses one adapter, it applies to batches of any size (a
    prefill, a beam group). Not re-entrant: one block at a time per model (the engine's thread)."""
    distinct = sorted(set(rows))
    groups: list[tuple[int, Tensor | None]] = []
    if len(distinct) == 1:
        groups = [(distinct[0], None)] if distinct[0] else []
    elif layers:
        device = next(iter(layers[0].lora_A.values()), torch.empty(0)).device
        for k in distinct:
            if k:
                at = torch.tensor([i for i, r in enumerate(rows) if r == k], dtype=torch.long, device=device)
                groups.append((k, at))
    for m in layers:
        m.groups = groups
    try:
        yield
    finally:
        for m in layers:
            m.groups = []


class MergedCopy:
    """A plain copy of ``model`` for generation: no adapter wrappers, each LoRA layer's weight the merged
    ``W + scaling * B @ A`` (fp32 sum, stored in W's dtype, as ``merge_lora``), every other tensor the
    model's. ``refresh()`` brings it up to date in place (its tensors keep their storage, so a compiled
    step bound to them stays valid): only the tensors that changed since the last refresh (an optimizer
    step, ``load_state_dict``, a swapped adapter: ``refresh`` says how it tells) are copied or merged
    again, so a LoRA run pays for its adapters' ``B @ A`` products and a full fine-tune for one copy of
    its weights.

    ``fuse``: each attention's q/k/v and each gated MLP's gate/up projections as one linear
    (``fuse_projections``; refreshed into its slices): fewer, larger matmuls for generation. The copy
    never trains (``requires_grad`` off, eval mode) and costs one more copy of the model's weights
    (GRPO's ``grpo.compile_generation`` generates from it).

    Raises ``ConfigError`` for an int8/int4 base under an adapter (it cannot hold a merged weight)."""

    def __init__(self, model: Transformer, fuse: bool = False) -> None:
        for layer in lora_layers(model).values():
            if not isinstance(layer.base_layer, nn.Linear):
                raise ConfigError("cannot merge adapters into an int8/int4 base for generation")
        memo: dict[int, Any] = {}
        for m in model.modules():  # inference-only state (packed copies, a compiled step) is not copied
            if "_inference_copies" in m.__dict__:
                memo[id(m.__dict__["_inference_copies"])] = {}
        for attr in ("lora_base_state",):
            if attr in model.__dict__:
                memo[id(model.__dict__[attr])] = None
        for p in model.parameters():
            if p.grad is not None:
                memo[id(p.grad)] = None
        plain = copy.deepcopy(model, memo)
        for m in plain.modules():
            m.__dict__.pop("_inference_copies", None)
        unload_lora(plain)
        plain.requires_grad_(False).eval()
        self.model = plain
        self.source = model
        # (destination, source module's name, attribute), every tensor once; the source module is looked up
        # by name at each refresh, so a wrapper swapped in or taken off since is seen
        self._pairs: list[tuple[Tensor, str, str]] = []
        seen: set[int] = set()
        for name, dst_module in plain.named_modules():
            for attr, dst in [*dst_module._parameters.items(), *dst_module._buffers.items()]:
                if dst is None or id(dst) in seen:
                    continue
                seen.add(id(dst))
                self._pairs.append((dst, name, attr))
        if fuse:  # each part's tensors become slices of its fused linear's
            slices: dict[int, Tensor] = {}
            for m in plain.modules():
                if isinstance(m, Attention) and not m.cross and m.qkv_proj is None:
                    parts = [m.q_proj, m.k_proj, m.v_proj]
                elif isinstance(m, MLP) and m.gated and m.gate_up_proj is None:
                    parts = [m.gate_proj, m.up_proj]
                else:
                    continue
                m.fuse_projections()
                fused = m.qkv_proj if isinstance(m, Attention) else m.gate_up_proj
                assert isinstance(fused, nn.Linear)
                o = 0
                for part in parts:
                    assert isinstance(part, nn.Linear)
                    slices[id(part.weight)] = fused.weight.detach()[o : o + part.out_features]
                    if part.bias is not None and fused.bias is not None:
                        slices[id(part.bias)] = fused.bias.detach()[o : o + part.out_features]
                    o += part.out_features
            self._pairs = [(slices.get(id(d), d), n, a) for d, n, a in self._pairs]
            plain.requires_grad_(False)
        self._seen: list[tuple | None] = [None] * len(self._pairs)

    def refresh(self) -> Transformer:
        """Copy (or merge) into the copy what changed in the model since the last call; returns the copy.

        A tensor is copied again unless it is the same tensor object with the same version counter, data
        pointer and dtype as at the last refresh (``layers._same_weights``: a parameter replaced by
        ``load_state_dict(assign=True)``, ``p.data = t`` or ``.to()`` is seen), and a LoRA layer's weight
        also when its adapters, ``scaling``, ``merged`` or ``disabled`` changed or the wrapper was swapped.
        Writes through ``.data`` (``p.data.add_(x)``) keep the version and are not seen.

        Raises ``ConfigError`` when a module of the copy is gone from the model, or an adapter swapped in
        since has an int8/int4 base."""
        modules = dict(self.source.named_modules(remove_duplicate=False))
        with torch.no_grad():
            for i, (dst, name, attr) in enumerate(self._pairs):
                module = modules.get(name)
                layer = module if isinstance(module, LoraLinear) else None
                if layer is not None:
                    module = layer.base_layer
                src = getattr(module, attr, None)
                if not isinstance(src, Tensor):
                    raise ConfigError(
                        f"the model has no tensor {name}.{attr} any more: make the generation copy again "
                        "(MergedCopy) after changing its modules"
                    )
                merge = layer is not None and attr == "weight" and not (layer.merged or layer.disabled)
                tensors = [src]
                if merge:
                    assert layer is not None
                    if not isinstance(layer.base_layer, nn.Linear):
                        raise ConfigError("cannot merge adapters into an int8/int4 base for generation")
                    tensors += [layer.lora_A.weight, layer.lora_B.weight]
                held = self._seen[i]
                scaling = layer.scaling if merge and layer is not None else None
                if held is not None and held[0] == (merge, scaling) and _same_weights(held[1], tensors):
                    continue
                if merge:
                    assert layer is not None
                    dst.copy_((src.float() + layer.delta_weight()).to(dst.dtype))
                else:
                    dst.copy_(src)
                self._seen[i] = ((merge, scaling), _weights_key(tensors))
        return self.model
