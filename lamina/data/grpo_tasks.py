"""Prompts and a programmatic reward for GRPO on SmolLM2 (README, "Preference tuning"): short "Name a
...". questions, and ``length_target``, a reward in [0, 1] for closeness to a 6-token answer. At a
16-token limit about 30% of SmolLM2-135M-Instruct's samples stop early (3-15 tokens), so groups of 4
usually differ and the advantages have something to compare.

``python -m lamina.data.grpo_tasks prompts.jsonl`` writes the prompts; ``--gain RUN`` prints a GRPO
run's mean reward over its first and last 5 steps (from RUN/metrics.jsonl)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
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


def reward_gain(metrics_path: str | Path, window: int = 5) -> tuple[float, float]:
    """(mean reward of the first ``window`` steps, of the last ``window``) of a GRPO run's metrics.jsonl
    (its records with ``reward``). Raises ``ValueError`` when it has fewer than ``window`` such records."""
    rows = [
        json.loads(line)
        for line in Path(metrics_path).read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    rewards = [r["reward"] for r in rows if "reward" in r]
    if len(rewards) < window:
        raise ValueError(f"{metrics_path}: {len(rewards)} steps with a reward, fewer than {window}")
    return sum(rewards[:window]) / window, sum(rewards[-window:]) / window


def main(argv: Sequence[str] | None = None) -> int:
    """Write the prompts to PATH, or with ``--gain`` print the first/last-5-step mean reward of run PATH."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m lamina.data.grpo_tasks", description=main.__doc__)
    p.add_argument("path", help="the prompts file to write (with --gain: a GRPO run folder)")
    p.add_argument("--gain", action="store_true", help="read PATH/metrics.jsonl instead of writing prompts")
    args = p.parse_args(argv)
    if args.gain:
        try:
            first, last = reward_gain(Path(args.path) / "metrics.jsonl")
        except (OSError, ValueError) as e:
            print(f"lamina: {e}", file=sys.stderr)
            return 1
        print(f"mean reward, first 5 steps {first:.3f} -> last 5 steps {last:.3f} ({last - first:+.3f})")
        return 0
    Path(args.path).parent.mkdir(parents=True, exist_ok=True)
    print(f"{len(THINGS)} prompts in {write_prompts(args.path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
