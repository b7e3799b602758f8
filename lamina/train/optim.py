"""Optimizers (AdamW, SGD with momentum, RMSprop, Lion, Adafactor) and learning-rate schedules.

Weight decay goes only to matrices of matmuls by default: norms, biases and embeddings are not decayed
(the GPT-2/nanoGPT convention), unless ``decay_embeddings`` asks for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, get_args

import torch
from torch import nn

from lamina.config import Schedule
from lamina.errors import ConfigError


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): sign of an interpolated
    momentum, decoupled weight decay. Use a learning rate about 3-10x smaller than AdamW's."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One update of every parameter with a gradient."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                update = (m * b1 + p.grad * (1 - b1)).sign_()
                p.add_(update, alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)
        return loss


def param_groups(
    model: nn.Module, weight_decay: float, decay_embeddings: bool = False
) -> list[dict[str, Any]]:
    """Two groups: decayed matmul weights, and everything else (norms, biases, embeddings) undecayed."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = id(p) in embeddings
        (decay if p.dim() >= 2 and (decay_embeddings or not is_embedding) else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    momentum: float,
    decay_embeddings: bool = False,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``model``'s trainable parameters, with weight-decay groups."""
    groups = param_groups(model, weight_decay, decay_embeddings)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, momentum=momentum, eps=eps)
    if name == "lion":
        return Lion(groups, lr=lr, betas=betas)
    if name == "adafactor":
        return torch.optim.Adafactor(groups, lr=lr)
    raise ConfigError(f"optimizer={name!r} is not one of 'adamw', 'sgd', 'rmsprop', 'lion', 'adafactor'")


SCHEDULES: tuple[str, ...] = get_args(Schedule)


def lr_lambda(
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.1,
    step_every: int = 1000,
    step_gamma: float = 0.1,
    decay_fraction: float = 0.2,
) -> Callable[[int], float]:
    """The learning-rate multiplier of optimizer step ``step`` (0-based: a run's steps are 0 ..
    ``total_steps - 1``): linear warmup, then the schedule. The last step runs at the schedule's end
    (nanoGPT's convention), so a decaying schedule's last update is made at ``lr x min_lr_ratio``.

    - warmup: steps ``0 .. w - 1`` run at ``(step + 1) / w`` with ``w = min(warmup_steps, total_steps - 1)``:
      at least the last step comes after warmup, so ``warmup_steps >= total_steps`` warms up over all but
      the last step, and a one-step run has no warmup.
    - constant: 1.
    - linear, cosine: from 1 at step ``w`` to ``min_lr_ratio`` at the last step. When only one step is
      left after warmup (``total_steps == 1``, or ``warmup_steps >= total_steps - 1``) it runs at
      ``min_lr_ratio``.
    - wsd (warmup-stable-decay): 1, then over the last ``max(1, int(decay_fraction x total_steps))``
      steps (never reaching back into warmup) linearly from 1 to ``min_lr_ratio`` at the last step.
    - step: ``step_gamma ** ((step - w) // step_every)``; ``min_lr_ratio`` does not apply.

    Steps past the end keep the last step's value. Raises ``ConfigError`` for an unknown schedule or
    ``total_steps < 1``.
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
    if total_steps < 1:
        raise ConfigError(f"total_steps={total_steps} must be >= 1")
    last = total_steps - 1
    warm = min(max(warmup_steps, 0), last)
    decay_start = max(warm, total_steps - max(1, int(decay_fraction * total_steps)))

    def progress(step: int, start: int) -> float:
        """0 at ``start``, 1 at the last step (1 when ``start`` is the last step)."""
        return 1.0 if start >= last else min(1.0, (step - start) / (last - start))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if schedule == "constant":
            return 1.0
        if schedule == "step":
            return step_gamma ** ((step - warm) // step_every)
        if schedule == "wsd":
            if step < decay_start:
                return 1.0
            return 1.0 - (1.0 - min_lr_ratio) * progress(step, decay_start)
        p = progress(step, warm)
        if schedule == "linear":
            return 1.0 - (1.0 - min_lr_ratio) * p
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))

    return f
