"""Freezing parameters by block index or name pattern, so fine-tuning leaves them bit-identical.

A spec is a block index (``"0"``), a range of block indices (``"0-3"``, inclusive), or a glob over
parameter names (``"tok_emb.*"``, ``"blocks.*.attn.*"``, ``"*norm*"``). Frozen parameters get
``requires_grad=False``, so the optimizer never sees them (no update, no weight decay).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

import torch
from torch import nn

from lamina.errors import ConfigError
from lamina.model.lora import LoraConfig
from lamina.model.transformer import Transformer

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def freeze(model: nn.Module, specs: Sequence[str]) -> list[str]:
    """Freeze the parameters ``specs`` select; returns their names. A spec that selects nothing is an
    error naming the valid block indices."""
    names = [n for n, _ in model.named_parameters()]
    n_blocks = 1 + max((int(m.group(1)) for n in names if (m := re.match(r"blocks\.(\d+)\.", n))), default=-1)
    chosen: set[str] = set()
    for spec in specs:
        if m := _RANGE.match(spec.strip()):
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi < lo or hi >= n_blocks:
                raise ConfigError(
                    f"freeze={spec!r}: block indices must be in 0..{n_blocks - 1} (this model has {n_blocks} blocks)"
                )
            hits = [n for n in names if any(n.startswith(f"blocks.{i}.") for i in range(lo, hi + 1))]
        else:
            hits = fnmatch.filter(names, spec)
        if not hits:
            raise ConfigError(
                f"freeze={spec!r} matches no parameter; use block indices (0..{n_blocks - 1}, e.g. '0-1') or "
                f"a glob over names such as {', '.join(names[:3])}"
            )
        chosen.update(hits)
    for name, p in model.named_parameters():
        if name in chosen:
            p.requires_grad_(False)
    return sorted(chosen)


def apply_run_lora(lora: LoraConfig | None, model: Transformer, seed: int) -> list[str]:
    """Put ``lora``'s adapters on ``model`` (initialised from ``seed``: part of the run) so that only they
    train; returns the run's notes: how many parameters train and, over a quantized base
    (``lora.base_weights``, QLoRA), the base's bytes before and after (empty without ``lora``).

    Raises ``ConfigError`` as ``lamina.model.lora.apply_lora`` does.
    """
    if lora is None:
        return []
    from lamina.checkpoint.peft import check_savable
    from lamina.model.lora import apply_lora, count_trainable, lora_layers

    before, (_, base_params) = _frozen_bytes(model), count_trainable(model)
    torch.manual_seed(seed)
    apply_lora(model, lora)
    check_savable(model)  # a module the adapter could not hold fails now, not at the first checkpoint
    trained, _ = count_trainable(model)
    adapters = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    total = base_params + adapters  # a quantized base's weights are buffers: counted from before
    notes = [
        f"LoRA r={lora.r} on {len(lora_layers(model))} layers: {trained:,} of {total:,} parameters "
        f"train ({trained / total:.2%})"
    ]
    if lora.base_weights is not None:
        after = _frozen_bytes(model)
        notes.append(
            f"QLoRA: the frozen base in {lora.base_weights} holds {_size(after)} of weights instead of "
            f"{_size(before)} ({after / before:.0%}); checkpoints keep the fp32 base"
        )
    return notes


def _frozen_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers, adapters aside (a tied tensor counts once)."""
    seen: set[int] = set()
    total = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if ".lora_" in name or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"
