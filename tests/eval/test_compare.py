"""Paired bootstrap comparison of two results: a real change is significant, noise is not, and results
without samples fall back to an unpaired interval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lamina.errors import ConfigError
from lamina.eval.compare import compare_results, format_comparison, paired_bootstrap


def _result(path: Path, values: list[float], samples: bool = True) -> Path:
    n = len(values)
    mean = sum(values) / n
    out = {"results": {"arc_easy": {"acc": mean, "acc_stderr": 0.05, "n": n}}}
    if samples:
        out["samples"] = {
            "arc_easy": [{"source": f"f:{i}", "metrics": {"acc": v}} for i, v in enumerate(values)]
        }
    path.write_text(json.dumps(out))
    return path


def test_bootstrap_interval() -> None:
    low, high = paired_bootstrap([0.0] * 50, [1.0] * 50)
    assert low == high == 1.0
    a = [float(i % 2) for i in range(100)]
    low, high = paired_bootstrap(a, a[1:] + a[:1])  # same mean, every pair differs
    assert low < 0 < high


def test_compare(tmp_path: Path) -> None:
    a = _result(tmp_path / "a.json", [float(i % 4 == 0) for i in range(200)])
    b = _result(tmp_path / "b.json", [float(i % 4 != 3) for i in range(200)])
    (row,) = compare_results(a, b)
    assert row.paired and row.delta == pytest.approx(0.5) and row.significant
    table = format_comparison([row])
    assert "arc_easy" in table and "+0.5000" in table and " *" in table
    (same,) = compare_results(a, a)
    assert same.delta == 0 and not same.significant
    (unpaired,) = compare_results(
        _result(tmp_path / "c.json", [1.0, 0.0], False), _result(tmp_path / "d.json", [1.0, 1.0], False)
    )
    assert not unpaired.paired and unpaired.low < unpaired.delta < unpaired.high
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"bad.json: not a `lamina eval --out` result"):
        compare_results(a, tmp_path / "bad.json")


def test_perplexity_on_the_same_text_is_compared(tmp_path: Path) -> None:
    """Two `lamina eval --perplexity t.txt` results (two checkpoints) compare on bits per byte; they were
    refused as sharing no task. Perplexity on different texts is not compared."""

    def ppl(name: str, bpb: float, text: str = "t.txt", size: int = 3000) -> Path:
        out = {"config": {"perplexity": text}, "results": {}, "samples": {},
               "perplexity": {"bits_per_byte": bpb, "token_perplexity": 9.0, "bytes": size}}  # fmt: skip
        (tmp_path / name).write_text(json.dumps(out))
        return tmp_path / name

    (row,) = compare_results(ppl("a.json", 5.6), ppl("b.json", 4.1))
    assert (row.task, row.metric, row.n) == ("perplexity", "bits_per_byte", 3000)
    assert row.delta == pytest.approx(-1.5) and not row.significant
    table = format_comparison([row])
    assert "(no interval)" in table and "lower is better" in table and "nan" not in table
    with pytest.raises(ConfigError, match="no perplexity on the same text"):
        compare_results(ppl("a.json", 5.6), ppl("c.json", 4.1, text="other.txt"))
    absolute = str(Path("t.txt").resolve())  # the same file by another path: compared (it was refused)
    assert len(compare_results(ppl("a.json", 5.6), ppl("e.json", 4.1, text=absolute))) == 1
    with pytest.raises(ConfigError, match="share no task"):
        compare_results(ppl("a.json", 5.6), ppl("d.json", 4.1, size=10))
