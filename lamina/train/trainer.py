"""The training loop: one loop for every objective.

The loop knows a model, a ``BatchSource`` (batch ``i`` is a pure function of ``i``, so resuming at step
k needs only k), an objective (model, batch) -> (mean loss, count), and a ``TrainConfig``. It owns:
mixed precision (``auto``: bf16 where the hardware has it natively, resolved once per run, printed and
recorded; ``lamina.train.precision``); gradient accumulation, token-weighted (a step's loss and gradient are the mean over
every target scored in its micro-batches on every process, as one big batch would give); clipping; the
optimizer and schedule; evaluation and early stopping; checkpoints (periodic, best, last; atomic; exact
resume); metrics and the progress bar.

Output folder::

    OUT/checkpoints/step-00000500/   lamina checkpoint + train_state/ (optimizer, scheduler, RNG, step)
    OUT/best/                        the checkpoint with the lowest validation loss (or best best_metric)
    OUT/last/                        the final checkpoint (with train_state/)
    OUT/metrics.jsonl, OUT/tensorboard/, OUT/curves.png, OUT/run.yaml, OUT/report.html

Interrupting. The first SIGINT (Ctrl-C) or SIGTERM lets the current step finish (its micro-batches,
update, logging, due evaluation), saves ``checkpoints/step-N/`` with ``train_state/`` through the same
atomic writer as periodic checkpoints, prints the ``--resume`` command on stderr and raises
``TrainingInterrupted`` (a ``KeyboardInterrupt``); the CLI exits with 128 + the signal's number, as a
shell reports a process that signal ended (130 for SIGINT, 143 for SIGTERM). Resuming continues exactly
as if nothing had happened. A second signal stops at once without saving (``StoppedBySignal``, the same
exit code; the atomic writer leaves the previous checkpoints intact). Under torchrun every process takes part: Ctrl-C in a terminal reaches
them all, and torchrun passes a signal it gets on to its workers (then kills them 30 s later). Each
process adds its stop request to the all-reduce of the step's loss, so all stop after the same step,
gather the state together (FSDP) and rank 0 alone writes it. Handlers are installed only when ``train``
runs in the main thread; the previous ones are restored when it returns.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lamina.checkpoint.eos import eos_token_ids
from lamina.checkpoint.lamina import (
    WEIGHTS_FILE,
    atomic_folder,
    load_checkpoint,
    write_checkpoint_files,
)
from lamina.config import GenerationConfig, TrainConfig
from lamina.errors import ConfigError, LaminaError
from lamina.model.transformer import Transformer, set_dropout
from lamina.train import distributed as D
from lamina.train.freeze import freeze
from lamina.train.metrics import MetricsLog, peak_flops, plot_curves
from lamina.train.objectives import Batch, Objective
from lamina.train.optim import lr_lambda, make_optimizer
from lamina.train.precision import autocast_for, run_precision, running_in

if TYPE_CHECKING:
    from lamina.diffusion.unet import UNet

STATE_DIR, STATE_FILE = "train_state", "state.pt"
EMA_FILE = "ema.safetensors"  # a run with ema_decay: the moving average of the weights, in every checkpoint
ADAPTER_DIR = "adapter"  # a LoRA run's adapters in a checkpoint, PEFT's files
RUN_MARKERS = ("metrics.jsonl", "checkpoints", "best", "last")  # a folder with any of these holds a run
# what overwrite=True clears
RUN_OUTPUTS = (*RUN_MARKERS, "tensorboard", "curves.png", "run.yaml", "report.html")
_STEP_DIR = re.compile(r"^step-(\d+)$")


EvaluationHook = Callable[[int, dict[str, float]], None]
_EVALUATION_HOOK: contextvars.ContextVar[EvaluationHook | None] = contextvars.ContextVar(
    "lamina_evaluation_hook", default=None
)


@contextlib.contextmanager
def evaluation_hook(hook: EvaluationHook) -> Any:
    """Call ``hook(step, metrics)`` after every evaluation of the runs trained inside this block
    (``metrics``: what metrics.jsonl records, ``{"val_loss": ..., "val_ppl": ..., task metrics}``).
    An exception the hook raises stops the run there (``lamina.train.search`` prunes trials so)."""
    token = _EVALUATION_HOOK.set(hook)
    try:
        yield
    finally:
        _EVALUATION_HOOK.reset(token)


class TrainingError(LaminaError):
    """Training cannot go on (a NaN/inf loss, a corpus too small for one batch, ...)."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM stopped training after a step, once a checkpoint of that step was saved.

    A ``KeyboardInterrupt``, so code that catches ``Exception`` does not swallow it. ``signal``: the
    signal's name; ``step`` / ``total_steps``: where it stopped; ``checkpoint``: the folder saved;
    ``resume``: how to continue (the command line when run by the ``lamina`` CLI).
    """

    def __init__(self, signal_name: str, step: int, total_steps: int, checkpoint: Path, resume: str) -> None:
        super().__init__(
            f"interrupted by {signal_name} after step {step} of {total_steps}; saved {checkpoint}; "
            f"continue with: {resume}"
        )
        self.signal, self.step, self.total_steps = signal_name, step, total_steps
        self.checkpoint, self.resume = checkpoint, resume

    @property
    def exit_code(self) -> int:
        """128 + the signal's number (130 for SIGINT, 143 for SIGTERM); 130 when the signal reached
        another process of the run, not this one."""
        return _exit_code(self.signal)


class StoppedBySignal(KeyboardInterrupt):
    """A second SIGINT or SIGTERM stopped training at once, without saving. ``exit_code``: 128 + the
    signal's number, as for ``TrainingInterrupted``."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(f"stopped by a second {signal_name}, without saving")
        self.signal = signal_name
        self.exit_code = _exit_code(signal_name)


def _exit_code(signal_name: str) -> int:
    """The shell's exit status of a process ended by the signal ``signal_name`` (``"SIGTERM"`` -> 143)."""
    number = getattr(signal.Signals, signal_name, signal.SIGINT)
    return 128 + int(number)


class BatchSource(Protocol):
    """Batches by index: ``batch(i)`` must depend only on ``i`` (and this process's rank)."""

    def batch(self, index: int) -> Batch:
        """The ``index``-th micro-batch of this process, as CPU tensors."""
        ...


class EMA:
    """An exponential moving average of a model's floating-point tensors (Polyak averaging; the weights
    DDPM samples with). ``update(step)`` after each optimizer step: ``ema = d ema + (1 - d) w`` with
    ``d = min(decay, (1 + step) / (10 + step))`` (diffusers' EMAModel warm-up)."""

    def __init__(self, model: Any, decay: float, mode: str = "single") -> None:
        if not 0 < decay < 1:
            raise ConfigError(f"ema_decay={decay} must be in (0, 1) (e.g. 0.999)")
        if mode == "fsdp":
            raise ConfigError(
                "ema_decay is not supported with FSDP (sharded weights); use DDP or one process"
            )
        self.model, self.decay = model, decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in self.model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach(), 1 - d)

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.shadow.items()}

    def load(self, weights: Mapping[str, torch.Tensor]) -> None:
        for k, v in weights.items():
            self.shadow[k].copy_(v)


# best_metric's figures that improve downwards (the first: the default); every other figure improves upwards
LOWER_IS_BETTER = ("val_loss", "val_ppl")
DEFAULT_BEST_METRIC = LOWER_IS_BETTER[0]


@dataclass
class TrainResult:
    """What a run did."""

    steps: int
    final_loss: float
    best_val_loss: float | None
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    stopped_early: bool = False
    out_dir: Path | None = None
    tokens_per_s: float = 0.0
    mfu: float = 0.0
    val_metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    data: dict[str, float] = field(default_factory=dict)  # counts about the data (rows, truncated, ...)
    # what a person should know about the run ("3 of 80 training texts truncated to 128 tokens")
    notes: list[str] = field(default_factory=list)
    # wall-clock seconds: of train(); pretrain() and finetune() count from their call (data included)
    elapsed: float = 0.0
    is_main: bool = True  # rank 0 (or the only process): under torchrun only it prints the summary
    best_metric: str = DEFAULT_BEST_METRIC  # the evaluation's figure that chose OUT/best (train's)
    # (step, figure) of OUT/best, by best_metric (the figure as evaluated: a ROUGE-L, not negated)
    best: tuple[int, float] | None = None

    def summary(self) -> str:
        """The run in one line, as the CLI prints it at the end: steps and elapsed time, the final and
        best losses (or the figure that chose ``OUT/best``, when that is not the validation loss), the last
        evaluation's metrics, the notes, and where the checkpoints are."""
        head = f"trained {self.steps} steps in {format_duration(self.elapsed)}"
        if math.isfinite(self.final_loss):
            head += f", final loss {self.final_loss:.4f}"
        if self.best_metric != DEFAULT_BEST_METRIC and self.best is not None:  # not the lowest loss's
            head += f", best {self.best_metric} {self.best[1]:.4f} (step {self.best[0]})"
        elif self.best_val_loss is not None:
            head += f", best validation loss {self.best_val_loss:.4f}"
        parts = [head]
        if self.val_metrics:
            parts.append("held-out " + ", ".join(f"{k} {v:.4f}" for k, v in self.val_metrics[-1][1].items()))
        return "; ".join([*parts, *self.notes, f"checkpoints in {self.out_dir}"])


def format_duration(seconds: float) -> str:
    """``42.3 s``, ``3 min 05 s``, ``2 h 07 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


# why a model with LoRA adapters is refused parallel=fsdp, and the fix
LORA_UNDER_FSDP = (
    "LoRA adapters train with --train.parallel ddp (each process keeps the small adapters whole); "
    "FSDP shards them and their checkpoint cannot be written"
)


def train(
    model: Transformer | UNet,
    cfg: TrainConfig,
    batches: BatchSource,
    objective: Objective,
    val_batches: Callable[[], Iterable[Batch]] | None = None,
    *,
    tokens_per_batch: int,
    total_steps: int | None = None,
    tokenizer: Any = None,
    run_config: dict[str, Any] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    eval_metrics: Callable[[nn.Module], dict[str, float]] | None = None,
    perplexity: bool = True,
    data_stats: dict[str, float] | None = None,
    notes: list[str] | None = None,
    generation: GenerationConfig | None = None,
    ema_decay: float | None = None,
    best_metric: str = DEFAULT_BEST_METRIC,
) -> TrainResult:
    """Train ``model`` in place; returns a summary. See the module docstring for what is written.

    ``tokens_per_batch`` (tokens in one micro-batch of one process) feeds tokens/s and MFU;
    ``total_steps`` overrides ``cfg.max_steps`` (the caller computes it from ``cfg.epochs``).
    ``resume`` continues from the newest complete checkpoint in ``cfg.out_dir`` (model, optimizer,
    scheduler, RNG and step), so the losses that follow equal those of an uninterrupted run.
    A folder that already holds a run (``RUN_MARKERS``) is refused with ``ConfigError`` unless
    ``resume`` continues it or ``overwrite`` first deletes its outputs (``RUN_OUTPUTS``; other files in
    the folder stay); see ``check_out_dir``. A model with LoRA adapters trains with ``parallel`` none or
    ddp (``ConfigError`` for fsdp). A model converted for inference (``weight_format`` set:
    ``lamina.model.quant.convert_weights``) is refused with ``ConfigError`` unless it carries LoRA adapters.
    ``eval_metrics(model)`` (optional) adds task metrics (accuracy, F1, ...) to every evaluation.
    ``perplexity``: the loss is a cross-entropy per token, so evaluations also report its exponential
    (``val_ppl``); False for objectives where that means nothing (classification, regression).
    ``data_stats`` (counts about the data: rows, truncated rows, ...) is written to metrics.jsonl as a
    step-0 record and kept in ``TrainResult.data``; ``notes`` (lines for a person, e.g. how many texts
    were truncated) are printed on stderr at the start and kept in ``TrainResult.notes``.
    ``cfg.freeze`` freezes blocks or parameters by name (``lamina.train.freeze``) before the optimizer
    is built. ``generation`` (the starting model's decoding defaults, ``load(init).generation``) is
    written as every checkpoint's generation.yaml, with every end-of-generation id of the starting model
    and of ``tokenizer`` (its eos and its chat template's end of turn; ``lamina.checkpoint.eos``), so a
    trained chat model still stops at the end of its turn.
    ``model`` is a ``Transformer`` or a diffusion ``UNet`` (``lamina.diffusion``): a UNet counts its own
    FLOPs (``flops()``: one image's forward; "tokens" are then images) and its checkpoints hold its
    config with its ``kind`` (``lamina.checkpoint.lamina.write_checkpoint_files``).
    ``ema_decay`` keeps an exponential moving average of the weights (decay ``min(ema_decay, (1 + step)
    / (10 + step))``, diffusers' EMAModel), written as every checkpoint's ``EMA_FILE`` and resumed.
    ``best_metric`` is the evaluation's figure that picks ``OUT/best`` and drives early stopping:
    ``val_loss`` (the default) or ``val_ppl`` (lower wins), or a key of ``eval_metrics``' result such as
    ``val_rougeL`` (higher wins). ``ConfigError`` at once for a figure the evaluation cannot have
    (``val_ppl`` with ``perplexity=False``; any other without ``eval_metrics``), and at the first
    evaluation when ``eval_metrics``' result has no such figure. A run resumed with another
    ``best_metric`` than it was saved with chooses ``OUT/best`` afresh (the figures do not compare).
    """
    started = time.perf_counter()
    check_best_metric(best_metric, eval_metrics is not None, perplexity)
    if cfg.parallel == "fsdp" and _has_lora(model):  # finetune refuses it before loading; a backstop
        raise ConfigError(LORA_UNDER_FSDP)
    converted = getattr(model, "weight_format", None)
    if converted is not None and not _has_lora(model):  # QLoRA trains adapters over converted weights
        raise ConfigError(
            f"this model was converted for inference (weights={converted!r}): its linear layers would not "
            "train and no checkpoint could be written; train the model as loaded (without weights=), or "
            "LoRA adapters over it (lora.base_weights)"
        )
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    generation = _with_eos_ids(generation or GenerationConfig(), tokenizer)
    info = D.setup(cfg.device, cfg.parallel)
    out = Path(cfg.out_dir)
    check_out_dir(out, resume=resume, overwrite=overwrite)
    if overwrite:
        if info.is_main:
            clear_run(out)
        D.barrier(info)
    steps = total_steps if total_steps is not None else cfg.max_steps
    assert steps is not None
    torch.manual_seed(cfg.seed)
    if cfg.dropout is not None and isinstance(model, Transformer):
        set_dropout(model, cfg.dropout)
    if cfg.freeze:
        freeze(model, cfg.freeze)
    if isinstance(model, Transformer):
        model.activation_checkpointing = cfg.activation_checkpointing
    start_state: dict[str, Any] | None = None
    ckpt = None
    if resume:
        ckpt = latest_checkpoint(out)
        assert ckpt is not None  # check_out_dir made sure
        start_state = torch.load(ckpt / STATE_DIR / STATE_FILE, weights_only=True)
        if "adapters" in start_state:  # LoRA: the base is frozen (the model given); the adapters come back
            from lamina.model.lora import load_lora_state_dict

            load_lora_state_dict(model, start_state["adapters"])
        elif isinstance(model, Transformer):
            resumed, _ = load_checkpoint(ckpt)
            model.load_state_dict(resumed.state_dict())
        else:
            model.load_state_dict(load_file(str(ckpt / WEIGHTS_FILE)))
    model.to(info.device)
    ema = None if ema_decay is None else EMA(model, ema_decay, info.mode)
    if ema is not None and ckpt is not None and (ckpt / EMA_FILE).is_file():
        ema.load(load_file(str(ckpt / EMA_FILE), device=str(info.device)))
    net: nn.Module = D.wrap(model, info)
    opt = make_optimizer(
        net,
        cfg.optimizer,
        cfg.lr,
        cfg.weight_decay,
        (cfg.beta1, cfg.beta2),
        cfg.eps,
        cfg.momentum,
        cfg.decay_embeddings,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lr_lambda(
            cfg.schedule,
            cfg.warmup_steps,
            steps,
            cfg.min_lr_ratio,
            cfg.lr_step_every,
            cfg.lr_step_gamma,
            cfg.wsd_decay_fraction,
        ),
    )
    precision, why = run_precision(cfg.precision, info, start_state)  # the one decision, used throughout
    if run_config is not None and isinstance(run_config.get("train"), dict):  # run.yaml: the resolved value
        run_config = {**run_config, "train": {**run_config["train"], "precision": precision}}
    scaler = torch.amp.GradScaler(info.device.type, enabled=precision == "fp16")
    step, best_val, bad_evals = 0, math.inf, 0
    best_step: int | None = None  # of OUT/best
    if start_state is not None:
        D.load_optimizer_state(net, opt, start_state["optimizer"], info)
        sched.load_state_dict(start_state["scheduler"])
        scaler.load_state_dict(start_state["scaler"])
        torch.set_rng_state(start_state["rng"]["torch"])
        if info.device.type == "cuda" and "cuda" in start_state["rng"]:
            torch.cuda.set_rng_state_all(start_state["rng"]["cuda"])
        step, best_val, bad_evals = start_state["step"], start_state["best_val"], start_state["bad_evals"]
        best_step = start_state.get("best_step")
        saved_by = start_state.get("best_metric", DEFAULT_BEST_METRIC)  # states before it was kept: val_loss
        if saved_by != best_metric:  # a loss and a negated ROUGE-L do not compare: OUT/best starts afresh
            best_val, bad_evals, best_step = math.inf, 0, None
            if info.is_main:
                print(f"lamina: best_metric is now {best_metric} (the run was saved choosing OUT/best by "
                      f"{saved_by}): the next evaluation replaces OUT/best", file=sys.stderr)  # fmt: skip
    if cfg.compile:
        net = torch.compile(net)  # type: ignore[assignment]

    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if run_config is not None:
            (out / "run.yaml").write_text(_yaml(run_config))
    log = MetricsLog(out, enabled=info.is_main, resume_step=step if resume else None)
    # an objective's own values for the step just taken (GRPO's rewards, KL, ...), logged with its loss
    step_metrics: Callable[[], dict[str, float]] | None = getattr(objective, "step_metrics", None)
    if data_stats and not resume:
        log.log(0, **data_stats)
    if cfg.precision == "auto" and info.is_main:
        print(f"lamina: training in {precision} ({why})", file=sys.stderr)
    if notes and info.is_main:
        for note in notes:
            print(f"lamina: {note}", file=sys.stderr)
    if isinstance(model, Transformer):
        flops_per_token = model.config.flops_per_token(cfg.seq_len or model.config.max_seq_len, training=True)
    else:
        flops_per_token = 3 * model.flops()  # an image's forward, and its backward as twice that
    peak = peak_flops(info.device, precision) * info.world_size  # of the precision in use
    autocast = autocast_for(precision, info.device)
    tokens_per_step = tokens_per_batch * cfg.grad_accum_steps * info.world_size
    norm = float(max(1, tokens_per_batch))

    def save(folder: Path, with_state: bool) -> None:
        weights = D.full_model_state(net, info)
        adapted = _has_lora(model)
        state = None
        if with_state:
            state = {
                "optimizer": D.full_optimizer_state(net, opt, info),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(),
                "precision": precision,  # what a resumed precision=auto run computes in
                "rng": _rng_state(info.device),
                "step": step,
                "best_val": best_val,
                "best_metric": best_metric,  # what best_val measures (a resume by another starts afresh)
                "best_step": best_step,
                "bad_evals": bad_evals,
            }
            if adapted:
                from lamina.model.lora import adapter_state

                state["adapters"] = adapter_state(model, weights)
        if info.is_main:
            _write_checkpoint(folder, model.config, weights, tokenizer, generation, state, run_config,
                              adapter_of=model if adapted and isinstance(model, Transformer) else None,
                              ema=ema.weights() if ema is not None else None)  # fmt: skip
        D.barrier(info)

    def evaluate() -> float:
        assert val_batches is not None
        net.eval()
        total, count = torch.zeros((), device=info.device), 0
        with torch.no_grad(), autocast:
            for i, b in enumerate(val_batches()):
                if i >= cfg.eval_batches:
                    break
                loss, n = objective(net, _to(b, info.device))
                total += loss.float() * n
                count += n
        net.train()
        # token-weighted over every batch of every process, like the training loss
        sums = D.sum_across(torch.stack([total, torch.tensor(float(count), device=info.device)]), info)
        if sums[1] == 0:
            raise TrainingError(
                "the validation split gave no batch (or no scored target); lower batch_size or seq_len, "
                "or add data"
            )
        return float(sums[0] / sums[1])

    result = TrainResult(steps=step, final_loss=math.nan, best_val_loss=None, out_dir=out,
                         data=dict(data_stats or {}), notes=list(notes or []), is_main=info.is_main,
                         best_metric=best_metric)  # fmt: skip
    bar = tqdm(
        total=steps,
        initial=step,
        desc="train",
        unit="step",
        disable=not (cfg.progress and info.is_main),
        dynamic_ncols=True,
    )
    net.train()
    t_window, tokens_window = time.perf_counter(), 0
    stops = _StopSignals(verbose=info.is_main)
    scope = contextlib.ExitStack()
    try:
        # what the objective's data computes outside the autocast below (GRPO's old/reference log-probs,
        # DPO's precomputed ones) uses the same precision: precision.run_autocast()
        scope.enter_context(running_in(precision, info.device))
        stops.install()
        while step < steps:
            # Token-weighted accumulation: each micro-batch adds (its mean loss x its count) / norm to the
            # gradients; once the step's total count over micro-batches and processes is known, the
            # gradients are rescaled so they equal those of the mean over every scored target of the step
            # (one big batch), however unevenly the targets fall. DDP/FSDP average over processes, hence
            # the world size in the rescale. ``norm`` (the same on every process) only keeps magnitudes
            # near those of a mean loss for fp16 loss scaling.
            loss_sum = torch.zeros((), device=info.device)
            count = 0
            for micro in range(cfg.grad_accum_steps):
                batch = _to(batches.batch(step * cfg.grad_accum_steps + micro), info.device)
                sync = micro == cfg.grad_accum_steps - 1
                with _no_sync(net, info, sync), autocast:
                    loss, n = objective(net, batch)
                    scaler.scale(loss * (n / norm)).backward()
                loss_sum += loss.detach().float() * n
                count += n
            # one all-reduce: the loss sum, the scored count and whether any process was asked to stop
            local = torch.tensor([float(count), float(stops.requested)], device=info.device)
            sums = D.sum_across(torch.cat([loss_sum.reshape(1), local]), info)
            n_total = float(sums[1])
            stop_requested = bool(sums[2] > 0)
            scored = n_total > 0  # a step whose every target is ignored changes nothing
            loss_value = float(sums[0]) / n_total if scored else math.nan
            if scored and not math.isfinite(loss_value):
                last = latest_checkpoint(out)
                raise TrainingError(
                    f"loss became {loss_value} at step {step + 1}; the last good checkpoint is "
                    f"{last or 'none (none was saved yet)'}. Lower lr, keep grad_clip on, or use fp32/bf16"
                )
            grad_norm = math.nan
            if scored:
                _scale_grads(net, norm * info.world_size / n_total)
                if cfg.grad_clip > 0:
                    scaler.unscale_(opt)
                    grad_norm = float(nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip))
                scaler.step(opt)
                scaler.update()
                if ema is not None:
                    ema.update(step)
            opt.zero_grad(set_to_none=True)
            lr = float(sched.get_last_lr()[0])
            sched.step()
            step += 1
            tokens_window += tokens_per_step
            if scored:
                result.final_loss = loss_value

            if scored and (step % cfg.log_every == 0 or step == steps):
                dt = time.perf_counter() - t_window
                tps = tokens_window / dt if dt > 0 else 0.0
                mfu = flops_per_token * tps / peak
                result.tokens_per_s, result.mfu = tps, mfu
                own = step_metrics() if step_metrics is not None else {}
                log.log(step, loss=loss_value, lr=lr, grad_norm=grad_norm, tokens_per_s=tps, mfu=mfu, **own)
                bar.set_postfix(
                    loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", mfu=f"{mfu:.0%}"
                )
                t_window, tokens_window = time.perf_counter(), 0
            bar.update(1)

            stop = False
            if val_batches is not None and (step % cfg.eval_every == 0 or step == steps):
                val = evaluate()
                result.val_losses.append((step, val))
                extra: dict[str, float] = {}
                if eval_metrics is not None:
                    net.eval()
                    with torch.no_grad(), autocast:
                        extra = eval_metrics(net)
                    net.train()
                    result.val_metrics.append((step, extra))
                ppl = {"val_ppl": math.exp(min(val, 50.0))} if perplexity else {}
                log.log(step, val_loss=val, tokens=step * tokens_per_step, **ppl, **extra)
                if (hook := _EVALUATION_HOOK.get()) is not None:
                    hook(step, {"val_loss": val, **ppl, **extra})
                shown = "".join(f", {k} {v:.4f}" for k, v in extra.items())
                shown = f", perplexity {ppl['val_ppl']:.2f}{shown}" if perplexity else shown
                bar.write(f"step {step}: val loss {val:.4f}{shown}")
                score = _best_score(best_metric, {"val_loss": val, **ppl, **extra})
                if score < best_val - cfg.early_stopping_min_delta:
                    best_val, bad_evals, best_step = score, 0, step
                    save(out / "best", with_state=False)
                else:
                    bad_evals += 1
                    if cfg.early_stopping_patience and bad_evals >= cfg.early_stopping_patience:
                        bar.write(f"early stopping: no improvement in {bad_evals} evaluations")
                        result.stopped_early = stop = True
            checkpoint = out / "checkpoints" / f"step-{step:08d}"
            saved = step % cfg.save_every == 0 or step == steps or stop
            if saved or (stop_requested and step < steps):
                save(checkpoint, with_state=True)
                if info.is_main:
                    _prune(out / "checkpoints", cfg.keep_last)
            if stop:
                break
            if stop_requested and step < steps:
                name = stops.name or "a signal to another process"
                interrupted = TrainingInterrupted(name, step, steps, checkpoint, resume_command())
                if info.is_main:
                    bar.close()
                    print(f"lamina: {interrupted}", file=sys.stderr, flush=True)
                raise interrupted
        last = latest_checkpoint(out)
        if info.is_main and last is not None:
            atomic_folder(out / "last", lambda tmp: _copy_into(last, tmp))
    finally:
        scope.close()
        stops.restore()
        bar.close()
        log.close()
        D.cleanup(info)
    result.steps = step
    if best_step is not None and math.isfinite(best_val):  # best_val is negated where higher wins
        result.best = (best_step, best_val if best_metric in LOWER_IS_BETTER else -best_val)
    if best_metric == "val_loss":
        result.best_val_loss = best_val if math.isfinite(best_val) else None
    else:  # best_val holds the chosen figure (negated when higher wins): report the lowest loss seen
        result.best_val_loss = min((v for _, v in result.val_losses), default=None)
    if info.is_main and (out / "metrics.jsonl").exists():
        plot_curves(out / "metrics.jsonl", out / "curves.png")
        from lamina.analysis.report import write_report

        write_report(out)
    result.elapsed = time.perf_counter() - started
    return result


class _StopSignals:
    """SIGINT/SIGTERM handlers for the loop: the first signal asks it to stop after the current step
    (``requested``, ``name``); a second one raises ``StoppedBySignal`` at once."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.requested, self.name = False, ""
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise StoppedBySignal(signal.Signals(signum).name)
        self.requested, self.name = True, signal.Signals(signum).name
        if self.verbose:
            sys.stderr.write(
                f"\nlamina: {self.name}: stopping after this step and saving a checkpoint "
                f"({self.name} again stops at once, without saving)\n"
            )
            sys.stderr.flush()


def resume_command(argv: list[str] | None = None) -> str:
    """How to continue an interrupted run: this process's ``lamina pretrain|finetune ...`` command line
    with ``--resume`` (and without ``--overwrite``) when the ``lamina`` CLI runs it, else a hint for
    Python callers. ``argv`` defaults to ``sys.argv``."""
    argv = list(sys.argv if argv is None else argv)
    program = Path(argv[0]) if argv else Path()
    is_cli = program.name == "lamina" or (program.name == "__main__.py" and program.parent.name == "lamina")
    verb = next((a for a in argv[1:] if not a.startswith("-")), None)
    if not (is_cli and verb in ("pretrain", "finetune")):
        return "the same call with resume=True"
    args = [a for a in argv[1:] if a != "--overwrite"]
    return shlex.join(["lamina", *args, *([] if "--resume" in args else ["--resume"])])


def check_out_dir(out_dir: str | Path, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse to start a run where it would mix with another: ``out_dir`` holding a run (any of
    ``RUN_MARKERS``) needs ``resume`` (continue it) or ``overwrite`` (replace it); ``resume`` needs a
    checkpoint to resume from. Cheap: ``pretrain`` and ``finetune`` call it before preparing anything.

    Raises ``ConfigError`` (a run is there; both flags; nothing to resume). Changes nothing.
    """
    out = Path(out_dir)
    if resume and overwrite:
        raise ConfigError(
            "resume and overwrite contradict each other: --resume continues the run in "
            f"{out}, --overwrite deletes it and starts again; pick one"
        )
    found = [name for name in RUN_MARKERS if (out / name).exists()]
    if resume:
        if latest_checkpoint(out) is None:
            fix = "start it again with --overwrite (overwrite=True)" if found else "start without --resume"
            raise ConfigError(f"--resume: no checkpoint to resume in {out / 'checkpoints'}; {fix}")
        return
    if found and not overwrite:
        raise ConfigError(
            f"{out} already holds a run ({', '.join(found)}): continue it with --resume (resume=True), "
            "replace it with --overwrite (overwrite=True), or choose another output folder"
        )


def clear_run(out_dir: str | Path) -> None:
    """Delete the outputs of a run (``RUN_OUTPUTS``) from ``out_dir``; other files there stay."""
    out = Path(out_dir)
    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete periodic checkpoint (temp folders of interrupted writes are ignored)."""
    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name))]
    complete = [(s, p) for s, p in steps if (p / STATE_DIR / STATE_FILE).is_file()]
    return max(complete)[1] if complete else None


def _write_checkpoint(
    folder: Path,
    model_cfg: Any,
    weights: dict[str, torch.Tensor],
    tokenizer: Any,
    generation: GenerationConfig,
    state: dict[str, Any] | None,
    run_config: dict[str, Any] | None,
    adapter_of: Transformer | None = None,
    ema: dict[str, torch.Tensor] | None = None,
) -> None:
    """A lamina checkpoint plus the run config and (for resuming) the training state, atomically. For a
    model with LoRA adapters (``adapter_of``) the checkpoint holds the base weights under their plain
    names and the adapters in PEFT's format in ``ADAPTER_DIR`` (``lamina.checkpoint.peft.save_adapter``)."""
    if adapter_of is not None:  # the fp32 base (also under a quantized QLoRA base), plain names
        from lamina.model.lora import base_state_dict

        weights = base_state_dict(adapter_of, weights)

    def write(tmp: Path) -> None:
        write_checkpoint_files(tmp, model_cfg, weights, tokenizer, generation)
        if ema is not None:
            save_file(ema, str(tmp / EMA_FILE))
        if adapter_of is not None:
            from lamina.checkpoint.peft import save_adapter

            save_adapter(adapter_of, tmp / ADAPTER_DIR)
        if run_config is not None:
            (tmp / "run.yaml").write_text(_yaml(run_config))
        if state is not None:
            (tmp / STATE_DIR).mkdir()
            torch.save(state, tmp / STATE_DIR / STATE_FILE)

    atomic_folder(folder, write)


def _with_eos_ids(generation: GenerationConfig, tokenizer: Any) -> GenerationConfig:
    """``generation`` whose eos list also holds the tokenizer's end-of-generation ids (its eos, its chat
    template's end of turn), first occurrences kept in order."""
    if tokenizer is None:
        return generation
    return replace(generation, eos_token_ids=eos_token_ids(generation.eos_token_ids, tokenizer=tokenizer))


def _has_lora(model: nn.Module) -> bool:
    from lamina.model.lora import lora_config_of

    return lora_config_of(model) is not None


def _copy_into(src: Path, dst: Path) -> None:
    for p in src.iterdir():
        (shutil.copytree if p.is_dir() else shutil.copy2)(p, dst / p.name)


def check_best_metric(best_metric: str, eval_metrics: bool, perplexity: bool) -> None:
    """``ConfigError`` for a ``best_metric`` no evaluation of ``train`` can have: ``val_ppl`` when
    ``perplexity`` is off, any figure but the two losses without ``eval_metrics`` (given: True)."""
    if best_metric == "val_ppl" and not perplexity:
        raise ConfigError(
            "best_metric='val_ppl': this run's loss has no perplexity (perplexity=False); fix: best_metric='val_loss'"
        )
    if best_metric not in LOWER_IS_BETTER and not eval_metrics:
        has = "val_loss, val_ppl" if perplexity else "val_loss"
        raise ConfigError(
            f"best_metric={best_metric!r} is not a figure of the evaluation (it has {has}: no eval_metrics "
            "given); fix: choose one of those, or pass eval_metrics that returns it"
        )


def _best_score(best_metric: str, figures: dict[str, float]) -> float:
    """The evaluation's figure named ``best_metric`` as a score that improves downwards (negated when a
    higher figure is better). ``ConfigError`` when the evaluation has no such figure."""
    if best_metric not in figures:
        raise ConfigError(
            f"best_metric={best_metric!r} is not a figure of the evaluation (it has {', '.join(sorted(figures))}); "
            "fix: choose one of those"
        )
    value = float(figures[best_metric])
    return value if best_metric in LOWER_IS_BETTER else -value


def _prune(folder: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` periodic checkpoints (and stale temp folders)."""
    steps = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name)))
    for _, p in steps[: max(0, len(steps) - max(keep, 1))]:
        shutil.rmtree(p, ignore_errors=True)
    for p in folder.iterdir():
        if p.name.startswith(".step-"):
            shutil.rmtree(p, ignore_errors=True)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _no_sync(net: nn.Module, info: D.DistInfo, sync: bool) -> contextlib.AbstractContextManager[Any]:
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation."""
    if sync or info.mode != "ddp":
        return contextlib.nullcontext()
    return net.no_sync()  # type: ignore[operator]


def _scale_grads(net: nn.Module, factor: float) -> None:
    """Multiply every gradient by ``factor`` (in place; sharded FSDP gradients shard by shard)."""
    if factor == 1.0:
        return
    for p in net.parameters():
        if p.grad is not None:
            p.grad.mul_(factor)


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def read_run_config(folder: str | Path) -> dict[str, Any]:
    """The run config the trainer wrote into a run or checkpoint ``folder`` (its ``run.yaml``), as a
    mapping; {} when there is none (a checkpoint saved outside a run). Raises what reading and parsing
    YAML raise (OSError, yaml.YAMLError)."""
    from lamina.fields import parse_yaml

    path = Path(folder) / "run.yaml"
    run = parse_yaml(path.read_text()) if path.is_file() else None
    return run if isinstance(run, dict) else {}
