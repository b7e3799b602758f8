"""Hyperparameter search over any field of a run config, with Optuna (``lamina tune``).

A search space is a list of ``SECTION.FIELD=DISTRIBUTION`` (flags ``--search``, or the run YAML's
``search:`` section, ``{train.lr: loguniform(1e-4, 3e-2)}`` or nested ``{train: {lr: ...}}``)::

    uniform(LOW, HIGH[, step=S])      a float in [LOW, HIGH]
    loguniform(LOW, HIGH)             a float in [LOW, HIGH], uniform in log space (LOW > 0)
    int(LOW, HIGH[, step=S][, log=true])   an integer in [LOW, HIGH]
    choice(A, B, ...)                 one of the values, each read by the field's type (a YAML list too)

The field is any field of the run's sections (pretrain: model, data, train, init; finetune: model, task,
sft, train, init), checked before anything runs (an unknown name gets the nearest ones). Each trial is a
normal ``pretrain`` / ``finetune`` run built through the same config path (``lamina.fields.build``) in
``OUT/trials/NNNN/`` (run.yaml, metrics.jsonl, checkpoints); every evaluation reports the objective
metric (a key of metrics.jsonl: val_loss, val_ppl, accuracy, f1, ...) to Optuna, whose pruner may stop
the trial there. A trial whose config fails validation, or whose training fails, is recorded as failed
with its reason and the study goes on.

The study lives in an Optuna RDB storage (``OUT/study.db`` by default; a ``postgresql+psycopg://`` URL
shares it between machines), so the same command run again continues it: finished trials are kept, and
a trial whose process died (no heartbeat for 2 x ``heartbeat`` seconds) is marked failed and retried
once with the same parameters (Optuna's ``RetryHeartbeatStaleTrialCallback``). ``jobs`` trial processes
run on one machine, the CPU threads split between them (the thread count is part of each trial's config,
``train.threads``, so a trial's numbers are reproducible). ``trials`` counts every trial of the study,
over processes, machines and re-runs (a retried trial counts once); with several processes at most
``jobs - 1`` more may start at the very end.

Results (``OUT/``): ``trials.csv`` and the printed table (trials sorted by the objective, the searched
fields as columns), ``best.yaml`` (the best trial's complete run config, which ``lamina pretrain
--config best.yaml`` re-runs to the same metric), and ``plots/*.png`` (optimisation history, parameter
importances, slice and contour plots; ``optuna.visualization.matplotlib``).

Optuna and matplotlib are the ``tune`` extra, imported only when a search runs. References: Optuna
(Akiba et al., 2019, https://optuna.org), Hugging Face ``Trainer.hyperparameter_search``.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import socket
import statistics
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from lamina.errors import ConfigError, LaminaError
from lamina.fields import coerce, did_you_mean, fields_of, parse_yaml

if TYPE_CHECKING:
    import optuna

Verb = Literal["pretrain", "finetune"]
KINDS = ("uniform", "loguniform", "int", "choice")
LOWER_IS_BETTER = ("loss", "ppl", "mse", "mae", "error", "perplexity")


@dataclass
class TuneConfig:
    """A hyperparameter search: the space, the Optuna sampler and pruner, the study's storage."""

    # SECTION.FIELD=DISTRIBUTION, e.g. train.lr=loguniform(1e-4,3e-2), model.n_layers=choice(2,4),
    # train.warmup_steps=int(0,200,step=50), train.dropout=uniform(0,0.3)
    search: list[str] = field(default_factory=list)
    sampler: Literal["tpe", "random", "grid"] = "tpe"  # tpe (Bayesian), random, or grid (every point once)
    trials: int = 20  # trials in the study, over every process and re-run (grid: at most its points)
    objective: str = "val_loss"  # the evaluation metric to optimise (metrics.jsonl: val_ppl, accuracy, ...)
    direction: Literal["auto", "minimize", "maximize"] = "auto"  # auto: minimize loss/ppl/mse, else maximize
    pruner: Literal["median", "hyperband", "none"] = "median"  # stops trials whose evaluations fall behind
    n_startup_trials: int = 10  # tpe: random trials before the model of good/bad trials takes over
    pruner_startup_trials: int = 5  # median: finished trials before any trial is pruned
    pruner_warmup_steps: int = 0  # median: training steps of a trial before it may be pruned
    jobs: int = 1  # trial processes on this machine (each gets threads / jobs CPU threads)
    threads: int | None = None  # CPU threads split between the jobs (None: every core)
    study: str | None = None  # the study's name in the storage (None: the out folder's name)
    # an Optuna RDB URL (postgresql+psycopg://user@host:5432/db shares a study between machines;
    # None: sqlite:///OUT/study.db)
    storage: str | None = None
    seed: int | None = None  # the sampler's seed (job i uses seed + i; None: random)
    heartbeat: int = 30  # seconds between a running trial's heartbeats; silent 2x this: failed, retried once
    # what a trial runs (auto: finetune when the config has a task or sft section, else pretrain)
    verb: Literal["auto", "pretrain", "finetune"] = "auto"
    out: str = "runs/tune"  # the study's folder: trials/NNNN/, study.db, trials.csv, best.yaml, plots/
    plots: bool = True  # draw plots/*.png at the end

    def __post_init__(self) -> None:
        for name in ("trials", "jobs", "heartbeat", "n_startup_trials"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")
        for name in ("pruner_startup_trials", "pruner_warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        if self.threads is not None and self.threads <= 0:
            raise ConfigError(f"threads={self.threads} must be positive (or null: every core)")
        if not self.out:
            raise ConfigError("out must name the study's folder")


def run_sections(verb: Verb) -> dict[str, type | None]:
    """The sections of a ``verb`` run config (None: a top-level value such as ``init``)."""
    if verb == "pretrain":
        from lamina.train.pretrain import SECTIONS as PRETRAIN

        return dict(PRETRAIN)
    from lamina.train.finetune import SECTIONS as FINETUNE

    return dict(FINETUNE)


def resolve_verb(verb: str, run: Mapping[str, Any]) -> Verb:
    """``auto``: finetune when the run config has a ``task`` or ``sft`` section, else pretrain."""
    if verb != "auto":
        return verb  # type: ignore[return-value]
    return "finetune" if run.get("task") is not None or run.get("sft") is not None else "pretrain"


# -- the search space ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One searched field: ``name`` (``section.field``), its distribution and the field's type."""

    name: str
    kind: str  # uniform, loguniform, int or choice
    low: float = 0.0
    high: float = 0.0
    step: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    text: str = ""

    @property
    def section(self) -> str | None:
        return self.name.partition(".")[0] if "." in self.name else None

    @property
    def key(self) -> str:
        return self.name.rpartition(".")[2]

    def distribution(self) -> optuna.distributions.BaseDistribution:
        """The Optuna distribution of this parameter."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "choice":
            return CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            step = int(self.step) if self.step is not None else 1
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=step)
        return FloatDistribution(self.low, self.high, log=self.kind == "loguniform", step=self.step)

    def suggest(self, trial: optuna.Trial) -> Any:
        """This parameter's value for ``trial`` (Optuna's ``suggest_*``)."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            step = int(self.step) if self.step is not None else 1
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=step, log=self.log)
        return trial.suggest_float(
            self.name, self.low, self.high, step=self.step, log=self.kind == "loguniform"
        )

    def grid(self) -> list[Any]:
        """Every value of a discrete parameter (grid search). Raises ``ConfigError`` for a continuous one."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int" and not self.log:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.kind == "uniform" and self.step is not None:
            n = round((self.high - self.low) / self.step)
            return [self.low + i * self.step for i in range(n + 1)]
        raise ConfigError(
            f"{self.name}={self.text}: grid search needs discrete values: use choice(...), int(...) or "
            "uniform(low, high, step=S)"
        )


def parse_search(specs: Sequence[str] | Mapping[str, Any], verb: Verb) -> list[Param]:
    """The search space from ``SECTION.FIELD=DISTRIBUTION`` strings (or a ``search:`` mapping).

    Raises ``ConfigError`` for an unknown section or field (naming the nearest), a malformed or unknown
    distribution, bounds the wrong way round, a value the field's type cannot hold. A field given twice: the later one wins.
    """
    items = _search_items(specs)
    if not items:
        raise ConfigError(
            "nothing to search: give --search SECTION.FIELD=DISTRIBUTION (e.g. 'train.lr=loguniform(1e-4,3e-2)') "
            "or a search: section in the config"
        )
    sections = run_sections(verb)
    params: dict[str, Param] = {}
    for name, text in items:  # a field given again (a flag after the file) replaces the earlier one
        tp, parse = _field_type(name, sections, verb)
        params.pop(name, None)
        params[name] = _parse_distribution(name, text, tp, parse)
    return list(params.values())


def search_specs(value: Any) -> list[str]:
    """A run YAML's ``search:`` section as ``FIELD=DISTRIBUTION`` strings: a list of them, or a mapping
    ``{train.lr: loguniform(1e-4, 3e-2)}`` (nested ``{train: {lr: ...}}`` too; a list value is a choice)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [f"{name}={_render(v) if not isinstance(v, list) else 'choice(' + ', '.join(map(_render, v)) + ')'}"
                for name, v in _search_items(value)]  # fmt: skip
    if isinstance(value, list):
        return [str(v) for v in value]
    raise ConfigError(
        f"search must be a list of FIELD=DISTRIBUTION or a mapping of field: distribution, got {value!r}"
    )


def _render(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_render(x) for x in v) + "]"
    return "null" if v is None else str(v)


def _search_items(specs: Sequence[str] | Mapping[str, Any]) -> list[tuple[str, Any]]:
    if isinstance(specs, Mapping):
        out: list[tuple[str, Any]] = []
        for key, value in specs.items():
            if isinstance(value, Mapping):  # nested: {train: {lr: ...}}
                out += [(f"{key}.{k}", v) for k, v in value.items()]
            else:
                out.append((str(key), value))
        return out
    out = []
    for spec in specs:
        name, eq, text = str(spec).partition("=")
        if not eq or not name.strip() or not text.strip():
            raise ConfigError(
                f"--search {spec!r} must be SECTION.FIELD=DISTRIBUTION, e.g. 'train.lr=loguniform(1e-4,3e-2)'"
            )
        out.append((name.strip(), text.strip()))
    return out


def _field_type(name: str, sections: Mapping[str, type | None], verb: Verb) -> tuple[Any, Any]:
    """The type (and text parser) of the run config field ``name`` (``section.field`` or ``init``)."""
    section, dot, key = name.partition(".")
    if section not in sections:
        raise ConfigError(
            f"search field {name!r}: {verb} has no section {section!r}{did_you_mean(section, sections)}"
        )
    cls = sections[section]
    if cls is None:
        if dot:
            raise ConfigError(
                f"search field {name!r}: {section} is a value, not a section; write {section}=..."
            )
        return str | None, None
    specs = {f.name: f for f in fields_of(cls)}
    if not dot or key not in specs:
        known = [f"{section}.{k}" for k in specs]
        raise ConfigError(f"unknown search field {name!r}{did_you_mean(name, known)}")
    return specs[key].type, specs[key].parse


_CALL = re.compile(r"^\s*([A-Za-z_]\w*)\s*\((.*)\)\s*$", re.S)


def _parse_distribution(name: str, value: Any, tp: Any, parse: Any) -> Param:
    if isinstance(value, list):  # YAML list: a choice
        return _choice(name, list(value), tp, parse, repr(value))
    text = str(value).strip()
    example = "e.g. loguniform(1e-4, 3e-2), uniform(0, 0.3), int(2, 8, step=2) or choice(a, b)"
    m = _CALL.match(text)
    if m is None:
        raise ConfigError(f"{name}={text!r} is not a distribution: write KIND(ARGS), {example}")
    kind, inner = m.group(1), m.group(2)
    if kind not in KINDS:
        raise ConfigError(f"{name}={text!r}: unknown distribution {kind!r}{did_you_mean(kind, KINDS)}")
    args, kwargs = _split_args(inner, name, text)
    if kind == "choice":
        if kwargs or not args:
            raise ConfigError(f"{name}={text!r}: choice takes one or more values, e.g. choice(2, 4, 6)")
        return _choice(name, args, tp, parse, text)
    allowed = {"uniform": {"step"}, "loguniform": set(), "int": {"step", "log"}}[kind]
    if len(args) != 2 or set(kwargs) - allowed:
        extra = f"[, {', '.join(f'{k}=...' for k in sorted(allowed))}]" if allowed else ""
        raise ConfigError(f"{name}={text!r}: {kind} takes (low, high{extra}), {example}")
    numeric = int if kind == "int" else float
    try:
        low, high = (numeric(coerce(a, numeric, name)) for a in args)
        step = numeric(coerce(kwargs["step"], numeric, name)) if "step" in kwargs else None
        log = bool(coerce(kwargs.get("log", "false"), bool, name))
    except ConfigError:
        raise ConfigError(
            f"{name}={text!r}: {kind}'s bounds must be {numeric.__name__}s, {example}"
        ) from None
    if low > high:
        raise ConfigError(
            f"{name}={text!r}: the bounds are the wrong way round (low {args[0]} > high {args[1]}); "
            f"write {kind}({args[1]}, {args[0]}{''.join(f', {k}={v}' for k, v in kwargs.items())})"
        )
    if low == high:
        raise ConfigError(f"{name}={text!r}: low equals high; set the field itself to search nothing")
    if (kind == "loguniform" or log) and low <= 0:
        raise ConfigError(f"{name}={text!r}: a log scale needs low > 0")
    if step is not None and step <= 0:
        raise ConfigError(f"{name}={text!r}: step must be positive")
    _check_numeric_field(name, text, kind, tp)
    return Param(name, kind, low, high, step, log, text=text)


def _check_numeric_field(name: str, text: str, kind: str, tp: Any) -> None:
    """A numeric distribution only for a numeric field: int(...) for int fields, any for float ones."""
    from typing import get_args

    types = {tp} | set(get_args(tp))
    if float in types or (int in types and kind == "int"):
        return
    if int in types:
        raise ConfigError(f"{name}={text!r}: {name} is an integer field; use int(low, high) or choice(...)")
    raise ConfigError(f"{name}={text!r}: {name} is not a number; use choice(...)")


def _choice(name: str, values: list[Any], tp: Any, parse: Any, text: str) -> Param:
    """A choice, each value read by the field's type now (a value the type cannot hold is an error)."""
    choices: list[Any] = []
    for v in values:
        typed = coerce(v, tp, name, parse)  # raises ConfigError naming the field
        # Optuna stores None, bool, int, float and str; any other value (a list) stays as its text
        choices.append(typed if typed is None or isinstance(typed, bool | int | float | str) else v)
    if len(set(map(repr, choices))) != len(choices):
        raise ConfigError(f"{name}={text!r}: a choice is listed twice")
    return Param(name, "choice", choices=tuple(choices), text=text)


def _split_args(inner: str, name: str, text: str) -> tuple[list[str], dict[str, str]]:
    """``"1e-4, 3e-2, step=1"`` -> ``(["1e-4", "3e-2"], {"step": "1"})``; commas inside brackets or
    quotes do not split."""
    parts, depth, quote, current = [], 0, "", ""
    for ch in inner:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        current += ch
    if current.strip() or parts:
        parts.append(current.strip())
    if depth != 0 or quote or any(not p for p in parts):
        raise ConfigError(f"{name}={text!r}: malformed arguments (unbalanced brackets, quotes or commas)")
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for p in parts:
        m = re.fullmatch(r"([A-Za-z_]\w*)\s*=\s*(.+)", p, re.S)
        if m:
            kwargs[m.group(1)] = m.group(2)
        elif kwargs:
            raise ConfigError(f"{name}={text!r}: a positional value after a keyword one")
        else:
            args.append(_unquote(p))
    return args, kwargs


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return str(parse_yaml(text))
    return text


# -- one trial's run -------------------------------------------------------------------------------------
def trial_config(base: Mapping[str, Any], values: Mapping[str, Any], out_dir: Path | str) -> dict[str, Any]:
    """The run config of a trial: ``base`` with each searched ``section.field`` set to its value and
    ``train.out_dir`` set to the trial's folder."""
    data: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in base.items()}
    for name, value in values.items():
        section, dot, key = name.partition(".")
        if not dot:
            data[section] = value
            continue
        data[section] = {**(data.get(section) or {}), key: value}
    data["train"] = {**(data.get("train") or {}), "out_dir": str(out_dir)}
    return data


def build_run(verb: Verb, data: Mapping[str, Any]) -> Any:
    """The run config (``RunConfig`` or ``FinetuneRun``) from a mapping, with all its validation."""
    data = {k: v for k, v in data.items() if v is not None or k == "init"}
    if verb == "pretrain":
        from lamina.train.pretrain import RunConfig

        return RunConfig.from_dict(data)
    from lamina.train.finetune import FinetuneRun

    return FinetuneRun.from_dict(data)


def _run(verb: Verb, run: Any) -> Any:
    if verb == "pretrain":
        from lamina.train.pretrain import pretrain

        return pretrain(run)[2]
    from lamina.train.finetune import finetune

    return finetune(run)[2]


def default_direction(objective: str) -> Literal["minimize", "maximize"]:
    """minimize for losses, perplexities and errors (``val_loss``, ``val_ppl``, ``mse``), else maximize."""
    return "minimize" if any(w in objective.lower() for w in LOWER_IS_BETTER) else "maximize"


@dataclass
class _Plan:
    """What every worker process needs (picklable)."""

    cfg: TuneConfig
    params: list[Param]
    base: dict[str, Any]
    verb: Verb
    storage: str
    study: str
    direction: Literal["minimize", "maximize"]
    n_trials: int
    threads: int


def _objective(plan: _Plan, trial: optuna.Trial) -> float:
    import optuna

    from lamina.train.trainer import TrainingError, evaluation_hook

    out = Path(plan.cfg.out) / "trials" / f"{trial.number:04d}"
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    values = {p.name: p.suggest(trial) for p in plan.params}
    data = trial_config(plan.base, values, out)
    if "threads" not in (plan.base.get("train") or {}) and "train.threads" not in values:
        data["train"]["threads"] = plan.threads
    reported: list[tuple[int, float]] = []
    objective = plan.cfg.objective
    attrs: dict[str, Any] = {"out_dir": str(out), "reason": ""}  # stored when the trial ends

    def report(step: int, metrics: dict[str, float]) -> None:
        if objective not in metrics:
            raise ConfigError(
                f"objective {objective!r} is not a metric of this run; its evaluations give "
                f"{', '.join(metrics)}{did_you_mean(objective, metrics)}"
            )
        value = float(metrics[objective])
        reported.append((step, value))
        attrs["steps"] = step
        trial.report(value, step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}: {objective} {value:.6g}")

    started = time.perf_counter()
    try:
        run = build_run(plan.verb, data)
        with evaluation_hook(report):
            attrs["steps"] = _run(plan.verb, run).steps
    except optuna.TrialPruned as e:
        attrs["reason"] = str(e)
        raise
    except KeyboardInterrupt:
        attrs["reason"] = "interrupted"
        raise
    except Exception as e:
        attrs["reason"] = str(e) if isinstance(e, LaminaError) else f"{type(e).__name__}: {e}"
        raise
    finally:
        attrs["seconds"] = time.perf_counter() - started
        if (out / "run.yaml").is_file():  # the run's exact config (the model as built)
            attrs["config"] = (out / "run.yaml").read_text()
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
    if not reported:
        raise TrainingError(
            "the run made no evaluation: it needs validation data and train.eval_every <= its steps"
        )
    return reported[-1][1]


def _counted(trials: Sequence[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The trials that count towards ``trials``: all but those failed and retried as another trial."""
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return [t for t in trials if t.number not in retried]


def _storage(plan: _Plan) -> optuna.storages.RDBStorage:
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    kwargs: dict[str, Any] = {}
    sqlite = plan.storage.startswith("sqlite")
    if sqlite:  # several processes write one file: wait for its lock
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    for attempt in range(3):  # processes starting together race to create the tables: try again
        try:
            storage = optuna.storages.RDBStorage(
                plan.storage, heartbeat_interval=plan.cfg.heartbeat, grace_period=2 * plan.cfg.heartbeat,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1), **kwargs,
            )  # fmt: skip
            break
        except Exception as e:  # sqlalchemy's errors, or a server that is not there
            if attempt == 2:
                raise ConfigError(f"cannot open the study storage {_redact(plan.storage)}: "
                                  f"{str(e).splitlines()[0]}; check the URL and that its server runs") from None  # fmt: skip
            time.sleep(1.0 + attempt)
    if sqlite:  # write-ahead log: a commit is an append, not a sync of the whole file (one machine only)
        import sqlalchemy

        storage.engine.dispose()
        sqlalchemy.event.listen(storage.engine, "connect", _sqlite_wal)
    return storage


def _sqlite_wal(connection: Any, record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_sampler(
    cfg: TuneConfig, params: Sequence[Param], seed: int | None = None
) -> optuna.samplers.BaseSampler:
    """The Optuna sampler ``cfg.sampler`` names: ``TPESampler(n_startup_trials=cfg.n_startup_trials)``,
    ``RandomSampler`` or ``GridSampler`` over every discrete value of ``params``."""
    import optuna

    if cfg.sampler == "tpe":
        return optuna.samplers.TPESampler(n_startup_trials=cfg.n_startup_trials, seed=seed)
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.GridSampler({p.name: p.grid() for p in params}, seed=seed)


def make_pruner(cfg: TuneConfig) -> optuna.pruners.BasePruner:
    """The Optuna pruner ``cfg.pruner`` names (``MedianPruner``, ``HyperbandPruner`` or ``NopPruner``)."""
    import optuna

    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=cfg.pruner_startup_trials, n_warmup_steps=cfg.pruner_warmup_steps
        )
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def open_study(plan: _Plan, worker: int = 0) -> optuna.Study:
    """The plan's study (created if new), with this worker's sampler and the plan's pruner."""
    import optuna

    _quiet()
    seed = None if plan.cfg.seed is None else plan.cfg.seed + worker
    study = optuna.create_study(
        storage=_storage(plan), study_name=plan.study, sampler=make_sampler(plan.cfg, plan.params, seed),
        pruner=make_pruner(plan.cfg), direction=plan.direction, load_if_exists=True,
    )  # fmt: skip
    if study.direction.name.lower() != plan.direction:
        raise ConfigError(
            f"study {plan.study!r} in {plan.storage} already runs with direction {study.direction.name.lower()}; "
            f"use the same direction or another --study"
        )
    return study


def _quiet() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # lamina prints each trial's end itself
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*heartbeat.*", category=FutureWarning)


def _work(plan: _Plan, worker: int = 0) -> None:
    """One trial process: run trials until the study holds ``n_trials`` finished ones."""
    import optuna
    import torch
    from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials

    torch.set_num_threads(plan.threads)
    study = open_study(plan, worker)
    waiting = optuna.trial.TrialState.WAITING
    while True:
        fail_stale_trials(study)
        counted = _counted(study.get_trials(deepcopy=False))
        if sum(t.state.is_finished() for t in counted) >= plan.n_trials:
            return
        if len(counted) >= plan.n_trials and not any(t.state == waiting for t in counted):
            time.sleep(min(plan.cfg.heartbeat, 2))  # the last trials run elsewhere (or await their heartbeat)
            continue
        try:
            study.optimize(lambda t: _objective(plan, t), n_trials=1, catch=(Exception,),
                           callbacks=[_print_trial])  # fmt: skip
        except KeyboardInterrupt:  # a trial stopped by Ctrl-C or SIGTERM: failed, retried once next time
            me = f"{socket.gethostname()}:{os.getpid()}"
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
                mine = t.user_attrs.get("worker") == me and t.user_attrs.get("reason") == "interrupted"
                if mine and not any(
                    t.number in u.system_attrs.get("retry_history", []) for u in study.trials
                ):
                    RetryHeartbeatStaleTrialCallback(max_retry=1)(study, t)
            raise


def _print_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    params = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
    state = trial.state.name.lower()
    value = f" {_short(trial.value)}" if trial.value is not None else ""
    reason = trial.user_attrs.get("reason") or trial.system_attrs.get("fail_reason", "")
    tail = f" ({reason})" if reason and trial.state.name != "COMPLETE" else ""
    print(f"trial {trial.number}: {state}{value} | {params}{tail}", flush=True)


def _short(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


# -- the whole search ------------------------------------------------------------------------------------
@dataclass
class TuneResult:
    """What a search found: counts, the best trial, the table, the files written."""

    study: str
    storage: str
    objective: str
    direction: str
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    best_trial: int | None = None
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    table: str = ""
    best_yaml: Path | None = None
    plots: list[Path] = field(default_factory=list)
    time_saved: float = 0.0  # estimated seconds of training the pruner saved
    steps_saved: int = 0  # estimated training steps the pruner saved
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """The search in a few lines, as ``lamina tune`` prints it after the table."""
        lines = [f"study {self.study!r} ({self.storage}): {self.complete} complete, {self.pruned} pruned, "
                 f"{self.failed} failed"]  # fmt: skip
        if self.pruned:
            lines.append(
                f"pruning saved about {self.time_saved:.1f} s of training ({self.steps_saved} steps)"
            )
        if self.best_trial is not None:
            params = ", ".join(f"{k}={_short(v)}" for k, v in self.best_params.items())
            lines.append(f"best trial {self.best_trial}: {self.objective} {self.best_value:.6g} | {params}")
        if self.best_yaml is not None:
            lines.append(f"best config: {self.best_yaml}")
        if self.plots:
            lines.append(f"plots: {', '.join(str(p) for p in self.plots)}")
        return "\n".join([*lines, *self.notes])


def tune(cfg: TuneConfig, run: Mapping[str, Any]) -> TuneResult:
    """Search ``cfg.search`` over the run config ``run`` (the sections of a pretrain or finetune run,
    as a mapping of text or typed values) with Optuna; write the results under ``cfg.out``.

    Raises ``ConfigError`` for a bad search space (see ``parse_search``), a base run config that does
    not validate, or a study that exists with another direction. Trials that fail are recorded, not raised.
    """
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError("lamina tune needs Optuna: pip install 'lamina[tune]'") from None
    verb = resolve_verb(cfg.verb, run)
    params = parse_search(cfg.search, verb)
    out = Path(cfg.out)
    base = {k: v for k, v in run.items() if k in run_sections(verb)}
    unknown = set(run) - set(base)
    if unknown:
        raise ConfigError(f"unknown {verb} run config section(s) {sorted(unknown)}; sections: "
                          f"{', '.join(run_sections(verb))}, plus search and tune")  # fmt: skip
    check = build_run(verb, trial_config(base, {}, out / "trials" / "check"))  # the base must validate
    n_trials = cfg.trials
    if cfg.sampler == "grid":
        n_trials = min(n_trials, math.prod(len(p.grid()) for p in params))
    out.mkdir(parents=True, exist_ok=True)
    storage = cfg.storage or f"sqlite:///{out.resolve() / 'study.db'}"
    threads = max(1, (cfg.threads or _cores()) // cfg.jobs)
    direction = default_direction(cfg.objective) if cfg.direction == "auto" else cfg.direction
    plan = _Plan(cfg, params, base, verb, storage, cfg.study or out.resolve().name, direction,
                 n_trials, threads)  # fmt: skip
    open_study(plan)  # created here, before workers race to create it (and a bad URL fails early)
    if verb == "pretrain" and not any(p.section == "data" for p in params):
        from lamina.train.pretrain import prepare_data

        prepare_data(check, progress=False)  # once, before trials share it
    if cfg.jobs == 1:
        _work(plan)
    else:
        _work_in_processes(plan)
    return report(plan)


def _cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _work_in_processes(plan: _Plan) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_work, args=(plan, i), daemon=False) for i in range(plan.cfg.jobs)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()  # SIGTERM: each trial saves, is marked failed and is retried by the next run
        for p in procs:
            p.join()
        raise
    bad = [p.exitcode for p in procs if p.exitcode]
    if bad:
        raise LaminaError(f"{len(bad)} of {len(procs)} trial processes failed (exit codes {bad}); see above")


def report(plan: _Plan) -> TuneResult:
    """The results of the plan's study: table (printed by the CLI, ``trials.csv``), best.yaml, plots."""
    import optuna

    _quiet()
    study = optuna.load_study(study_name=plan.study, storage=_storage(plan))
    trials = study.get_trials(deepcopy=False)
    S = optuna.trial.TrialState
    result = TuneResult(plan.study, _redact(plan.storage), plan.cfg.objective, plan.direction)
    counted = _counted(trials)
    result.complete = sum(t.state == S.COMPLETE for t in counted)
    result.pruned = sum(t.state == S.PRUNED for t in counted)
    result.failed = sum(t.state == S.FAIL for t in counted)
    out = Path(plan.cfg.out)
    rows = _table_rows(trials, plan)
    result.table = _format_table(rows)
    with open(out / "trials.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerows(rows)
    result.time_saved, result.steps_saved = _saved(trials)
    complete = [t for t in trials if t.state == S.COMPLETE]
    if complete:
        best = study.best_trial
        result.best_trial, result.best_value, result.best_params = best.number, best.value, dict(best.params)
        text = best.user_attrs.get("config")
        if text:
            config = yaml.safe_load(text)
            config.setdefault("train", {})["out_dir"] = str(out / "best")
            head = (f"# best trial {best.number} of study {plan.study!r}: {plan.cfg.objective} = {best.value!r}\n"
                    f"# re-run: lamina {plan.verb} --config {out / 'best.yaml'}\n")  # fmt: skip
            (out / "best.yaml").write_text(head + yaml.safe_dump(config, sort_keys=False))
            result.best_yaml = out / "best.yaml"
    if plan.cfg.plots and complete:
        result.plots, skipped = write_plots(study, plan.params, out / "plots")
        result.notes += skipped
    from lamina.analysis.report import write_report

    write_report(out, title=f"study {plan.study}")
    return result


def _table_rows(trials: Sequence[optuna.trial.FrozenTrial], plan: _Plan) -> list[list[str]]:
    """Header and one row per trial: complete ones by the objective, then pruned, then failed."""
    sign = 1.0 if plan.direction == "minimize" else -1.0
    retried = {n: t.number for t in trials for n in t.system_attrs.get("retry_history", [])[:1]}
    order = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "WAITING": 2, "FAIL": 3}

    def key(t: optuna.trial.FrozenTrial) -> tuple[int, float, int]:
        value = t.value if t.value is not None else _last(t)
        return (order.get(t.state.name, 4), sign * value if value is not None else math.inf, t.number)

    header = [
        "trial",
        "state",
        plan.cfg.objective,
        *(p.name for p in plan.params),
        "steps",
        "seconds",
        "reason",
    ]
    rows = [header]
    for t in sorted(trials, key=key):
        value = t.value if t.value is not None else _last(t)
        reason = t.user_attrs.get("reason") or t.system_attrs.get("fail_reason", "")
        if t.state.name == "FAIL" and not reason:
            reason = "its process stopped (no heartbeat)"
        if t.number in retried:
            reason += f"; retried as trial {retried[t.number]}"
        seconds = t.user_attrs.get("seconds")
        rows.append([
            str(t.number), t.state.name.lower(), _short(value) if value is not None else "",
            *(_short(t.params[p.name]) if p.name in t.params else "" for p in plan.params),
            str(t.user_attrs.get("steps", "")), f"{seconds:.1f}" if seconds is not None else "", reason.strip("; "),
        ])  # fmt: skip
    return rows


def _last(t: optuna.trial.FrozenTrial) -> float | None:
    return t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None


def _format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    buf = io.StringIO()
    for r in rows:
        buf.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] + "\n")
    return buf.getvalue().rstrip()


def _saved(trials: Sequence[optuna.trial.FrozenTrial]) -> tuple[float, int]:
    """(seconds, steps) of training the pruner saved: each pruned trial against the typical complete one
    (median steps and seconds per step of the complete trials)."""
    complete = [t for t in trials if t.state.name == "COMPLETE" and t.user_attrs.get("steps")]
    pruned = [t for t in trials if t.state.name == "PRUNED" and t.user_attrs.get("steps")]
    if not complete or not pruned:
        return 0.0, 0
    full = statistics.median(t.user_attrs["steps"] for t in complete)
    per_step = statistics.median(t.user_attrs.get("seconds", 0.0) / t.user_attrs["steps"] for t in complete)
    steps = sum(max(0, full - t.user_attrs["steps"]) for t in pruned)
    return steps * per_step, int(steps)


def write_plots(study: optuna.Study, params: Sequence[Param], folder: Path) -> tuple[list[Path], list[str]]:
    """PNGs of the study (optuna.visualization.matplotlib): history, importances, slice, contour (two or
    more parameters). Returns the files written and a note for each plot that could not be drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as vis
    except ImportError:
        return [], ["no plots: matplotlib is not installed (pip install 'lamina[tune]')"]
    folder.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Any] = {
        "history": vis.plot_optimization_history,
        "importances": vis.plot_param_importances,
        "slice": vis.plot_slice,
    }
    if len(params) >= 2:
        plots["contour"] = vis.plot_contour
    written, notes = [], []
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = plot(study)
            first = axes.flat[0] if hasattr(axes, "flat") else axes
            fig = first.get_figure()
            fig.savefig(folder / f"{name}.png", dpi=100, bbox_inches="tight")
            plt.close(fig)
            written.append(folder / f"{name}.png")
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            notes.append(f"no {name} plot: {e}".splitlines()[0])
            plt.close("all")
    return written, notes


def _redact(url: str) -> str:
    """A storage URL without its password."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def print_results(result: TuneResult, file: Any = None) -> None:
    """The table and summary, as ``lamina tune`` prints them."""
    file = file or sys.stdout
    print(result.table, file=file)
    print(result.summary(), file=file)
