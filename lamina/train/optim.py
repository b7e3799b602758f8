"""Optimizers (AdamW, SGD with momentum, RMSprop, Lion, Adafactor) and learning-rate schedules.

Weight decay goes only to matrices of matmuls by default: norms, biases and embeddings are not decayed
(the GPT-2/nanoGPT convention), unless ``decay_embeddings`` asks for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

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


def lr_lambda(
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.1,
    step_every: int = 1000,
    step_gamma: float = 0.1,
    decay_fraction: float = 0.2,
) -> Callable[[int], float]:
    """The learning-rate multiplier at each step: linear warmup, then the schedule.

    constant; linear (to ``min_lr_ratio`` at the last step); cosine (likewise); step (x ``step_gamma``
    every ``step_every`` steps); wsd, warmup-stable-decay (flat, then linear decay over the last
    ``decay_fraction`` of the steps).
    """

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        if schedule == "step":
            return step_gamma ** ((step - warmup_steps) // step_every)
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        if schedule == "linear":
            return 1.0 - (1.0 - min_lr_ratio) * progress
        if schedule == "cosine":
            return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "wsd":
            decay_start = total_steps - int(decay_fraction * total_steps)
            if step < decay_start:
                return 1.0
            return 1.0 - (1.0 - min_lr_ratio) * (step - decay_start) / max(1, total_steps - decay_start)
        raise ConfigError(f"schedule={schedule!r} is not one of constant, linear, cosine, step, wsd")

    return f
