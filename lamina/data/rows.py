"""Row-level helpers shared by the data readers (chat, preference, pairs, labeled)."""

from __future__ import annotations

import numpy as np


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held-out) row indices of a seeded random split of ``n`` rows with ``round(n * fraction)``
    held out, at least one on each side when ``n >= 2`` (nothing held out below that), in the order of
    ``np.random.default_rng(seed).permutation(n)``."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    k = min(max(1, round(n * fraction)), n - 1) if n > 1 else 0
    return order[k:], order[:k]
