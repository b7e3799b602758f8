"""``lamina tune --config run.yaml --search 'train.lr=loguniform(1e-4,3e-2)' --trials 20``: hyperparameter
search over any field of a pretrain or finetune run config, with Optuna (``lamina.train.search``)."""

from __future__ import annotations

import argparse

from lamina.cli.flags import (
    HelpFormatter,
    add_alias,
    add_config_file,
    add_fields,
    add_top_level,
    given,
    merged,
    print_config,
)
from lamina.fields import build, fields_of, read_yaml
from lamina.train.search import TuneConfig, print_results, run_sections, search_specs, tune

# every section a pretrain or finetune run config has: one table each, in lamina.train (None: a top-level
# value such as init, which has its own flag)
SECTIONS: dict[str, type] = {
    k: v for k, v in {**run_sections("pretrain"), **run_sections("finetune")}.items() if v is not None
}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``tune`` verb: the search's own flags plus every field of the run config's sections."""
    p = sub.add_parser(
        "tune",
        formatter_class=HelpFormatter,
        help="search hyperparameters (any config field) with Optuna: grid, random or TPE, with pruning",
        description="Run trials of a pretrain or finetune run (the run config: --config FILE and "
        "--SECTION.FIELD flags, as for those verbs), each with the searched fields set by Optuna's sampler, "
        "each in its own folder OUT/trials/NNNN/. Every evaluation reports --objective to the pruner, which "
        "may stop a trial early. The study lives in --storage (default OUT/study.db): running the same "
        "command again continues it, and a PostgreSQL URL shares it between machines. At the end: the "
        "trials as a table (OUT/trials.csv), the best trial's run config (OUT/best.yaml) and plots "
        "(OUT/plots/). The config file may hold a search: section (field: distribution) and a tune: "
        "section (these flags' fields).",
        epilog="distributions: uniform(LOW,HIGH[,step=S])  loguniform(LOW,HIGH)  int(LOW,HIGH[,step=S][,log=true])"
        "  choice(A,B,...)\nexample:\n  lamina tune --config run.yaml --search 'train.lr=loguniform(1e-4,3e-2)' "
        "--search 'model.n_layers=choice(2,4,6)' --sampler tpe --trials 30 --jobs 2 --out runs/tune",
    )
    add_config_file(p)
    add_fields(p, TuneConfig, skip=("search",))
    add_alias(p, "--search", TuneConfig, "search", append=True, metavar="FIELD=DIST",
              help="SECTION.FIELD=DISTRIBUTION to search, e.g. 'train.lr=loguniform(1e-4,3e-2)'; repeat for "
              "several (added to the config file's search: section)")  # fmt: skip
    p.set_defaults(_lamina_sources=None)  # not a one-config verb: run() prints --print-config itself
    add_top_level(
        p, "--init", "init", "the MODEL every trial starts from (finetune; pretrain: continue)", "MODEL"
    )
    for section, cls in SECTIONS.items():
        add_fields(p, cls, section)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Split file + flags into the search (tune section, search, flat flags) and the run config; tune."""
    data = merged(args, SECTIONS)
    file = read_yaml(args.config) if args.config else {}
    names = {f.name for f in fields_of(TuneConfig)}
    settings = dict(data.pop("tune", None) or {})
    settings.update({k: data.pop(k) for k in list(data) if k in names and k != "search"})
    data.pop("search", None)
    settings["search"] = search_specs(file.get("search")) + list(given(args).get("search", []))
    cfg = build(TuneConfig, settings, "tune")
    if args.print_config:
        print_config({"tune": cfg, **data})
        return 0
    print_results(tune(cfg, data))
    return 0
