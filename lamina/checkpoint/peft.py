"""LoRA adapters in PEFT's files: ``adapter_model.safetensors`` + ``adapter_config.json``.

A folder ``save_adapter`` writes is what ``peft.PeftModel.from_pretrained(hf_model, folder)`` loads onto
the Hugging Face export of the base (``lamina convert --to hf``), and ``load_adapter`` reads folders PEFT
wrote (``PeftModel.save_pretrained``). Tensor names follow PEFT's layout,
``base_model.model.<HF module name>.lora_A.weight`` (A: (r, in)) and ``...lora_B.weight`` (B: (out, r));
module names go through the name maps of ``lamina.checkpoint.hf``:

- Llama / Mistral (SmolLM2, ...): ``blocks.N.attn.q_proj`` <-> ``model.layers.N.self_attn.q_proj``, likewise
  k/v/o_proj and ``mlp.gate/up/down_proj``.
- GPT-2: HF fuses q, k and v in one ``Conv1D`` ``c_attn`` (weights stored (in, out): PEFT's
  ``fan_in_fan_out=True``). lamina's q/k/v adapters of rank r are written as one ``c_attn`` adapter of rank
  3r (A stacked, B block-diagonal: exactly the same update), with ``rank_pattern`` / ``alpha_pattern``
  keeping the scaling; a PEFT ``c_attn`` adapter of rank R loads as q/k/v adapters of rank R sharing A.
  ``attn.c_proj`` <-> ``attn.o_proj``, ``mlp.c_fc`` <-> ``mlp.up_proj``, ``mlp.c_proj`` <-> ``mlp.down_proj``.

A sequence head (a reward model's ``head=regress``, or ``classify``) on a Llama or GPT-2 decoder is
transformers' ``*ForSequenceClassification.score``; trained in full beside the adapter
(``LoraConfig.modules_to_save``), its tensors are saved as PEFT saves ``modules_to_save``
(``base_model.model.score.weight``; ``"modules_to_save": ["score"]``, ``"task_type": "SEQ_CLS"``).
lamina's head has a bias (``score.bias``), which transformers' ``score`` lacks.

Other families (BLOOM, BERT) raise ``CheckpointError``; their adapters stay in lamina's checkpoints.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lamina.checkpoint.hf import _LAYER, _LLAMA_LAYER, _LLAMA_TOP, hf_family
from lamina.checkpoint.lamina import atomic_folder
from lamina.checkpoint.load import (
    LoadedModel,
    LoadOptions,
    check_int4_options,
    compile_model,
    load,
    prepare_for_inference,
    torch_dtype,
)
from lamina.config import ModelConfig
from lamina.errors import CheckpointError, ConfigError
from lamina.model.lora import (
    LoraConfig,
    LoraLinear,
    adapter_names,
    add_multi_adapter,
    check_adaptable,
    lora_config_of,
    lora_layers,
    merge_lora,
    saved_modules,
    wrap_linear,
)
from lamina.model.transformer import Transformer

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
LAMINA_ADAPTER_DIR = "adapter"  # where a lamina LoRA checkpoint keeps its adapter (train.trainer.ADAPTER_DIR)
PREFIX = "base_model.model."  # PEFT's wrapper (PeftModelForCausalLM -> LoraModel) before the HF names
_GPT2_LAYER = {"attn.o_proj": "attn.c_proj", "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}
_QKV = ("attn.q_proj", "attn.k_proj", "attn.v_proj")


_SEQ_HEADS = ("classify", "regress")  # decoder heads that are transformers' *ForSequenceClassification.score
_SCORE = "task_head.classifier"  # lamina's name of that layer


def _family(cfg: ModelConfig) -> Literal["llama", "gpt2"]:
    if cfg.arch == "decoder" and cfg.head in _SEQ_HEADS:  # the body's family; the head is `score`
        cfg = replace(cfg, head="lm", n_labels=None, labels=None, pooler=False)
    family = hf_family(cfg)
    if family not in ("llama", "gpt2"):
        raise CheckpointError(
            f"PEFT adapter files are written for the Llama and GPT-2 families; this model exports as "
            f"{family!r}: keep its adapters in a lamina checkpoint"
        )
    return family  # type: ignore[return-value]


def hf_module_name(name: str, cfg: ModelConfig) -> str:
    """The HF module name of lamina module ``name`` (``blocks.0.attn.q_proj`` ->
    ``model.layers.0.self_attn.q_proj``; GPT-2's q/k/v all -> ``transformer.h.0.attn.c_attn``)."""
    family = _family(cfg)
    if name == _SCORE and cfg.head in _SEQ_HEADS:
        return "score"
    m = re.match(r"^blocks\.(\d+)\.(.+)$", name)
    if family == "llama":
        if m is None:
            top = {v.removesuffix(".weight"): k.removesuffix(".weight") for k, v in _LLAMA_TOP.items()}
            if name in top:
                return top[name]
        else:
            inv = {v.rstrip("."): k.rstrip(".") for k, v in _LLAMA_LAYER.items()}
            if m.group(2) in inv:
                return f"model.layers.{m.group(1)}.{inv[m.group(2)]}"
    elif m is not None:
        rest = m.group(2)
        if rest in _QKV:
            return f"transformer.h.{m.group(1)}.attn.c_attn"
        if rest in _GPT2_LAYER:
            return f"transformer.h.{m.group(1)}.{_GPT2_LAYER[rest]}"
    elif name == "lm_head":
        return "lm_head"
    raise CheckpointError(f"lamina module {name!r} has no {family} name that PEFT adapters can hold")


def lamina_module_names(hf_name: str, cfg: ModelConfig) -> list[str]:
    """The lamina module(s) HF module ``hf_name`` stands for (GPT-2's ``c_attn``: q, k and v)."""
    family = _family(cfg)
    if hf_name == "score" and cfg.head in _SEQ_HEADS:
        return [_SCORE]
    if m := _LAYER.match(hf_name):
        i, rest = m.groups()
        if family == "llama":
            for src, dst in _LLAMA_LAYER.items():
                if rest == src.rstrip("."):
                    return [f"blocks.{i}.{dst.rstrip('.')}"]
        else:
            if rest == "attn.c_attn":
                return [f"blocks.{i}.{p}" for p in _QKV]
            inv = {v: k for k, v in _GPT2_LAYER.items()}
            if rest in inv:
                return [f"blocks.{i}.{inv[rest]}"]
    elif hf_name == "lm_head":
        return ["lm_head"]
    elif family == "llama":  # a whole top-level module saved with the adapter (final norm, embeddings)
        top = {k.removesuffix(".weight"): v.removesuffix(".weight") for k, v in _LLAMA_TOP.items()}
        if hf_name in top:
            return [top[hf_name]]
    raise CheckpointError(f"adapter module {hf_name!r} is not a {family} linear layer lamina can map")


def _peft_targets(hf_names: list[str], cfg: ModelConfig) -> list[str] | str:
    """PEFT's ``target_modules``: module suffixes when they pick exactly ``hf_names``, else a regex of the
    full names (PEFT full-matches a string target against each module name)."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in hf_names})
    n_layers = cfg.n_layers
    layered = [n for n in hf_names if _LAYER.match(n)]
    if len(layered) == len(hf_names) and len(hf_names) == n_layers * len(suffixes):
        by_suffix = {s: sum(n.endswith("." + s) for n in hf_names) for s in suffixes}
        if all(c == n_layers for c in by_suffix.values()):
            return suffixes
    return "^(" + "|".join(re.escape(n) for n in hf_names) + ")$"


def adapter_tensors(model: Transformer) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, float]]:
    """PEFT's tensors of ``model``'s adapters (contiguous fp32), and the rank / alpha of modules whose
    rank differs from ``LoraConfig.r`` (GPT-2's fused ``c_attn``)."""
    cfg = model.config
    lcfg = lora_config_of(model)
    assert lcfg is not None
    layers = lora_layers(model)
    out: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    done: set[str] = set()
    for name, layer in layers.items():
        hf = hf_module_name(name, cfg)
        if hf in done:
            continue
        done.add(hf)
        if hf.endswith(".c_attn"):
            parts = [layers.get(name.rsplit(".", 1)[0] + "." + p.split(".")[1]) for p in _QKV]
            if any(p is None for p in parts):
                raise CheckpointError(
                    f"GPT-2 fuses q, k and v into c_attn: an adapter on {name} needs q_proj, k_proj and "
                    "v_proj adapted together (target_modules 'attn.[qkv]_proj' or 'all-linear')"
                )
            qkv = [p for p in parts if p is not None]
            a = torch.cat([p.lora_A.weight.detach().float() for p in qkv])  # (3r, in)
            b = torch.block_diag(*[p.lora_B.weight.detach().float() for p in qkv])  # (3 d, 3r)
            r = layer.r
            ranks["c_attn"] = 3 * r
            alphas["c_attn"] = lcfg.lora_alpha * (3**0.5 if lcfg.use_rslora else 3)  # same scaling at rank 3r
        else:
            a, b = layer.lora_A.weight.detach().float(), layer.lora_B.weight.detach().float()
        out[f"{PREFIX}{hf}.lora_A.weight"] = a.contiguous()
        out[f"{PREFIX}{hf}.lora_B.weight"] = b.contiguous()
    return out, ranks, alphas


def save_adapter(
    model: Transformer, path: str | os.PathLike[str], base_model_name_or_path: str | None = None
) -> Path:
    """Write ``model``'s adapters as a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``),
    atomically; an existing adapter folder at ``path`` is replaced. Returns the folder.

    ``base_model_name_or_path`` is recorded for PEFT (``PeftModel.from_pretrained`` and ``AutoPeftModel``
    read it): the HF folder or hub id of the base.

    Raises:
        ConfigError: the model has no adapters (``apply_lora`` first).
        CheckpointError: its family has no PEFT layout here (Llama and GPT-2 do), or GPT-2 q/k/v adapted apart.
    """
    lcfg = lora_config_of(model)
    if lcfg is None or not lora_layers(model):
        raise ConfigError("this model has no LoRA adapters to save: apply_lora(model, LoraConfig(...)) first")
    family = _family(model.config)
    tensors, ranks, alphas = adapter_tensors(model)
    hf_names = list(dict.fromkeys(k[len(PREFIX) :].rsplit(".", 2)[0] for k in tensors))
    to_save: list[str] = []
    for name, module in saved_modules(model).items():
        hf = hf_module_name(name, model.config)
        to_save.append(hf)
        for p, t in module.named_parameters():
            tensors[f"{PREFIX}{hf}.{p}"] = t.detach().float().contiguous()
    init = lcfg.init_lora_weights
    seq_cls = model.config.arch == "decoder" and model.config.head in _SEQ_HEADS
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if seq_cls else "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": lcfg.r,
        "lora_alpha": lcfg.lora_alpha,
        "lora_dropout": lcfg.lora_dropout,
        "target_modules": _peft_targets(hf_names, model.config),
        "use_rslora": lcfg.use_rslora,
        "init_lora_weights": init,
        "bias": "none",
        "fan_in_fan_out": family == "gpt2",
        "rank_pattern": ranks,
        "alpha_pattern": alphas,
        "modules_to_save": to_save or None,
    }
    dest = Path(path)
    old = None
    if dest.is_dir() and (dest / ADAPTER_CONFIG).is_file():  # atomic_folder replaces model folders only
        old = dest.parent / f".{dest.name}.old-{os.getpid()}"
        dest.rename(old)

    def write(tmp: Path) -> None:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})

    try:
        written = atomic_folder(dest, write)
    except BaseException:
        if old is not None:
            old.rename(dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return written


def resolve_adapter(path: str | os.PathLike[str]) -> Path:
    """The adapter folder ``path`` names: ``path`` itself (a PEFT folder, or a lamina run's ``adapter/``),
    or the ``adapter/`` of a lamina LoRA checkpoint (``lamina finetune --lora.r ...`` writes one per
    checkpoint). Raises nothing: ``read_adapter`` reports a folder without adapter files."""
    folder = Path(path)
    if not (folder / ADAPTER_CONFIG).is_file() and (folder / LAMINA_ADAPTER_DIR / ADAPTER_CONFIG).is_file():
        return folder / LAMINA_ADAPTER_DIR
    return folder


def own_adapter(model: str | os.PathLike[str]) -> Path | None:
    """The ``adapter/`` of a lamina LoRA checkpoint folder ``model`` (its top-level weights are the base
    without the adapter), or None for any other model."""
    folder = Path(model) / LAMINA_ADAPTER_DIR
    return folder if (folder / ADAPTER_CONFIG).is_file() else None


def read_adapter(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``adapter_config.json`` and the tensors of a PEFT adapter folder.

    Raises ``CheckpointError`` for a missing or unreadable file or an adapter that is not LoRA."""
    folder = resolve_adapter(path)
    cfg_file, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not cfg_file.is_file() or not weights.is_file():
        raise CheckpointError(
            f"{folder} is not a PEFT adapter folder: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
            "(PeftModel.save_pretrained writes both; adapter_model.bin is not read: resave as safetensors)"
        )
    try:
        config = json.loads(cfg_file.read_text())
        tensors = load_file(str(weights))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read the adapter in {folder}: {e}") from e
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(
            f"{cfg_file} holds a {config.get('peft_type')} adapter; lamina reads LoRA adapters"
        )
    for key in ("use_dora", "layers_to_transform", "layer_replication"):
        if config.get(key):
            raise CheckpointError(
                f"{cfg_file} sets {key}={config[key]!r}, which lamina's LoRA does not support"
            )
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"{cfg_file} trains biases (bias={config['bias']!r}); lamina reads bias='none'")
    return config, tensors


def _pattern_value(patterns: Mapping[str, Any], hf_name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup (``peft.utils.other.get_pattern_key``): the first key
    that matches the module name's tail as a regex."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", hf_name):
            return value
    return default


def adapter_layers(
    model: Transformer, path: str | os.PathLike[str]
) -> tuple[LoraConfig, dict[str, tuple[LoraConfig, torch.Tensor, torch.Tensor]]]:
    """The PEFT adapter at ``path`` mapped onto ``model``'s modules, without changing the model: its
    base ``LoraConfig`` and, per lamina module name (``blocks.0.attn.q_proj``), the module's config (rank,
    alpha from ``rank_pattern`` / ``alpha_pattern``), A (r, in) and B (out, r). ``path`` is a PEFT
    folder or a lamina LoRA checkpoint holding one in ``adapter/`` (``resolve_adapter``).

    Raises ``CheckpointError``: not a PEFT LoRA folder, a module or shape that does not fit the model."""
    config, tensors = read_adapter(path)
    cfg = model.config
    modules: dict[str, dict[str, torch.Tensor]] = {}
    saved = _saved_keys(tensors, config)
    for key, t in tensors.items():
        if key in saved:
            continue
        m = re.match(r"^(?:base_model\.model\.)?(.+)\.(lora_[AB])(?:\.[^.]+)?\.weight$", key)
        if m is None:
            raise CheckpointError(f"{path}: tensor {key!r} is not a LoRA A/B weight")
        modules.setdefault(m.group(1), {})[m.group(2)] = t
    base = LoraConfig(
        r=int(config.get("r", 8)),
        lora_alpha=float(config.get("lora_alpha", 8)),
        lora_dropout=float(config.get("lora_dropout") or 0.0),
        use_rslora=bool(config.get("use_rslora", False)),
    )
    new: dict[str, tuple[LoraConfig, torch.Tensor, torch.Tensor]] = {}
    for hf_name, ab in modules.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"{path}: module {hf_name} lacks {({'lora_A', 'lora_B'} - set(ab)).pop()}")
        a, b = ab["lora_A"], ab["lora_B"]
        r = a.shape[0]
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, hf_name, base.lora_alpha))
        names = lamina_module_names(hf_name, cfg)
        if r != b.shape[1] or b.shape[0] % len(names):
            raise CheckpointError(
                f"{path}: {hf_name} has A {tuple(a.shape)} and B {tuple(b.shape)}, not (r, in) and (out, r)"
            )
        bs = b.split(b.shape[0] // len(names)) if len(names) > 1 else (b,)
        if len(names) == 3 and r % 3 == 0 and _block_diagonal(b, 3):  # lamina's own GPT-2 export: split back
            per = r // 3
            rank_alpha = alpha / (3**0.5 if base.use_rslora else 3)
            for j, (name, bj) in enumerate(zip(names, bs, strict=True)):
                sub_cfg = replace(base, r=per, lora_alpha=rank_alpha)
                new[name] = (sub_cfg, a[j * per : (j + 1) * per], bj[:, j * per : (j + 1) * per])
            continue
        for name, bj in zip(names, bs, strict=True):
            new[name] = (replace(base, r=r, lora_alpha=alpha), a, bj)
    for name, (_, a, b) in new.items():
        try:
            target = model.get_submodule(name)
        except AttributeError as e:
            raise CheckpointError(
                f"{path}: the model has no module {name} (adapter for another base?)"
            ) from e
        n_in, n_out = getattr(target, "in_features", None), getattr(target, "out_features", None)
        if a.shape[1] != n_in or b.shape[0] != n_out:
            raise CheckpointError(
                f"{path}: adapter of {name} has A {tuple(a.shape)}, B {tuple(b.shape)}; the layer is "
                f"{n_in} -> {n_out} (adapter made for another base?)"
            )
    return base, new


def _saved_keys(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """The tensors of ``modules_to_save`` in an adapter file: key -> (HF module name, parameter name)."""
    names = config.get("modules_to_save") or []
    out: dict[str, tuple[str, str]] = {}
    for key in tensors:
        module, _, param = key.removeprefix(PREFIX).rpartition(".")
        if any(module == n or module.endswith("." + n) for n in names) and ".lora_" not in key:
            out[key] = (module, param)
    return out


def check_savable(model: Transformer) -> None:
    """Check, before training, that ``save_adapter`` can write ``model``'s adapter: its family has PEFT
    names and every ``modules_to_save`` module is one PEFT module of its own.

    Raises ``CheckpointError`` naming the module (for example GPT-2's q_proj, one third of ``c_attn``)."""
    _family(model.config)
    for name in saved_modules(model):
        hf = hf_module_name(name, model.config)
        if lamina_module_names(hf, model.config) != [name]:
            raise CheckpointError(
                f"modules_to_save: {name} is part of PEFT's {hf}, which an adapter saves as one tensor; "
                "train it through lora.target_modules instead"
            )


def saved_module_tensors(model: Transformer, path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The ``modules_to_save`` tensors of the adapter at ``path`` under ``model``'s parameter names
    (``base_model.model.score.weight`` -> ``task_head.classifier.weight``).

    Raises ``CheckpointError`` for a module the model lacks or a shape that does not fit."""
    config, tensors = read_adapter(path)
    own = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for key, (hf, param) in _saved_keys(tensors, config).items():
        names = lamina_module_names(hf, model.config)
        if len(names) != 1:
            raise CheckpointError(
                f"{path}: {key} is saved for {hf}, which lamina splits into {', '.join(names)}; a whole "
                "module saved with the adapter must map to one lamina module"
            )
        (name,) = names
        target = own.get(f"{name}.{param}")
        if target is None or target.shape != tensors[key].shape:
            got = "no such parameter" if target is None else f"shape {tuple(target.shape)}"
            raise CheckpointError(
                f"{path}: {key} {tuple(tensors[key].shape)} does not fit {name}.{param} ({got}); "
                "was the adapter made for this base and head?"
            )
        out[f"{name}.{param}"] = tensors[key]
    return out


def load_adapter(model: Transformer, path: str | os.PathLike[str]) -> Transformer:
    """Put the PEFT adapter at ``path`` on ``model`` (frozen; adapters trainable), in place; returned.

    The model must be the adapter's base (an unadapted lamina model of the Llama or GPT-2 family, fp32
    or bf16, or converted with ``fuse=False``); ranks and scalings come from ``adapter_config.json``
    (``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern``, ``alpha_pattern``). ``path`` is a PEFT
    folder or a lamina LoRA checkpoint (its ``adapter/``).

    Raises:
        CheckpointError: not a PEFT LoRA folder, a module or shape that does not fit the model.
        ConfigError: the model already has adapters.
    """
    if lora_config_of(model) is not None or adapter_names(model):
        raise ConfigError("this model already has LoRA adapters: merge_lora(model, unload=True) first")
    check_adaptable(model)
    base, new = adapter_layers(model, path)
    saved = saved_module_tensors(model, path)
    model.requires_grad_(False)
    for name, (lcfg, a, b) in new.items():
        layer = wrap_linear(model, name, lcfg)
        with torch.no_grad():
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in saved.items():
            params[name].copy_(t)
    to_save = sorted({n.rpartition(".")[0] for n in saved}) or None
    targets = sorted(new, key=list(dict(model.named_modules())).index)
    model.lora_config = replace(base, target_modules=targets, modules_to_save=to_save)  # type: ignore[assignment]
    for module in to_save or []:
        model.get_submodule(module).requires_grad_(True)
    return model


def add_serving_adapter(model: Transformer, name: str, path: str | os.PathLike[str]) -> int:
    """Add the PEFT adapter at ``path`` to ``model`` as adapter ``name`` for per-row selection
    (``lamina.model.lora.MultiLoraLinear``: several adapters over one base in one batch, as the server
    runs them). Returns its index (1, 2, ...), the ``adapter`` that ``Engine.submit`` takes.

    Raises ``CheckpointError`` / ``ConfigError`` as ``adapter_layers`` and ``add_multi_adapter`` do."""
    check_adaptable(model)
    config, tensors = read_adapter(path)
    if _saved_keys(tensors, config):
        raise ConfigError(
            f"{path} also holds whole modules (modules_to_save {config.get('modules_to_save')}), which cannot "
            "change per request: load it alone with --lora"
        )
    _, new = adapter_layers(model, path)
    return add_multi_adapter(model, name, {n: (a, b, c.scaling) for n, (c, a, b) in new.items()})


def _block_diagonal(b: torch.Tensor, n: int) -> bool:
    """Whether B (out, r) is block-diagonal in n equal blocks (lamina's GPT-2 c_attn export)."""
    rows, cols = b.shape[0] // n, b.shape[1] // n
    mask = torch.block_diag(*[torch.ones(rows, cols, dtype=torch.bool)] * n)
    return bool((b[~mask] == 0).all())


@dataclass
class AdapterOptions:
    """A LoRA adapter over the model that ``generate``, ``chat`` and ``serve`` load (``--lora``)."""

    # a LoRA adapter folder over MODEL: PEFT's files (adapter_config.json + adapter_model.safetensors), or a
    # lamina LoRA checkpoint (its adapter/); applied unmerged, as PEFT's PeftModel and vLLM do
    lora: str | None = None
    # add the adapter into the weights at load (PEFT's merge_and_unload): decoding costs what the base costs
    merge_lora: bool = False


def load_adaptable(
    model: str | os.PathLike[str],
    dtype: Literal["fp32", "bf16", "fp16"] = LoadOptions.dtype,
    weights: str | None = LoadOptions.weights,
    int4_kernel: bool | None = LoadOptions.int4_kernel,
    head_topk: int | None = LoadOptions.head_topk,
) -> LoadedModel:
    """``lamina.load(model)`` ready for unmerged adapters: in ``dtype``, or converted to weight format
    ``weights`` with q/k/v and gate/up kept apart (adapters target them by name); int4's kernel and
    rescored head as ``load`` gives them (``int4_kernel``, ``head_topk``). Not compiled: put the adapters
    on first, then ``lm.model.compile(dynamic=True)``.

    Raises ``ConfigError`` for a weight format adapters cannot go over (w8a8), and as ``load`` does."""
    if weights not in (None, "fp32", "bf16", "int8", "int4"):
        raise ConfigError(f"LoRA adapters run over fp32, bf16, int8 or int4 weights, not weights={weights!r}")
    check_int4_options(weights, int4_kernel, head_topk)
    lm = load(model, dtype=dtype if weights is None else "fp32", compile=False)
    prepare_for_inference(lm.model, weights, False, int4_kernel, head_topk, fuse=False)
    return lm


def load_with_adapter(
    model: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    dtype: Literal["fp32", "bf16", "fp16"] = LoadOptions.dtype,
    weights: str | None = LoadOptions.weights,
    compile: bool | None = LoadOptions.compile,
    merge: bool = True,
    int4_kernel: bool | None = LoadOptions.int4_kernel,
    head_topk: int | None = LoadOptions.head_topk,
) -> LoadedModel:
    """``lamina.load(model)`` with the PEFT adapter at ``adapter`` on it, for inference (``generate``,
    ``chat``, ``serve``, ``convert --merge-lora``).

    ``merge=True``: the base loads in fp32, the adapter merges (PEFT's ``merge_and_unload``), then the
    model becomes ``dtype`` / weight format ``weights``; decoding then costs what the base costs.
    ``merge=False``: the base loads in ``dtype`` / ``weights`` (``load_adaptable``) and the adapter runs
    beside it in fp32 (``LoraLinear``, as ``PeftModel.from_pretrained`` and vLLM do), so a quantized base
    keeps the adapter's exact update. Either way the model compiles last when ``compile``; ``int4_kernel``
    and ``head_topk`` as ``load`` reads them.

    Raises ``CheckpointError`` / ``ConfigError`` as ``load`` and ``load_adapter`` do.
    """
    check_int4_options(weights, int4_kernel, head_topk)
    if not merge:
        lm = load_adaptable(model, dtype, weights, int4_kernel, head_topk)
        load_adapter(lm.model, adapter)
        if compile:
            compile_model(lm.model)
        return lm
    lm = load(model, dtype="fp32", compile=False)  # compiled (or a cached step attached) after merging
    merge_lora(load_adapter(lm.model, adapter), unload=True)
    if weights is None and torch_dtype(dtype) != torch.float32:  # torch's names too: "bfloat16" is bf16
        lm.model.to(torch_dtype(dtype))
    # the merged model as lamina.load prepares one: converted, int4's kernel, the compiled decode step
    prepare_for_inference(lm.model, weights, compile, int4_kernel, head_topk)
    return lm


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterOptions",
    "LoraLinear",
    "adapter_layers",
    "add_serving_adapter",
    "hf_module_name",
    "lamina_module_names",
    "load_adaptable",
    "load_adapter",
    "load_with_adapter",
    "read_adapter",
    "resolve_adapter",
    "save_adapter",
]
