"""``lamina scaling sweep``: the grid's runs (shape, steps from tokens), each a real pretraining run;
running it again skips finished runs; the fit reads them."""

from __future__ import annotations

from pathlib import Path

import pytest

from lamina.analysis.sweep import DONE, SweepConfig, plan_runs, sweep
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


@pytest.mark.slow
def test_sweep_trains_and_resumes(tmp_path: Path) -> None:
    run = _base(tmp_path)
    cfg = SweepConfig(shapes=["1x32"], tokens=[128, 256], head_dim=16, out=str(tmp_path / "s"))
    folders = sweep(run, cfg)
    assert all(
        (f / DONE).is_file() and (f / "last").is_dir() and (f / "report.html").is_file() for f in folders
    )
    from lamina.analysis.fit import read_run

    assert [read_run(f).tokens for f in folders] == [128, 256]
    said: list[str] = []
    sweep(run, cfg, progress=said.append)
    assert said == ["2 runs, 2 already finished"]
