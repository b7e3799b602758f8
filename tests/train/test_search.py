"""lamina.train.search: the search space, Optuna's samplers and pruners as asked, the trial loop (grid
once per point, failed configs recorded), and on a tiny model with the built-in corpus: the median pruner
stopping the bad half of a learning-rate range, and best.yaml re-running to the best trial's metric."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from lamina.errors import ConfigError
from lamina.train import search
from lamina.train.search import Param, TuneConfig, make_pruner, make_sampler, parse_search, search_specs, tune
from lamina.train.trainer import _EVALUATION_HOOK, TrainResult

optuna.logging.set_verbosity(optuna.logging.WARNING)


def base_run(data: Path, **train: Any) -> dict[str, Any]:
    """A tiny pretraining run on the built-in corpus: 1 layer, 32 wide, 6 steps, an evaluation every 2."""
    return {
        "data": {"out": str(data), "builtin": "stdlib", "max_bytes": "100K", "train_tokenizer": "300",
                 "val_fraction": "0.1", "num_workers": "0"},
        "model": {"preset": "tiny", "n_layers": 1, "d_model": 32, "n_heads": 2, "max_seq_len": 32},
        "train": {"batch_size": 4, "seq_len": 32, "max_steps": 6, "eval_every": 2, "eval_batches": 2,
                  "save_every": 100, "log_every": 2, "warmup_steps": 0, "progress": False, "seed": 0, **train},
    }  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lamina.train.pretrain import RunConfig, prepare_data

    out = tmp_path_factory.mktemp("tune") / "data"
    prepare_data(RunConfig.from_dict(base_run(out)), progress=False)
    return out


# -- the search space -----------------------------------------------------------------------------------
def test_distributions_are_read_by_the_fields_types() -> None:
    params = parse_search(
        ["train.lr=loguniform(1e-4,3e-2)", "model.n_layers=choice(2, 4, 6)",
         "train.warmup_steps=int(0,200,step=50)", "train.dropout=uniform(0, 0.3, step=0.1)",
         "model.activation=choice(gelu, swiglu)", "train.freeze=choice([0], [0-1], [])"],
        "pretrain",
    )  # fmt: skip
    lr, layers, warmup, dropout, act, freeze = params
    assert (lr.kind, lr.low, lr.high) == ("loguniform", 1e-4, 3e-2)
    assert lr.distribution() == optuna.distributions.FloatDistribution(1e-4, 3e-2, log=True)
    assert layers.choices == (2, 4, 6) and all(type(c) is int for c in layers.choices)
    assert warmup.grid() == [0, 50, 100, 150, 200]
    assert dropout.grid() == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert act.choices == ("gelu", "swiglu")
    assert freeze.choices == ("[0]", "[0-1]", "[]")  # a list stays text; the trial's build reads it
    with pytest.raises(ConfigError, match="grid search needs discrete values"):
        lr.grid()
    # the YAML search: section, flat or nested, a list being a choice; a later entry wins
    specs = search_specs({"train": {"lr": "uniform(0.1, 0.2)"}, "model.n_layers": ["2", "3"]})
    assert specs == ["train.lr=uniform(0.1, 0.2)", "model.n_layers=choice(2, 3)"]
    (p,) = parse_search([*specs[:1], "train.lr=choice(0.5, 0.6)"], "pretrain")
    assert p.choices == (0.5, 0.6)
    (task,) = parse_search(["task.max_seq_len=int(16, 64)"], "finetune")  # finetune's sections
    assert task.kind == "int"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("train.lrr=loguniform(1e-4,3e-2)", "unknown search field 'train.lrr' (did you mean 'train.lr'"),
        ("trian.lr=uniform(0,1)", "no section 'trian' (did you mean 'train'"),
        ("train.lr=loguniform(1e-4)", "loguniform takes (low, high)"),
        ("train.lr=logunifrom(1e-4, 1)", "unknown distribution 'logunifrom' (did you mean 'loguniform'"),
        ("train.lr=1e-4", "is not a distribution"),
        ("train.lr=uniform(0, (1)", "malformed arguments"),
        ("train.lr=loguniform(3e-2, 1e-4)", "wrong way round (low 3e-2 > high 1e-4); write loguniform(1e-4, 3e-2)"),
        ("train.warmup_steps=int(10, 0, step=5)", "write int(0, 10, step=5)"),
        ("train.lr=loguniform(0, 1)", "a log scale needs low > 0"),
        ("train.warmup_steps=uniform(0, 10)", "integer field; use int(low, high)"),
        ("model.n_layers=choice(2, four)", "model.n_layers='four' must be an integer"),
        ("model.activation=uniform(0, 1)", "not a number; use choice"),
        ("train.lr", "must be SECTION.FIELD=DISTRIBUTION"),
    ],
)  # fmt: skip
def test_bad_search_input_is_one_clear_error(spec: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_search([spec], "pretrain")
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


# -- samplers and pruners --------------------------------------------------------------------------------
def test_each_sampler_and_pruner_is_the_one_asked_for() -> None:
    params = [Param("train.lr", "choice", choices=(0.1, 0.2)), Param("model.n_layers", "int", 1, 3)]
    tpe = make_sampler(TuneConfig(sampler="tpe", n_startup_trials=7), params, seed=1)
    assert type(tpe) is optuna.samplers.TPESampler and tpe._n_startup_trials == 7
    assert type(make_sampler(TuneConfig(sampler="random"), params)) is optuna.samplers.RandomSampler
    grid = make_sampler(TuneConfig(sampler="grid"), params)
    assert type(grid) is optuna.samplers.GridSampler and len(grid._all_grids) == 6
    median = make_pruner(TuneConfig(pruner="median", pruner_startup_trials=3, pruner_warmup_steps=4))
    assert type(median) is optuna.pruners.MedianPruner
    assert (median._n_startup_trials, median._n_warmup_steps) == (3, 4)
    assert type(make_pruner(TuneConfig(pruner="hyperband"))) is optuna.pruners.HyperbandPruner
    assert type(make_pruner(TuneConfig(pruner="none"))) is optuna.pruners.NopPruner


def test_random_search_with_a_seed_repeats() -> None:
    params = parse_search(["train.lr=loguniform(1e-4, 1)", "model.n_layers=choice(1, 2, 3)"], "pretrain")

    def draws(seed: int) -> list[dict[str, Any]]:
        study = optuna.create_study(sampler=make_sampler(TuneConfig(sampler="random"), params, seed))
        return [study.ask({p.name: p.distribution() for p in params}).params for _ in range(6)]

    assert draws(3) == draws(3) != draws(4)


# -- the trial loop, with a stand-in for training ---------------------------------------------------------
def _fake_training(metric: Any) -> Any:
    """A stand-in for pretrain: reports metric(run) at steps 2, 4, 6 through the trainer's hook."""

    def run(verb: str, cfg: Any) -> TrainResult:
        hook = _EVALUATION_HOOK.get()
        assert hook is not None
        for step in (2, 4, 6):
            hook(step, {"val_loss": metric(cfg) + 1.0 / step, "val_ppl": 1.0})
        return TrainResult(steps=6, final_loss=0.0, best_val_loss=None)

    return run


@pytest.mark.slow
def test_grid_visits_every_point_once_and_a_failing_config_fails_only_its_trial(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(search, "_run", _fake_training(lambda r: r.train.lr + r.train.warmup_steps))
    cfg = TuneConfig(
        search=["train.lr=choice(0.1, 0.2, 0.3)", "train.warmup_steps=int(0, 2)", "model.n_heads=choice(2, 3)"],
        sampler="grid", trials=100, pruner="none", out=str(tmp_path / "grid"), seed=0, plots=False,
    )  # fmt: skip
    result = tune(cfg, base_run(data))
    trials = optuna.load_study(
        study_name="grid", storage=f"sqlite:///{tmp_path / 'grid' / 'study.db'}"
    ).trials
    points = [tuple(sorted(t.params.items())) for t in trials]
    assert len(points) == len(set(points)) == 18  # 3 x 3 x 2, each once, though 100 trials were allowed
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert {t.params["model.n_heads"] for t in failed} == {3} and len(failed) == 9  # d_model 32 / 3 heads
    assert all("n_heads" in t.user_attrs["reason"] for t in failed), failed[0].user_attrs
    assert (result.complete, result.failed, result.best_trial is not None) == (9, 9, True)
    assert result.best_params == {"train.lr": 0.1, "train.warmup_steps": 0, "model.n_heads": 2}
    table = result.table.splitlines()
    assert table[0].split()[:6] == [
        "trial",
        "state",
        "val_loss",
        "train.lr",
        "train.warmup_steps",
        "model.n_heads",
    ]
    values = [float(r.split()[2]) for r in table[1:] if r.split()[1] == "complete"]
    assert values == sorted(values) and "n_heads" in table[-1]  # complete by objective first, failed last
    assert (tmp_path / "grid" / "trials.csv").read_text().count("\n") == 19
    again = tune(cfg, base_run(data))  # the same command again: the study is done, nothing more runs
    assert again.complete + again.failed == 18


def test_the_objective_must_be_a_metric_of_the_run(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(search, "_run", _fake_training(lambda r: r.train.lr))
    cfg = TuneConfig(
        search=["train.lr=choice(0.1)"], sampler="grid", objective="val_los", out=str(tmp_path / "o")
    )
    result = tune(cfg, base_run(data))
    assert result.failed == 1 and "did you mean 'val_loss'" in result.table


# -- real trials on the built-in corpus ------------------------------------------------------------------
@pytest.fixture(scope="module")
def lr_study(data: Path, tmp_path_factory: pytest.TempPathFactory) -> search.TuneResult:
    """Six trials over lr in [1e-3, 1e3] (half of it over 1.0, where training diverges), median pruning."""
    out = tmp_path_factory.mktemp("lr") / "study"
    cfg = TuneConfig(
        search=["train.lr=loguniform(1e-3, 1e3)"], sampler="random", seed=5, trials=6, pruner="median",
        pruner_startup_trials=1, out=str(out), threads=1,
    )  # fmt: skip
    return tune(cfg, base_run(data))


@pytest.mark.slow
def test_the_median_pruner_stops_the_bad_half_early(lr_study: search.TuneResult) -> None:
    study = optuna.load_study(study_name="study", storage=lr_study.storage)
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert len(pruned) >= len(study.trials) / 3, lr_study.table
    assert all(max(t.intermediate_values) < 6 for t in pruned)  # before their last evaluation (step 6)
    assert all(t.user_attrs["reason"].startswith("pruned at step ") for t in pruned)
    assert all(t.params["train.lr"] < 1.0 for t in study.trials if t.state.name == "COMPLETE")
    assert lr_study.steps_saved > 0 and lr_study.time_saved > 0
    assert "pruning saved about" in lr_study.summary()
    assert {p.name for p in lr_study.plots} >= {"history.png", "slice.png"}
    assert all(p.stat().st_size > 1000 for p in lr_study.plots)


@pytest.mark.slow
def test_best_yaml_reruns_to_the_best_trials_metric(lr_study: search.TuneResult) -> None:
    from lamina.train.pretrain import RunConfig, pretrain

    assert lr_study.best_yaml is not None and lr_study.best_value is not None
    config = yaml.safe_load(lr_study.best_yaml.read_text())
    assert config["train"]["threads"] == 1 and config["train"]["lr"] == lr_study.best_params["train.lr"]
    _, _, result = pretrain(RunConfig.from_yaml(lr_study.best_yaml))
    rows = [json.loads(line) for line in (Path(config["train"]["out_dir"]) / "metrics.jsonl").open()]
    value = [r["val_loss"] for r in rows if "val_loss" in r][-1]
    assert math.isclose(value, lr_study.best_value, rel_tol=1e-6), (value, lr_study.best_value)
    assert result.val_losses[-1][1] == value
