"""``report.html``: one self-contained page per run (pretraining, fine-tuning, a tuning study).

    write_report("runs/gpt")     # -> runs/gpt/report.html, from the files the run wrote

Everything comes from the run folder, so a report can be (re)written for any finished run: ``run.yaml``
(the exact config), ``metrics.jsonl`` (loss and learning-rate curves, validation metrics, throughput and
MFU over time), ``samples.jsonl`` (answers written during training, when the task writes them) and, for a
tuning study, ``trials.csv`` (the trials table) and ``plots/*.png``. The environment (lamina, torch, Python, CPU or GPU) is
that of the process writing the report, which the trainer does at the end of every run. Figures are
inline PNGs (``data:`` URIs) and styles are inline, so the file opens anywhere, offline; nothing is
fetched from another host. Without matplotlib the page has the tables and no figures.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import platform
from pathlib import Path
from typing import Any

REPORT = "report.html"
_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:.85em}img{max-width:100%}
.muted{color:#777}
"""


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash: the report shows the rest
                continue
    return out


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _inline(path: Path) -> str:
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'


def _figures(rows: list[dict[str, Any]], curves: Path | None) -> list[str]:
    """The loss/learning-rate figure (the run's ``curves.png`` when it drew one) and throughput/MFU."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["<p class=\"muted\">figures need matplotlib: pip install 'lamina[train]'</p>"]

    def series(key: str) -> tuple[list[float], list[float]]:
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float) and "step" in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    out = []
    if curves is not None:
        out.append(_inline(curves))
    else:
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True, height_ratios=[3, 1])
        for key, style in (("loss", "-"), ("val_loss", "o-")):
            x, y = series(key)
            if x:
                ax1.plot(x, y, style, lw=1.2, label=key)
        ax1.set_ylabel("loss")
        ax1.legend()
        ax1.grid(alpha=0.3)
        x, y = series("lr")
        if x:
            ax2.plot(x, y, color="tab:green", lw=1)
        ax2.set(ylabel="learning rate", xlabel="step")
        ax2.grid(alpha=0.3)
        out.append(_png(fig))
    tx, ty = series("tokens_per_s")
    mx, my = series("mfu")
    if tx or mx:
        fig, ax = plt.subplots(figsize=(8, 3))
        if tx:
            ax.plot(tx, ty, lw=1, label="tokens/s")
            ax.set_ylabel("tokens/s")
        if mx:
            ax_m = ax.twinx() if tx else ax
            ax_m.plot(mx, [100 * v for v in my], color="tab:red", lw=1, label="MFU %")
            ax_m.set_ylabel("MFU (%)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        out.append(_png(fig))
    return out


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return html.escape(f"{v:.5g}" if isinstance(v, float) else str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def environment() -> dict[str, str]:
    """lamina, torch and Python versions, the platform, CPU (and GPU when CUDA is available)."""
    import torch

    import lamina

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {"lamina": lamina.__version__, "torch": torch.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "cpu": f"{cpu} ({torch.get_num_threads()} threads)"}  # fmt: skip
    if torch.cuda.is_available():
        env["gpu"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return env


def write_report(folder: str | Path, title: str | None = None) -> Path:
    """Write ``folder/report.html`` from the run's files (see the module doc); returns its path."""
    folder = Path(folder)
    rows = _rows(folder / "metrics.jsonl")
    parts = [f"<h1>{html.escape(title or folder.resolve().name)}</h1>"]
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    summary = []
    if train:
        summary.append(["steps", train[-1]["step"]])
        summary.append(["final train loss", train[-1]["loss"]])
    if val:
        best = min(val, key=lambda r: r["val_loss"])
        summary += [["final validation loss", val[-1]["val_loss"]], ["best validation loss", f"{best['val_loss']:.5g} (step {best['step']})"]]  # fmt: skip
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    if tps:
        summary.append(["median tokens/s", sorted(tps)[len(tps) // 2]])
    if summary:
        parts += ["<h2>Summary</h2>", _table(["", ""], summary)]
    if rows:
        curves = folder / "curves.png"
        parts += ["<h2>Curves</h2>", *_figures(rows, curves if curves.is_file() else None)]
    if val:
        keys = sorted({k for r in val for k in r if k not in ("step",) and isinstance(r[k], int | float)})
        parts += ["<h2>Validation</h2>", _table(["step", *keys], [[r["step"], *(r.get(k, "") for k in keys)] for r in val])]  # fmt: skip
    trials = folder / "trials.csv"
    if trials.is_file():
        with trials.open(encoding="utf-8", newline="") as fh:
            table = list(csv.reader(fh))
        if table:
            parts += ["<h2>Trials</h2>", _table(table[0], table[1:])]
    plots = sorted((folder / "plots").glob("*.png"))
    if plots:
        parts += ["<h2>Plots</h2>"]
        parts += [_inline(p) for p in plots]
    samples = _rows(folder / "samples.jsonl")
    if samples:
        shown = samples[-10:]
        parts += [f"<h2>Samples (last {len(shown)} of {len(samples)})</h2>"]
        parts += [f"<pre>{html.escape(json.dumps(s, ensure_ascii=False, indent=1))}</pre>" for s in shown]
    config = folder / "run.yaml"
    if config.is_file():
        parts += [
            "<h2>Config (run.yaml)</h2>",
            f"<pre>{html.escape(config.read_text(encoding='utf-8'))}</pre>",
        ]
    parts += ["<h2>Environment</h2>", _table(["", ""], [[k, v] for k, v in environment().items()])]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title or folder.name)} - lamina report</title><style>{_STYLE}</style></head>"
        f"<body>{''.join(parts)}</body></html>\n"
    )
    path = folder / REPORT
    tmp = folder / (REPORT + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
