"""``lamina scaling sweep``: the grid's runs (shape, steps from tokens), each a real pretraining run;
running it again skips finished runs; the fit reads them."""

from __future__ import annotations

import glob
import re
import shlex
from pathlib import Path

import pytest

from lamina.analysis.sweep import DONE, SweepConfig, plan_runs
from lamina.errors import ConfigError


def _base(tmp_path: Path):  # type: ignore[no-untyped-def]
    from lamina.config import ModelConfig
    from lamina.data.corpus import DataConfig
    from lamina.train.pretrain import RunConfig

    run = RunConfig(
        model=ModelConfig.preset("tiny", max_seq_len=32),
        data=DataConfig(
            builtin="stdlib",
            max_bytes=30_000,
            train_tokenizer=300,
            out=str(tmp_path / "data"),
            num_workers=0,
            val_fraction=0.1,
        ),
    )
    run.train.seq_len, run.train.batch_size, run.train.progress = 32, 4, False
    return run


def test_grid(tmp_path: Path) -> None:
    cfg = SweepConfig(shapes=["2x64,1x32"], tokens=[1000, 256], head_dim=16, out=str(tmp_path / "s"))
    runs = plan_runs(_base(tmp_path), cfg)
    assert [f.name for f, _ in runs] == ["L2-d64-t256", "L2-d64-t1000", "L1-d32-t256", "L1-d32-t1000"]
    _, r = runs[1]
    assert (r.model.n_layers, r.model.d_model, r.model.n_heads, r.train.max_steps) == (2, 64, 4, 8)
    with pytest.raises(ConfigError, match="N_LAYERSxD_MODEL"):
        SweepConfig(shapes=["2x60"], head_dim=16)


# the README's experiment in its short setting (documented under the commands): flags appended win
SHORT = {
    "sweep": ["--sweep.shapes", "1x32,2x64", "--sweep.tokens", "512,1024,1536", "--sweep.jobs", "1"],
    "pretrain": ["--train.max_steps", "1"],
    "fit": ["--starts", "1"],
}
SHORT_DATA = ["--data.max_bytes", "200K", "--train.batch_size", "4", "--train.eval_batches", "2"]


def _readme_commands() -> list[str]:
    """The ``lamina`` lines of the README's scaling experiment (its ```sh block)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"```sh\n(lamina scaling sweep .*?)```", readme, flags=re.S)
    assert block is not None, "the README's scaling experiment block is gone"
    return block.group(1).strip().splitlines()


@pytest.mark.slow
def test_readme_experiment_short_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's sweep, held-out run and fit, in their short setting: every run a finished run folder
    of its shape, the held-out run the 4x128 shape the sweep would build, a second sweep skips them all,
    and the fit predicts the held-out run."""
    from lamina.analysis.fit import read_run
    from lamina.cli.main import main
    from lamina.train.pretrain import RunConfig

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)  # examples/scaling.yaml
    # each run's figures (curves.png, report.html's plots: about 1 s a run) are tested in test_report.py
    monkeypatch.setattr("lamina.train.trainer.plot_curves", lambda *a: None)
    monkeypatch.setattr("lamina.analysis.report._figures", lambda *a: [])
    sweep_cmd, pretrain_cmd, fit_cmd = _readme_commands()
    data = ["--data.out", f"{tmp_path}/runs/scaling-data", *SHORT_DATA]

    def run(command: str, extra: list[str]) -> str:
        argv = shlex.split(command.replace("runs/", f"{tmp_path}/runs/"))[1:]
        if argv[0] == "scaling" and argv[1] == "fit":
            argv = [a for arg in argv for a in (sorted(glob.glob(arg)) if "*" in arg else [arg])]
        assert main(argv + extra) == 0, capsys.readouterr().err
        return capsys.readouterr().out

    run(sweep_cmd, data + SHORT["sweep"])
    folders = sorted((tmp_path / "runs" / "sweep").iterdir())
    assert [f.name for f in folders] == sorted(
        f"L{s}-t{t}" for s in ("1-d32", "2-d64") for t in (512, 1024, 1536)
    )
    assert all((f / DONE).is_file() and (f / "report.html").is_file() for f in folders)
    assert sorted(read_run(f).tokens for f in folders[:3]) == [512, 1024, 1536]  # 1, 2, 3 steps of 4 x 128
    assert run(sweep_cmd, data + SHORT["sweep"]).startswith("6 runs, 6 already finished")
    run(pretrain_cmd, data + SHORT["pretrain"])
    held = RunConfig.from_yaml(tmp_path / "runs" / "heldout" / "run.yaml")
    base = RunConfig.from_yaml(folders[0] / "run.yaml")
    (_, shape), *_ = plan_runs(base, SweepConfig(shapes=["4x128"], tokens=[1]))
    assert held.model == shape.model  # the held-out run is the sweep's 4x128 shape
    out = run(fit_cmd, SHORT["fit"])
    assert "held-out run heldout (" in out and (tmp_path / "runs" / "fit" / "scaling_fit.png").is_file()
