"""The training loop: it learns, resumes exactly, stops early, refuses NaN, and every knob does its job."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from lamina.cli.main import main
from lamina.config import GenerationConfig, ModelConfig, TrainConfig, load_yaml
from lamina.errors import ConfigError
from lamina.model.transformer import Transformer
from lamina.train.objectives import causal_lm
from lamina.train.optim import lr_lambda, make_optimizer, param_groups
from lamina.train.trainer import (
    StoppedBySignal,
    TrainingError,
    TrainingInterrupted,
    TrainResult,
    format_duration,
    latest_checkpoint,
    train,
)

DATA = torch.arange(30_000) % 37  # a pattern a tiny model learns in a few dozen steps


class Windows:
    """Batch i: B random windows of DATA, seeded by i (what the trainer's BatchSource promises)."""

    def __init__(self, batch_size: int = 8, seq_len: int = 32, offset: int = 0) -> None:
        self.B, self.T, self.offset = batch_size, seq_len, offset

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(index + self.offset)
        starts = torch.randint(0, len(DATA) - self.T - 1, (self.B,), generator=g)
        x = torch.stack([DATA[s : s + self.T + 1] for s in starts])
        return {"input_ids": x[:, :-1], "targets": x[:, 1:]}


def _model(**kw: Any) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("tiny", vocab_size=64, max_seq_len=32, **kw))


def _cfg(out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        out_dir=str(out), max_steps=30, lr=3e-3, warmup_steps=3, eval_every=10, save_every=10, log_every=5,
        progress=False, keep_last=10,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _val() -> list[dict[str, torch.Tensor]]:
    return [Windows(offset=10**6).batch(i) for i in range(3)]


def _losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_learns_and_writes_everything(tmp_path: Path) -> None:
    res = train(_model(), _cfg(tmp_path), Windows(), causal_lm(), _val, tokens_per_batch=256)
    assert res.steps == 30 and res.val_losses[0][1] > 2 * res.val_losses[-1][1]
    assert res.best_val_loss == min(v for _, v in res.val_losses)
    assert res.elapsed > 0 and res.summary().startswith("trained 30 steps in ")
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(
        {"tokens_per_s", "mfu", "lr"} <= r.keys() for r in logged if "loss" in r
    )  # reported, not judged
    assert all("val_ppl" in r for r in logged if "val_loss" in r)  # a language model reports perplexity
    for name in (
        "best/model.safetensors",
        "last/train_state/state.pt",
        "metrics.jsonl",
        "curves.png",
        "tensorboard",
    ):
        assert (tmp_path / name).exists(), name
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-00000030"


def test_resume_gives_exactly_the_uninterrupted_losses(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, dropout=0.1)  # with dropout, the RNG state must resume too
    train(_model(), cfg, Windows(), causal_lm(), _val, tokens_per_batch=256)
    full = _losses(tmp_path)
    for step in (30, 20):  # as if killed after step 10's checkpoint
        import shutil

        shutil.rmtree(tmp_path / "checkpoints" / f"step-{step:08d}")
    train(_model(), cfg, Windows(), causal_lm(), _val, tokens_per_batch=256, resume=True)
    assert _losses(tmp_path) == full


def test_grad_accumulation_equals_the_big_batch(tmp_path: Path) -> None:
    class Half(Windows):  # micro-batch 2i and 2i+1 are the two halves of big batch i
        def batch(self, index: int) -> dict[str, torch.Tensor]:
            big = Windows(batch_size=8).batch(index // 2)
            sl = slice(0, 4) if index % 2 == 0 else slice(4, 8)
            return {k: v[sl] for k, v in big.items()}

    a = train(
        _model(),
        _cfg(tmp_path / "a", max_steps=6, log_every=1),
        Windows(8),
        causal_lm(),
        tokens_per_batch=256,
    )
    b = train(
        _model(), _cfg(tmp_path / "b", max_steps=6, log_every=1, grad_accum_steps=2), Half(4), causal_lm(),
        tokens_per_batch=128,
    )  # fmt: skip
    for (_, x), (_, y) in zip(_losses(tmp_path / "a"), _losses(tmp_path / "b"), strict=True):
        assert abs(x - y) < 1e-5
    assert abs(a.final_loss - b.final_loss) < 1e-5


class Uneven:
    """Big batch i: two windows whose targets are scored at 2 and at 16 positions (the others -100); with
    ``split`` micro-batch 2i is the first window and 2i+1 the second."""

    def __init__(self, split: bool) -> None:
        self.split = split

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        big = Windows(batch_size=2).batch(index // 2 if self.split else index)
        keep = torch.zeros(2, 32, dtype=torch.bool)
        keep[0, 5:7], keep[1, 10:26] = True, True
        big["targets"] = big["targets"].masked_fill(~keep, -100)
        if not self.split:
            return big
        row = index % 2
        return {k: v[row : row + 1] for k, v in big.items()}


def _sgd(out: Path, **kw: Any) -> TrainConfig:
    """Plain SGD at lr 1, no clipping, decay or schedule: the update is exactly minus the gradient."""
    base: dict[str, Any] = dict(optimizer="sgd", momentum=0.0, lr=1.0, weight_decay=0.0, grad_clip=0.0,
                                schedule="constant", warmup_steps=0, log_every=1)  # fmt: skip
    return _cfg(out, **{**base, **kw})


@pytest.mark.parametrize("steps", [1, 3])
def test_accumulation_weights_every_scored_token_equally(steps: int, tmp_path: Path) -> None:
    """Micro-batches scoring 2 and 16 tokens give the update of one batch holding both (the plain mean
    of the two micro-batch means would weigh each of the 2 tokens 8x each of the 16)."""
    big, accum = _model(), _model()
    train(big, _sgd(tmp_path / "a", max_steps=steps), Uneven(False), causal_lm(), tokens_per_batch=64)
    train(accum, _sgd(tmp_path / "b", max_steps=steps, grad_accum_steps=2), Uneven(True), causal_lm(),
          tokens_per_batch=32)  # fmt: skip
    with torch.no_grad():
        moved = max(
            float((p - q).abs().max()) for p, q in zip(big.parameters(), _model().parameters(), strict=True)
        )
    assert moved > 0.1  # the update is large, so 1e-6 is a tight check
    for (name, p), q in zip(big.named_parameters(), accum.parameters(), strict=True):
        assert float((p - q).detach().abs().max()) < 1e-6, name
    for (_, x), (_, y) in zip(_losses(tmp_path / "a"), _losses(tmp_path / "b"), strict=True):
        assert abs(x - y) < 1e-6  # the logged loss is the token-weighted mean too


def test_a_step_that_scores_nothing_changes_nothing(tmp_path: Path) -> None:
    class Blank(Windows):
        def batch(self, index: int) -> dict[str, torch.Tensor]:
            b = super().batch(index)
            if index == 1:
                b["targets"] = torch.full_like(b["targets"], -100)
            return b

    model = _model()
    res = train(model, _sgd(tmp_path, max_steps=2, lr=0.1), Blank(), causal_lm(), tokens_per_batch=256)
    assert res.steps == 2 and math.isfinite(res.final_loss)
    assert [s for s, _ in _losses(tmp_path)] == [1]  # step 2 had nothing to score: no update, no loss
    ref = _model()
    train(ref, _sgd(tmp_path / "ref", max_steps=1, lr=0.1), Windows(), causal_lm(), tokens_per_batch=256)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)


def test_an_existing_run_is_refused_resumed_or_overwritten(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, max_steps=2, save_every=1, log_every=1)
    train(_model(), cfg, Windows(), causal_lm(), tokens_per_batch=256)
    with pytest.raises(
        ConfigError,
        match=rf"{tmp_path} already holds a run \(metrics.jsonl, checkpoints, .*--resume.*--overwrite",
    ):
        train(_model(), _cfg(tmp_path, max_steps=2), Windows(), causal_lm(), tokens_per_batch=256)
    assert [s for s, _ in _losses(tmp_path)] == [1, 2]
    train(_model(), _cfg(tmp_path, max_steps=1, log_every=1), Windows(), causal_lm(), tokens_per_batch=256,
          overwrite=True)  # fmt: skip
    assert [s for s, _ in _losses(tmp_path)] == [1]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-00000001"
    shutil.rmtree(tmp_path / "checkpoints")  # killed before its first checkpoint: --overwrite, not --resume
    with pytest.raises(ConfigError, match=r"no checkpoint to resume .*start it again with --overwrite"):
        train(_model(), _cfg(tmp_path), Windows(), causal_lm(), tokens_per_batch=256, resume=True)
    with pytest.raises(ConfigError, match=r"no checkpoint to resume .*start without --resume"):
        train(_model(), _cfg(tmp_path / "new"), Windows(), causal_lm(), tokens_per_batch=256, resume=True)


def test_a_model_converted_for_inference_trains_only_under_lora(tmp_path: Path) -> None:
    """weights= (convert_weights) leaves buffers, not parameters: refused up front; QLoRA (adapters over
    the int8 base) still trains and saves."""
    from lamina.model.lora import LoraConfig, apply_lora
    from lamina.model.quant import convert_weights

    converted = convert_weights(_model(), "int8", fuse=False)
    with pytest.raises(ConfigError, match=r"converted for inference \(weights='int8'\).*without weights="):
        train(converted, _cfg(tmp_path / "full"), Windows(), causal_lm(), tokens_per_batch=256)
    assert not (tmp_path / "full").exists()
    qlora = apply_lora(_model(), LoraConfig(base_weights="int8"))
    res = train(qlora, _cfg(tmp_path / "qlora", max_steps=1, save_every=1), Windows(), causal_lm(),
                tokens_per_batch=256)  # fmt: skip
    assert res.steps == 1 and latest_checkpoint(tmp_path / "qlora") is not None


def test_summary_and_durations() -> None:
    res = TrainResult(steps=12, final_loss=1.23456, best_val_loss=1.5, out_dir=Path("runs/x"), elapsed=75.4,
                      val_metrics=[(6, {"accuracy": 0.5}), (12, {"accuracy": 0.75})],
                      notes=["3 of 80 training texts truncated to 16 tokens"])  # fmt: skip
    assert res.summary() == (
        "trained 12 steps in 1 min 15 s, final loss 1.2346, best validation loss 1.5000; held-out accuracy "
        "0.7500; 3 of 80 training texts truncated to 16 tokens; checkpoints in runs/x"
    )
    # OUT/best chosen by another figure: the summary names it (it said "best validation loss 1.5000", the
    # figure of another checkpoint than OUT/best)
    res = TrainResult(
        steps=900, final_loss=1.2, best_val_loss=1.5, best_metric="val_rougeL", best=(800, 0.2035)
    )
    assert res.summary().startswith(
        "trained 900 steps in 0.0 s, final loss 1.2000, best val_rougeL 0.2035 (step 800);"
    )
    assert [format_duration(s) for s in (4.25, 59.96, 3600 + 7 * 60 + 20)] == [
        "4.2 s",
        "60.0 s",
        "1 h 07 min",
    ]


def test_best_metric_is_checked_at_once_and_a_resume_by_another_starts_afresh(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a figure no evaluation has is refused at the start (it was refused at the first evaluation, hours in)
    for metric, kw in (("val_rougeL", {}), ("val_ppl", {"perplexity": False})):
        with pytest.raises(ConfigError, match=rf"^best_metric='{metric}'"):
            train(_model(), _cfg(tmp_path / "x"), Windows(), causal_lm(), _val, tokens_per_batch=256,
                  best_metric=metric, **kw)  # fmt: skip
    assert not (tmp_path / "x").exists()
    scores = iter([5.0, 1.0])  # higher wins: step 2's evaluation is the best of the two

    def score(model: torch.nn.Module) -> dict[str, float]:
        return {"val_score": next(scores)}

    cfg = _cfg(tmp_path, max_steps=4, eval_every=2, save_every=2)
    res = train(_model(), cfg, Windows(), causal_lm(), _val, tokens_per_batch=256, eval_metrics=score,
                best_metric="val_score")  # fmt: skip
    assert res.best == (2, 5.0) and "best val_score 5.0000 (step 2)" in res.summary()
    # resumed choosing by the loss: the saved best (-5.0, a negated score) does not compare with a loss, so
    # step 6's evaluation replaces OUT/best (with the -5.0 kept, no loss ever beat it)
    cfg = _cfg(tmp_path, max_steps=6, eval_every=2, save_every=2)
    res = train(_model(), cfg, Windows(), causal_lm(), _val, tokens_per_batch=256, resume=True)
    assert (
        "best_metric is now val_loss (the run was saved choosing OUT/best by val_score)"
        in capsys.readouterr().err
    )
    weights = "model.safetensors"
    assert (tmp_path / "best" / weights).read_bytes() == (
        tmp_path / "checkpoints" / "step-00000006" / weights
    ).read_bytes()
    assert res.best is not None and res.best[0] == 6 and res.best[1] == res.val_losses[-1][1]


def test_early_stopping(tmp_path: Path) -> None:
    res = train(
        _model(), _cfg(tmp_path, max_steps=200, eval_every=2, early_stopping_patience=2, early_stopping_min_delta=10.0),
        Windows(), causal_lm(), _val, tokens_per_batch=256,
    )  # fmt: skip
    assert res.stopped_early and res.steps == 6  # first eval sets best; two more without a 10.0 gain stop it


def test_nan_loss_stops_with_a_clear_message(tmp_path: Path) -> None:
    calls = {"n": 0}

    def diverging(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        calls["n"] += 1
        loss, n = causal_lm()(model, batch)
        return (loss * math.nan if calls["n"] > 4 else loss), n

    with pytest.raises(TrainingError, match=r"loss became nan at step 5.*step-00000004.*Lower lr"):
        train(_model(), _cfg(tmp_path, save_every=2), Windows(), diverging, tokens_per_batch=256)
    assert (
        latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-00000004"
    )  # the last good one stays
    with pytest.raises(ConfigError, match="lr=nan"):
        TrainConfig(lr=math.nan)


@pytest.mark.parametrize("name", ["adamw", "sgd", "rmsprop", "lion", "adafactor"])
def test_every_optimizer_learns(name: str, tmp_path: Path) -> None:
    lr = {"adamw": 3e-3, "sgd": 0.3, "rmsprop": 1e-3, "lion": 3e-4, "adafactor": 1e-2}[name]
    res = train(
        _model(),
        _cfg(tmp_path, optimizer=name, lr=lr, max_steps=20),
        Windows(),
        causal_lm(),
        _val,
        tokens_per_batch=256,
    )
    assert res.val_losses[-1][1] < 0.7 * math.log(64), res.val_losses


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(precision: str, tmp_path: Path) -> None:
    res = train(
        _model(),
        _cfg(tmp_path, precision=precision, max_steps=15),
        Windows(),
        causal_lm(),
        _val,
        tokens_per_batch=256,
    )
    assert math.isfinite(res.final_loss) and res.val_losses[-1][1] < math.log(64)


def test_activation_checkpointing_gives_the_same_losses(tmp_path: Path) -> None:
    train(
        _model(), _cfg(tmp_path / "a", max_steps=4, log_every=1), Windows(), causal_lm(), tokens_per_batch=256
    )
    train(
        _model(),
        _cfg(tmp_path / "b", max_steps=4, log_every=1, activation_checkpointing=True),
        Windows(),
        causal_lm(),
        tokens_per_batch=256,
    )
    for (_, x), (_, y) in zip(_losses(tmp_path / "a"), _losses(tmp_path / "b"), strict=True):
        assert abs(x - y) < 1e-6


def test_weight_decay_spares_norms_biases_and_embeddings() -> None:
    model = _model()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("proj" in names[id(p)] and p.dim() == 2 for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {
        "tok_emb.weight",
        "final_norm.weight",
        "blocks.0.attn.q_proj.bias",
    }
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    opt = make_optimizer(model, "adamw", 1e-3, 0.1, (0.9, 0.95), 1e-8, 0.9, decay_embeddings=True)
    assert any(p is model.tok_emb.weight for p in opt.param_groups[0]["params"])


def test_schedules() -> None:
    cos = lr_lambda("cosine", 10, 111, min_lr_ratio=0.1)  # steps 0..110: warmup 0..9, decay 10..110
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0) and cos(10) == pytest.approx(1.0)
    assert (
        cos(60) == pytest.approx(0.55) and cos(110) == pytest.approx(0.1) and cos(500) == pytest.approx(0.1)
    )
    lin = lr_lambda("linear", 0, 101, min_lr_ratio=0.0)
    assert lin(50) == pytest.approx(0.5)
    step = lr_lambda("step", 0, 100, step_every=30, step_gamma=0.5)
    assert [step(s) for s in (0, 29, 30, 61)] == [1.0, 1.0, 0.5, 0.25]
    wsd = lr_lambda("wsd", 10, 100, min_lr_ratio=0.0, decay_fraction=0.2)  # decays over steps 80..99
    assert wsd(50) == 1.0 and wsd(80) == 1.0 and wsd(90) == pytest.approx(1 - 10 / 19) and wsd(99) == 0.0
    assert lr_lambda("constant", 5, 100)(99) == 1.0
    with pytest.raises(ConfigError, match="schedule='exp'"):
        lr_lambda("exp", 0, 10)


@pytest.mark.parametrize("steps", [1, 2, 5, 40])
@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine", "step", "wsd"])
def test_every_schedule_ends_where_documented(schedule: str, steps: int) -> None:
    """The last optimizer step runs at the schedule's end (the floor min_lr_ratio for linear, cosine
    and wsd), for warmup 0, 1, steps - 1 and warmup >= steps; warmup rises to 1 and decay never rises."""
    end = {"constant": 1.0, "linear": 0.1, "cosine": 0.1, "wsd": 0.1}
    for warmup in sorted({0, 1, steps - 1, steps, steps + 7}):
        f = lr_lambda(schedule, warmup, steps, min_lr_ratio=0.1, step_every=3, step_gamma=0.5)
        lrs = [f(s) for s in range(steps)]
        warm = min(warmup, steps - 1)
        assert all(0.0 < v <= 1.0 and math.isfinite(v) for v in lrs), (warmup, lrs)
        assert lrs[:warm] == pytest.approx([(s + 1) / warm for s in range(warm)])
        after = lrs[warm:]
        assert all(a >= b - 1e-12 for a, b in itertools.pairwise(after)), (warmup, lrs)
        expected = end.get(schedule, 0.5 ** ((steps - 1 - warm) // 3))
        assert lrs[-1] == pytest.approx(expected), (warmup, lrs)
        if schedule != "constant" and steps - warm >= 2:
            assert after[0] == 1.0  # the first step after warmup runs at the peak


def test_the_issue_example_reaches_the_floor() -> None:
    """min_lr_ratio 0.1, 5 steps, no warmup: the last step ran at 0.28 (linear) and 0.186 (cosine)."""
    for schedule in ("linear", "cosine", "wsd"):
        assert lr_lambda(schedule, 0, 5, min_lr_ratio=0.1)(4) == pytest.approx(0.1)
    assert [lr_lambda("linear", 0, 5)(s) for s in range(5)] == pytest.approx([1.0, 0.775, 0.55, 0.325, 0.1])


@pytest.mark.parametrize("schedule", ["linear", "cosine", "wsd"])
def test_the_logged_lr_of_the_last_step_is_the_floor(schedule: str, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, max_steps=5, warmup_steps=0, schedule=schedule, lr=1e-3, log_every=1, save_every=5)
    train(_model(), cfg, Windows(), causal_lm(), tokens_per_batch=256)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert len(lrs) == 5 and lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)


def test_train_config_validation() -> None:
    with pytest.raises(ConfigError, match="exactly one of max_steps"):
        TrainConfig(max_steps=None, epochs=None)
    with pytest.raises(ConfigError, match="optimizer='adam'"):
        TrainConfig(optimizer="adam")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="label_smoothing"):
        TrainConfig(label_smoothing=1.5)
    with pytest.raises(ConfigError, match=r"lr=-0.001 must be finite and >= 0"):
        TrainConfig(lr=-1e-3)
    for lr in (math.inf, -math.inf):
        with pytest.raises(ConfigError, match=rf"lr={lr} must be finite"):
            TrainConfig(lr=lr)


@pytest.mark.parametrize("name", ["adamw", "sgd", "rmsprop", "lion", "adafactor"])
def test_lr_zero_trains_nothing(name: str, tmp_path: Path) -> None:
    """lr = 0 is a legal control run (GRPO's intended-effect criterion): warmup, decay and weight decay
    included, every weight stays bit-identical and the logged lr is 0."""
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = _cfg(tmp_path, optimizer=name, lr=0.0, max_steps=3, warmup_steps=1, log_every=1, weight_decay=0.1)
    train(model, cfg, Windows(), causal_lm(), tokens_per_batch=256)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if "lr" in r] == [0.0, 0.0, 0.0]


class SignalAt(Windows):
    """Windows that send this process ``signals`` while building batch ``at`` (mid-step)."""

    def __init__(self, at: int, *signals: int) -> None:
        super().__init__()
        self.at, self.signals = at, signals

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        if index == self.at:
            for sig in self.signals:
                os.kill(os.getpid(), sig)
        return super().batch(index)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_the_step_and_the_cli_exits_with_its_code(
    sig: int, code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM exits 143 (128 + 15), as a shell reports a process SIGTERM ended; SIGINT (Ctrl-C) 130;
    a second signal stops at once, without saving, with the same code."""
    cfg = _cfg(tmp_path, max_steps=20, save_every=100, eval_every=100)
    with pytest.raises(TrainingInterrupted) as first:
        train(_model(), cfg, SignalAt(3, sig), causal_lm(), tokens_per_batch=256)
    assert first.value.exit_code == code and (first.value.checkpoint / "train_state" / "state.pt").is_file()
    with pytest.raises(StoppedBySignal) as second:
        train(
            _model(),
            _cfg(tmp_path / "b", max_steps=20),
            SignalAt(3, sig, sig),
            causal_lm(),
            tokens_per_batch=256,
        )
    assert second.value.exit_code == code and not (tmp_path / "b" / "checkpoints").exists()

    def interrupted(args: Any) -> int:
        raise first.value

    monkeypatch.setattr("lamina.cli.models.run", interrupted)
    assert main(["models"]) == code


def test_checkpoints_keep_every_eos_id(tmp_path: Path) -> None:
    """generation.yaml holds the starting model's eos ids (``generation``) and the tokenizer's (its eos
    and its chat template's end of turn), not just the tokenizer's eos; the decoding defaults stay."""
    from tiny_chat import tiny_tokenizer

    tok = tiny_tokenizer()
    end = tok.token_to_id("<|im_end|>")
    start = GenerationConfig(eos_token_ids=[7], temperature=0.7)
    cfg = _cfg(tmp_path, max_steps=2, save_every=2, eval_every=100)
    train(_model(), cfg, Windows(), causal_lm(), tokens_per_batch=256, tokenizer=tok, generation=start)
    for folder in ("last", "checkpoints/step-00000002"):
        saved = load_yaml(GenerationConfig, tmp_path / folder / "generation.yaml")
        assert saved.eos_token_ids == [7, end] and saved.temperature == 0.7, folder
