"""Freezing parameters by block index or name pattern, so fine-tuning leaves them bit-identical.

A spec is a block index (``"0"``), a range of block indices (``"0-3"``, inclusive), or a glob over
parameter names (``"tok_emb.*"``, ``"blocks.*.attn.*"``, ``"*norm*"``). Frozen parameters get
``requires_grad=False``, so the optimizer never sees them (no update, no weight decay).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from torch import nn

from lamina.errors import ConfigError

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
