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
    train; returns the run's note saying how many parameters train (empty without ``lora``).

    Raises ``ConfigError`` for ``lora.base_weights`` (a quantized frozen base), which finetune does not run yet.
    """
    if lora is None:
        return []
    if lora.base_weights is not None:
        raise ConfigError(
            f"lora.base_weights={lora.base_weights} (a quantized frozen base) is not wired into finetune "
            "yet; leave it unset"
        )
    from lamina.model.lora import apply_lora, count_trainable, lora_layers

    torch.manual_seed(seed)
    apply_lora(model, lora)
    trained, total = count_trainable(model)
    return [
        f"LoRA r={lora.r} on {len(lora_layers(model))} layers: {trained:,} of {total:,} parameters "
        f"train ({trained / total:.2%})"
    ]
