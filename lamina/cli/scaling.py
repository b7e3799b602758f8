"""``lamina scaling sweep`` (train a grid of sizes x tokens) and ``lamina scaling fit RUNS...`` (fit L(N, D))."""

from __future__ import annotations

import argparse

from lamina.analysis.fit import FitConfig
from lamina.analysis.sweep import SweepConfig
from lamina.cli.flags import add_config_file, add_fields, merged, values
from lamina.fields import build
from lamina.train.pretrain import SECTIONS as RUN_SECTIONS

SECTIONS: dict[str, type] = {k: v for k, v in RUN_SECTIONS.items() if v is not None}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``scaling`` verb and its actions."""
    p = sub.add_parser(
        "scaling",
        help="fit scaling laws to your own runs: train a grid of sizes x tokens, fit L(N, D), predict",
        description="Scaling laws from your own runs (Chinchilla's approach 3).",
    )
    acts = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = acts.add_parser(
        "sweep",
        help="train every (shape, tokens) pair of a grid as a normal pretraining run (parallel, resumable)",
        description="Train the grid --sweep.shapes x --sweep.tokens from one base run config (every "
        "pretrain flag and --config section applies) into --sweep.out/L{layers}-d{width}-t{tokens}/; "
        "finished runs are skipped and interrupted ones resumed when run again.",
        epilog="example: lamina scaling sweep --data.builtin stdlib --data.train_tokenizer 2048 --data.out "
        "runs/data --model.preset tiny --model.max_seq_len 128 --sweep.shapes 2x64,3x96,4x128 "
        "--sweep.tokens 250K,500K,1M --sweep.out runs/sweep",
    )
    add_config_file(s)
    for section, cls in SECTIONS.items():
        add_fields(s, cls, section)
    add_fields(s, SweepConfig, "sweep")
    s.set_defaults(func=_sweep)
    f = acts.add_parser(
        "fit",
        help="fit L(N, D) = E + A/N^alpha + B/D^beta to run folders, with bootstrap intervals and plots",
        description="Read each RUN folder's parameters, tokens and final validation loss, fit Chinchilla's "
        "approach 3 (Huber loss on log L, L-BFGS from the paper's start grid), print the constants with "
        "bootstrap 95%% intervals, the compute-optimal frontier, and predictions; --out writes "
        "scaling_fit.png (loss vs compute with the frontier, isoFLOP curves) and fit.json.",
        epilog="example: lamina scaling fit runs/sweep/* --predict-params 5M --predict-tokens 20M --out runs/fit",
    )
    f.add_argument("runs", nargs="+", metavar="RUN", help="pretraining run folders (at least 5)")
    add_config_file(f)
    add_fields(f, FitConfig, title="fit (FitConfig)")
    f.set_defaults(func=_fit)


def _sweep(args: argparse.Namespace) -> int:
    from lamina.analysis.sweep import sweep
    from lamina.train.pretrain import RunConfig

    data = merged(args, {**SECTIONS, "sweep": SweepConfig})
    cfg = build(SweepConfig, data.pop("sweep", {}) or {})
    runs = sweep(RunConfig.from_dict(data), cfg, progress=print)
    print(f"{len(runs)} runs in {cfg.out}; fit them with: lamina scaling fit {cfg.out}/*")
    return 0


def _fit(args: argparse.Namespace) -> int:
    from lamina.analysis.fit import fit_report

    print(fit_report(args.runs, build(FitConfig, values(args, FitConfig))))
    return 0
