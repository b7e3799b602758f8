"""Prompts and a programmatic reward for GRPO on SmolLM2 (README, "Preference tuning"): short "Name a
...". questions, and ``length_target``, a reward in [0, 1] for closeness to a 6-token answer. At a
16-token limit about 30% of SmolLM2-135M-Instruct's samples stop early (3-15 tokens), so groups of 4
usually differ and the advantages have something to compare."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

THINGS = ["color", "fruit", "animal", "country", "city", "flower", "planet", "bird", "tree", "metal",
          "fish", "sport", "vegetable", "instrument", "language", "river"]  # fmt: skip
LENGTH_TARGET = 6  # tokens, the end-of-turn token counted


def write_prompts(path: str | Path) -> Path:
    """Write one ``{"prompt": [{"role": "user", "content": "Name a color."}]}`` line per ``THINGS`` entry."""
    rows = [{"prompt": [{"role": "user", "content": f"Name a {t}."}]} for t in THINGS]
    p = Path(path)
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return p


def length_target(
    prompts: list[Any], completions: list[Any], completion_ids: list[list[int]], **kwargs: Any
) -> list[float]:
    """TRL-signature reward: ``max(0, 1 - |n - LENGTH_TARGET| / LENGTH_TARGET)`` for a completion of ``n``
    tokens: 1 at the target, 0 at twice the target or more."""
    return [max(0.0, 1.0 - abs(len(c) - LENGTH_TARGET) / LENGTH_TARGET) for c in completion_ids]
