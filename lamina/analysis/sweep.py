"""``lamina scaling sweep``: train a grid of model sizes x token budgets, each a normal pretraining run.

    runs = sweep(RunConfig.from_yaml("run.yaml"), SweepConfig(shapes=["2x64", "4x128"], tokens=[1e6, 4e6]))
    points = [read_run(p) for p in runs]             # then lamina.analysis.fit.fit_law(points)

Every (shape, tokens) pair becomes ``OUT/L{n_layers}-d{d_model}-t{tokens}/``: the base run config with
``n_layers``, ``d_model`` and ``n_heads = d_model / head_dim`` set and ``max_steps`` = tokens / (batch size
x sequence length x gradient accumulation), trained by :func:`lamina.train.pretrain.pretrain` (so it holds
``run.yaml``, ``metrics.jsonl``, checkpoints, ``best/`` and ``last/`` as any run). The data is prepared
once and shared. The sweep is resumable: a finished run (its ``sweep.json`` written after training) is
skipped, an interrupted one resumes from its newest checkpoint; ``jobs`` runs train at once in their own
processes, each with ``cores / jobs`` threads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from lamina.errors import ConfigError
from lamina.fields import parse_size

# "250K,1M" or "[250K, 1M]": a list of token counts
SIZES = {"parse": lambda text: [parse_size(x) for x in text.strip().strip("[]").split(",") if x.strip()]}
DONE = "sweep.json"  # written into a run folder when its training finished


@dataclass
class SweepConfig:
    """The grid ``lamina scaling sweep`` trains (the ``--sweep.*`` flags)."""

    shapes: list[str] = field(
        default_factory=lambda: ["2x64", "3x96", "4x128"]
    )  # model shapes, n_layers x d_model
    tokens: list[int] = field(
        default_factory=lambda: [250_000, 500_000, 1_000_000], metadata=SIZES
    )  # per run
    head_dim: int = 32  # attention head size: n_heads = d_model / head_dim
    out: str = "runs/sweep"  # the folder holding one run folder per (shape, tokens)
    jobs: int = 1  # runs trained at once, in their own processes (each gets cores / jobs threads)

    def __post_init__(self) -> None:
        self.shapes = [x.strip() for entry in self.shapes for x in str(entry).split(",") if x.strip()]
        for shape in self.shapes:
            m = re.fullmatch(r"(\d+)x(\d+)", str(shape))
            if m is None or int(m.group(2)) % self.head_dim:
                raise ConfigError(f"sweep shape {shape!r} must be N_LAYERSxD_MODEL with d_model a multiple of "
                                  f"head_dim={self.head_dim} (e.g. 4x128)")  # fmt: skip
        if not self.shapes or not self.tokens:
            raise ConfigError("a sweep needs at least one shape and one token budget")
        if self.jobs < 1:
            raise ConfigError(f"jobs={self.jobs} must be >= 1")


def plan_runs(run: Any, cfg: SweepConfig) -> list[tuple[Path, Any]]:
    """(folder, RunConfig) of every run of the grid: shapes in the order given, token budgets ascending."""
    out = []
    t = run.train
    per_step = t.batch_size * (t.seq_len or run.model.max_seq_len) * t.grad_accum_steps
    for shape in cfg.shapes:
        n_layers, d_model = (int(x) for x in shape.split("x"))
        for tokens in sorted(cfg.tokens):
            folder = Path(cfg.out) / f"L{n_layers}-d{d_model}-t{tokens}"
            model = dataclasses.replace(run.model, n_layers=n_layers, d_model=d_model,
                                        n_heads=d_model // cfg.head_dim, n_kv_heads=None, head_dim=None, d_ff=None)  # fmt: skip
            steps = max(1, math.ceil(tokens / per_step))
            train = dataclasses.replace(t, max_steps=steps, epochs=None, out_dir=str(folder),
                                        eval_every=min(t.eval_every, steps), progress=False)  # fmt: skip
            out.append((folder, dataclasses.replace(run, model=model, train=train)))
    return out


def _train_one(folder: Path, run: Any, threads: int) -> str:
    import torch

    from lamina.train.pretrain import pretrain

    torch.set_num_threads(threads)
    resume = (folder / "checkpoints").is_dir() and any((folder / "checkpoints").iterdir())
    _, _, result = pretrain(run, resume=resume, overwrite=not resume and folder.exists())
    tmp = folder / (DONE + ".tmp")
    tmp.write_text(json.dumps({"params": run.model.n_params, "steps": result.steps}) + "\n")
    tmp.replace(folder / DONE)
    return str(folder)


def sweep(run: Any, cfg: SweepConfig, progress: Callable[[str], None] | None = None) -> list[Path]:
    """Train every run of the grid that has not finished (see the module doc); the run folders."""
    from lamina.train.pretrain import prepare_data

    prepare_data(run, progress=run.train.progress)  # once, before the runs share it
    runs = plan_runs(run, cfg)
    todo = [(f, r) for f, r in runs if not (f / DONE).is_file()]
    if progress:
        progress(f"{len(runs)} runs, {len(runs) - len(todo)} already finished")
    if cfg.jobs == 1:
        for folder, r in todo:
            _train_one(folder, r, max(1, os.cpu_count() or 1))
            if progress:
                progress(f"finished {folder}")
    else:
        threads = max(1, (os.cpu_count() or 1) // cfg.jobs)
        with ProcessPoolExecutor(cfg.jobs, mp_context=get_context("spawn")) as pool:
            for done in pool.map(
                _train_one, [f for f, _ in todo], [r for _, r in todo], [threads] * len(todo)
            ):
                if progress:
                    progress(f"finished {done}")
    return [f for f, _ in runs]
