"""Compare two evaluation results (``lamina eval --out``) task by task, with a paired bootstrap confidence
interval on the difference of the main metric.

    rows = compare_results("base.json", "tuned.json")
    print(format_comparison(rows))

Pairing: the same items (matched by their ``source`` "file:row") were scored by both runs; the
difference B - A of the mean is resampled over items with replacement ``n_resamples`` times (seeded);
the interval is the (alpha/2, 1 - alpha/2) percentiles (Efron & Tibshirani 1993; Koehn 2004 for MT).
A change is significant when the interval excludes 0. Results without per-sample records fall back to an
unpaired normal interval from the two standard errors (marked "unpaired").

Two results with ``--perplexity`` on the same text (the same file, its paths resolved from the current
folder, and the same byte count) also get a
``perplexity`` row on ``bits_per_byte`` (lower is better; comparable across tokenizers). Perplexity keeps
no per-window records, so that row has no interval and is never marked significant.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lamina.errors import ConfigError

MAIN_METRICS = ("acc_norm", "mc2", "acc", "exact_match", "strict_match", "f1")


@dataclass
class Comparison:
    """One task's change: ``delta`` = B - A of ``metric``, its interval ``low``..``high``."""

    task: str
    metric: str
    a: float
    b: float
    delta: float
    low: float
    high: float
    n: int
    paired: bool

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0


def _read(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{p}: cannot read an evaluation result ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ConfigError(f"{p}: not a `lamina eval --out` result (no 'results' object)")
    return data


def main_metric(metrics: dict[str, Any]) -> str:
    """The metric a task is compared on: the first of ``MAIN_METRICS`` it has."""
    for name in MAIN_METRICS:
        if name in metrics:
            return name
    raise ConfigError(f"no comparable metric among {sorted(metrics)}")


def paired_bootstrap(
    a: list[float], b: list[float], n_resamples: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """The (alpha/2, 1-alpha/2) percentile interval of mean(b - a) over resamples of the pairs."""
    diffs = [y - x for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_resamples))
    lo = means[max(0, math.floor(alpha / 2 * n_resamples))]
    hi = means[min(n_resamples - 1, math.ceil((1 - alpha / 2) * n_resamples) - 1)]
    return lo, hi


def compare_results(
    a: str | Path, b: str | Path, n_resamples: int = 1000, alpha: float = 0.05, seed: int = 0
) -> list[Comparison]:
    """Per task present in both results: the main metric's change with its interval (module doc)."""
    ra, rb = _read(a), _read(b)
    common = [t for t in ra["results"] if t in rb["results"]]
    perplexity = _perplexity_row(ra, rb)
    if not common and perplexity is None:
        raise ConfigError(
            f"{a} and {b} share no task (A: {sorted(ra['results'])}, B: {sorted(rb['results'])}) and no "
            "perplexity on the same text; evaluate both with the same --tasks or --perplexity FILE"
        )
    z = 1.959963984540054 if alpha == 0.05 else _z(alpha)
    rows = []
    for task in common:
        ma, mb = ra["results"][task], rb["results"][task]
        metric = main_metric(ma)
        sa = {s["source"]: s["metrics"][metric] for s in ra.get("samples", {}).get(task, [])}
        sb = {s["source"]: s["metrics"][metric] for s in rb.get("samples", {}).get(task, [])}
        keys = [k for k in sa if k in sb]
        if keys:
            xa, xb = [sa[k] for k in keys], [sb[k] for k in keys]
            low, high = paired_bootstrap(xa, xb, n_resamples, alpha, seed)
            va, vb = sum(xa) / len(xa), sum(xb) / len(xb)
            rows.append(Comparison(task, metric, va, vb, vb - va, low, high, len(keys), True))
        else:
            va, vb = float(ma[metric]), float(mb[metric])
            se = math.hypot(float(ma.get(f"{metric}_stderr", 0)), float(mb.get(f"{metric}_stderr", 0)))
            n = int(min(ma.get("n", 0), mb.get("n", 0)))
            rows.append(
                Comparison(task, metric, va, vb, vb - va, vb - va - z * se, vb - va + z * se, n, False)
            )
    return rows if perplexity is None else [*rows, perplexity]


def _perplexity_row(ra: dict[str, Any], rb: dict[str, Any]) -> Comparison | None:
    """The ``bits_per_byte`` change when both results scored perplexity on the same text, else None."""
    pa, pb = ra.get("perplexity"), rb.get("perplexity")
    if (
        not isinstance(pa, dict)
        or not isinstance(pb, dict)
        or "bits_per_byte" not in pa
        or "bits_per_byte" not in pb
    ):
        return None
    fa, fb = ((r.get("config") or {}).get("perplexity") for r in (ra, rb))
    # one file given as data/t.txt and as /home/me/data/t.txt is the same file
    same_file = fa == fb or (isinstance(fa, str) and isinstance(fb, str) and _resolved(fa) == _resolved(fb))
    if not same_file or pa.get("bytes") != pb.get("bytes"):
        return None
    va, vb = float(pa["bits_per_byte"]), float(pb["bits_per_byte"])
    nan = float("nan")  # no per-window records: no interval, never "significant"
    return Comparison(
        "perplexity", "bits_per_byte", va, vb, vb - va, nan, nan, int(pa.get("bytes", 0)), False
    )


def _resolved(path: str) -> Path:
    return Path(path).expanduser().resolve()


def _z(alpha: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(1 - alpha / 2)


def format_comparison(rows: list[Comparison], alpha: float = 0.05) -> str:
    """A table: task, metric, A, B, delta, interval, n, and "*" for a significant change."""
    level = f"{100 * (1 - alpha):g}% CI"
    lines = [f"{'task':<28} {'metric':<12} {'A':>7} {'B':>7} {'B-A':>8}  {level:<19} {'n':>5}"]
    for r in rows:
        mark = " *" if r.significant else ""
        kind = "" if r.paired else " unpaired"
        interval = f"[{r.low:+.4f}, {r.high:+.4f}]"
        if math.isnan(r.low):  # perplexity: no per-item records to resample; n counts bytes
            interval, kind = f"{'(no interval)':<19}", " bytes; lower is better"
        lines.append(
            f"{r.task:<28} {r.metric:<12} {r.a:>7.4f} {r.b:>7.4f} {r.delta:>+8.4f}  {interval} {r.n:>5}{mark}{kind}"
        )
    lines.append("* the interval excludes 0: a significant change")
    return "\n".join(lines)
