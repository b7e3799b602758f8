"""GRPO's maths (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300), as TRL 1.16's ``GRPOTrainer``
computes it (checked in tests/train/test_grpo.py): group-normalised advantages and the clipped-ratio
objective with a KL penalty to the reference. The ``--task grpo`` run (generation with lamina's engine,
reward functions) is not wired yet; these are its library functions.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lamina.errors import ConfigError

ScaleRewards = Literal["group", "batch", "none"]
GrpoLoss = Literal["grpo", "bnpo", "dr_grpo"]


def group_advantages(
    rewards: Tensor, group_size: int, scale_rewards: ScaleRewards = "group", weights: Tensor | None = None
) -> Tensor:
    """Advantages (N,) of N = prompts x ``group_size`` completions (each prompt's completions adjacent).

    ``rewards`` (N,) or (N, F) for F reward functions, summed with ``weights`` (F,) (default ones); each
    completion's advantage is its reward minus its group's mean, divided by the group's standard deviation
    (``"group"``), the whole batch's (``"batch"``) or not at all (``"none"``), plus 1e-4 (the standard deviation
    with Bessel's correction, as TRL's ``nanstd``). A NaN reward (unscorable) gets 0.
    """
    if rewards.dim() == 2:
        w = torch.ones(rewards.shape[1], dtype=rewards.dtype) if weights is None else weights.to(rewards)
        nan_rows = torch.isnan(rewards).all(1)
        rewards = (rewards * w).nansum(1)
        rewards[nan_rows] = torch.nan
    if rewards.numel() % group_size:
        raise ConfigError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    mean = torch.nanmean(grouped, 1).repeat_interleave(group_size)
    if scale_rewards == "batch":
        std = _std(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        std = _std(grouped, 1).repeat_interleave(group_size) if group_size > 1 else torch.zeros_like(rewards)
    adv = rewards - mean
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)


def _std(x: Tensor, dim: int | None = None) -> Tensor:
    """Standard deviation ignoring NaNs, with Bessel's correction (TRL's ``nanstd``)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    n = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = var * n / (n - 1)
    return var.sqrt() if dim is None else var.sqrt().squeeze(dim)


def grpo_loss(
    logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    old_logps: Tensor | None = None,
    ref_logps: Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: GrpoLoss = "grpo",
    max_completion_length: int | None = None,
    use_bias_correction_kl: bool = True,
) -> tuple[Tensor, dict[str, float]]:
    """The GRPO objective of completions' per-token log-probs ``logps`` (B, T) under the policy.

    ``advantages`` (B,); ``mask`` (B, T) marks completion tokens; ``old_logps`` (B, T): the policy that
    generated (None: ``logps`` detached, one optimisation step per generation); ``ref_logps`` (B, T): the
    reference, needed when ``beta`` > 0 (KL estimator k3: ``exp(ref - logp) - (ref - logp) - 1``, times the
    ratio with ``use_bias_correction_kl``, so its gradient is the unbiased reverse-KL one: TRL's default,
    after DeepSeek-V3.2; the value is unchanged on-policy, the gradient is not). Ratio
    clipped to [1 - epsilon, 1 + epsilon_high]. Reduction: ``grpo`` mean over each sequence's tokens then
    over sequences; ``bnpo`` mean over all tokens; ``dr_grpo`` sum over tokens / (B x
    ``max_completion_length``). Returns (loss, {"kl", "clip_ratio"}).
    """
    high = epsilon if epsilon_high is None else epsilon_high
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    adv = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + high) * adv)
    m = mask.to(logps.dtype)
    metrics: dict[str, float] = {}
    if beta != 0.0:
        if ref_logps is None:
            raise ConfigError("grpo beta > 0 needs the reference's log-probs (ref_logps)")
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        per_token = per_token + beta * (kl * ratio if use_bias_correction_kl else kl)
        metrics["kl"] = float((kl.detach() * m).sum() / m.sum().clamp(min=1))
    clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))
    metrics["clip_ratio"] = float((clipped.float() * m).sum() / m.sum().clamp(min=1))
    if loss_type == "grpo":
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * m).sum() / m.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ConfigError("loss_type dr_grpo needs max_completion_length")
        loss = (per_token * m).sum() / (per_token.shape[0] * max_completion_length)
    else:
        raise ConfigError(f"loss_type={loss_type!r} is not one of grpo, bnpo, dr_grpo")
    return loss, metrics
