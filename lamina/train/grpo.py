"""GRPO (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300) on the one trainer, as TRL 1.16's
``GRPOTrainer`` computes it (the maths checked in tests/train/test_grpo.py): group-normalised advantages
and the clipped-ratio objective with a KL penalty to the reference; ``lamina finetune --task grpo``::

    task:  {task: grpo, data: prompts.jsonl, max_seq_len: 512}    # {"prompt": "..."} or message lists
    grpo:  {reward_funcs: ["my_rewards.py:brevity", "runs/rm/last"], reward_weights: [1.0, 0.5],
            num_generations: 8, max_completion_length: 128, beta: 0.04, loss_type: dapo}
    train: {batch_size: 16, lr: 1.0e-6}     # completions per micro-batch: 2 prompts x 8 generations
    init:  smollm2
    lora:  {r: 16}      # optional: the reference is the base with its adapters disabled

Every ``num_iterations`` optimisation steps, each micro-batch's ``batch_size / num_generations`` prompts
get ``num_generations`` completions each from the policy as it is, sampled by lamina's batched engine
(``lamina.generate.engine.generate_ids``; ``temperature``, ``top_p``, ``top_k``, ``max_completion_length``;
the end-of-turn token kept in the completion, as TRL; with ``compile_generation`` from a merged copy
through the compiled decode step, ``GenerationBatches.generating_model``). Each reward is a Python function with TRL's
signature ``f(prompts, completions, completion_ids, **columns) -> list[float | None]`` (``module:function``
or ``path/to/file.py:function``; completions are strings, or ``[{"role": "assistant", "content": ...}]``
for conversational prompts; None: not applicable) or a reward model folder (``finetune --task reward``),
which scores the rendering of prompt + completion it was trained on. The rewards, weighted by
``reward_weights``, give group-normalised advantages (``scale_rewards``), and the loss is ``grpo_loss``
with ``beta``, ``epsilon`` and ``loss_type`` (TRL's default ``dapo``: the mean over every completion
token of the accumulated batch). With ``num_iterations`` > 1 the ratio is to the generating policy's
log-probs, computed once per generation batch; with ``beta`` > 0 the reference is a frozen copy of the
start (LoRA: the base, adapters disabled).

Logged per step in ``metrics.jsonl`` (TRL's names): ``reward``, ``reward_std``, ``rewards/NAME/mean`` and
``/std`` per reward, ``completions/mean_length``, ``completions/clipped_ratio`` (stopped by the length
limit), ``kl`` (with beta > 0) and ``clip_ratio``, in the trainer's record of the step (with ``loss``; a
completion no reward applies to is left out of ``reward`` and ``reward_std``, as TRL), over every completion
of the step (under torchrun each process generates for its own prompts, and the stats gather them all);
the completions of the first ``samples`` prompts of each generation go to ``samples.jsonl`` with their
rewards and advantages (under torchrun, the first process's); ``rewards.png`` plots the
rewards against step at the end. A resumed run regenerates the
batch it stops in (exact when it stops on a generation boundary, as with ``num_iterations`` 1).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from lamina.data.rows import pad_id
from lamina.errors import ConfigError, DataError, LaminaError
from lamina.train.precision import run_autocast

ScaleRewards = Literal["group", "batch", "none"]
GrpoLoss = Literal["grpo", "bnpo", "dr_grpo", "dapo"]


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
    ``max_completion_length``); ``dapo`` as ``bnpo`` within one batch (TRL's dapo divides by the tokens of the
    whole accumulated batch: the ``--task grpo`` objective counts tokens so the trainer does that).
    Returns (loss, {"kl", "clip_ratio"}).
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
    elif loss_type in ("bnpo", "dapo"):
        loss = (per_token * m).sum() / m.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ConfigError("loss_type dr_grpo needs max_completion_length")
        loss = (per_token * m).sum() / (per_token.shape[0] * max_completion_length)
    else:
        raise ConfigError(f"loss_type={loss_type!r} is not one of grpo, bnpo, dr_grpo, dapo")
    return loss, metrics


# ---------------------------------------------------------------------------------------------------- config


@dataclass
class GrpoConfig:
    """The ``grpo`` section of ``lamina finetune --task grpo`` (names as TRL's ``GRPOConfig``)."""

    # the rewards: module:function or path/to/file.py:function (TRL's reward-function signature), or a
    # reward model folder (trained with --task reward)
    reward_funcs: list[str] = field(default_factory=list)
    reward_weights: list[float] | None = None  # one weight per reward (None: all 1)
    num_generations: int = 8  # completions per prompt (the group), >= 2; divides train.batch_size
    # the longest completion, in tokens, > 0; prompt + completion must fit task.max_seq_len
    max_completion_length: int = 64
    temperature: float = 1.0  # sampling temperature of the completions, > 0
    top_p: float = 1.0  # nucleus sampling of the completions, in (0, 1]
    top_k: int = 0  # keep the k most likely tokens when sampling (0: off)
    beta: float = 0.0  # weight of the KL penalty to the reference (0: no reference model), >= 0
    epsilon: float = 0.2  # the ratio is clipped to [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = None  # the upper clip (None: epsilon)
    num_iterations: int = 1  # optimisation steps per generation batch (PPO's mu), >= 1
    # the loss's reduction: dapo (mean over the accumulated batch's tokens), bnpo (over a micro-batch's
    # tokens), grpo (per sequence, then over sequences), dr_grpo (sum / (B x max_completion_length))
    loss_type: GrpoLoss = "dapo"
    scale_rewards: ScaleRewards = "group"  # advantages divided by the std of the group, the batch, or none
    prompt_field: str = "prompt"  # the JSONL key holding each prompt (a string or a list of messages)
    samples: int = 1  # prompts per generation batch whose completions go to samples.jsonl (0: none)
    chat_template: str | None = None  # a Jinja chat template file (or text); None: the tokenizer's
    # generate from a merged copy of the policy (LoRA merged in, refreshed before each generation: one more
    # copy of the weights, plus their oneDNN-packed copies in float32) through lamina.model.aot's compiled
    # decode step (as --compile): compiled once per architecture into compile_cache_dir() (about a minute),
    # then loaded in a second; an int8/int4 LoRA base or a model the step does not cover generates eagerly
    compile_generation: bool = False

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise ConfigError(
                f"grpo.num_generations={self.num_generations} must be >= 2 (a group to compare)"
            )
        if self.max_completion_length < 1:
            raise ConfigError(f"grpo.max_completion_length={self.max_completion_length} must be positive")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError("grpo.temperature must be > 0, grpo.top_p in (0, 1] and grpo.top_k >= 0")
        if self.beta < 0 or self.epsilon < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise ConfigError("grpo.beta, grpo.epsilon and grpo.epsilon_high must be >= 0")
        if self.num_iterations < 1:
            raise ConfigError(f"grpo.num_iterations={self.num_iterations} must be >= 1")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(
                f"grpo.reward_weights has {len(self.reward_weights)} weights for {len(self.reward_funcs)} "
                "reward_funcs: give one weight per reward"
            )
        if self.samples < 0:
            raise ConfigError(f"grpo.samples={self.samples} must be >= 0")


# --------------------------------------------------------------------------------------------------- rewards

RewardFunc = Callable[..., Sequence[Any]]


class RewardError(LaminaError):
    """A reward function failed, or returned something that is not one number (or None) per completion."""


def load_reward(spec: str, device: torch.device | str = "cpu") -> RewardFunc:
    """The reward ``spec`` names: ``module:function``, ``path/to/file.py:function`` or a reward model folder
    (a model with a one-output regress head: ``finetune --task reward``). Raises ``ConfigError`` naming the
    spec and the fix when it does not import, has no such function, or is not a reward model."""
    module, sep, name = spec.rpartition(":")
    if sep and name.isidentifier() and not Path(spec).is_dir():
        try:
            if module.endswith(".py"):
                if not Path(module).is_file():
                    raise FileNotFoundError(f"no file {module}")
                loaded = importlib.util.spec_from_file_location(Path(module).stem, module)
                assert loaded is not None and loaded.loader is not None
                mod = importlib.util.module_from_spec(loaded)
                loaded.loader.exec_module(mod)
            else:
                mod = importlib.import_module(module)
        except Exception as e:  # any error while importing the user's module
            raise ConfigError(
                f"reward function {spec!r}: {module!r} does not import ({type(e).__name__}: {e}); fix: give "
                "module:function with the module on PYTHONPATH, or path/to/file.py:function"
            ) from e
        fn = getattr(mod, name, None)
        if not callable(fn):
            raise ConfigError(
                f"reward function {spec!r}: {module!r} has no function {name!r}; fix: name a function "
                "f(prompts, completions, **kwargs) -> list[float] defined there"
            )
        return fn
    return reward_model_func(spec, device)


def reward_model_func(folder: str, device: torch.device | str = "cpu") -> RewardFunc:
    """A reward function scoring each prompt + completion with the reward model in ``folder`` (its scalar
    output on the rendering it was trained on: ``lamina.train.preference.reward_scores``)."""
    from lamina.train.preference import load_reward_model, reward_scores

    try:
        lm = load_reward_model(folder, device)
    except LaminaError as e:
        raise ConfigError(
            f"reward {folder!r} is neither module:function nor path.py:function, and not a model ({e}); "
            "fix: give a reward function or a folder saved by `lamina finetune --task reward`"
        ) from e
    try:
        reward_scores(lm, [], [])  # checks that it is a reward model
    except ConfigError as e:
        raise ConfigError(f"reward model {folder!r}: {e}") from None

    def score(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        return reward_scores(lm, prompts, completions)

    return score


def reward_name(spec: str) -> str:
    """A reward's name in the logs: the function's name, or the model folder's."""
    _, sep, name = spec.rpartition(":")
    if sep and name.isidentifier() and not Path(spec).is_dir():
        return name
    p = Path(spec.rstrip("/"))
    return p.parent.name if p.name in ("last", "best") and p.parent.name else p.name


def call_rewards(
    funcs: Sequence[tuple[str, RewardFunc]], prompts: list[Any], completions: list[Any], **kwargs: Any
) -> Tensor:
    """Every reward of every completion, (N, F) float32 (None -> NaN: not applicable). Raises
    ``RewardError`` naming the function when it raises, returns the wrong number of values, a value that
    is not a number, or NaN."""
    n = len(completions)
    cols = []
    for spec, fn in funcs:
        try:
            returned = fn(prompts=prompts, completions=completions, **kwargs)
        except LaminaError:
            raise
        except Exception as e:  # the user's function failed
            raise RewardError(
                f"reward function {spec!r} raised {type(e).__name__}: {e}; fix the function (it gets "
                "prompts, completions, completion_ids and the data's other keys as keyword arguments)"
            ) from e
        values: list[Any] | None = None
        if not isinstance(returned, str | bytes | dict):
            with contextlib.suppress(TypeError):
                values = list(returned)
        if values is None or len(values) != n:
            got = "not a list" if values is None else f"{len(values)} values"
            raise RewardError(
                f"reward function {spec!r} returned {got} for {n} completions; fix: return one float (or None) "
                "per completion, in order"
            )
        col = []
        for i, v in enumerate(values):
            if v is None:
                col.append(math.nan)
                continue
            if isinstance(v, torch.Tensor | np.generic) and v.ndim == 0:
                v = v.item()
            if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
                raise RewardError(
                    f"reward function {spec!r} returned {v!r} for completion {i} (of {n}); fix: return a "
                    "number for each completion (None where it does not apply)"
                )
            col.append(float(v))
        cols.append(col)
    return torch.tensor(cols, dtype=torch.float32).T.reshape(n, len(funcs))


# ------------------------------------------------------------------------------------------ generation batches


def token_logps(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Per-token log-probs (B, T-1) in fp32 of ``input_ids[:, 1:]`` under ``model`` (logits (B, T, V))."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = logits[:, :-1].float()
    tok = logits.gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    return tok - torch.logsumexp(logits, dim=-1)


def completion_text(tokenizer: Any, prompt: Sequence[int], tokens: Sequence[int]) -> str:
    """The text of a completion's ``tokens`` as the engine streams it (special tokens skipped, the
    prompt's last 6 ids as context so that a leading space is kept), decoded once."""
    context = list(prompt)[-6:]
    before = tokenizer.decode(context, skip_special_tokens=True)
    return tokenizer.decode(context + list(tokens), skip_special_tokens=True)[len(before) :]


class GenerationBatches:
    """The trainer's ``BatchSource`` for GRPO: micro-batch ``i`` of step ``s = i // grad_accum`` is the
    generation of round ``s // num_iterations`` (made the first time it is asked for, with the policy as it
    is then, and kept for the round's other iterations): ``batch_size / num_generations`` prompts (shuffled
    per epoch with the seed), ``num_generations`` seeded samples each, scored and turned into
    ``input_ids``, ``attention_mask``, ``completion_mask`` (B, T), ``advantages`` (B,), ``old_logps`` and
    ``ref_logps`` (B, T-1) when needed, and ``step``/``micro`` (for the objective's log record)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        prompts: list[Any],
        prompt_ids: list[list[int]],
        extra: list[dict[str, Any]],
        cfg: GrpoConfig,
        rewards: Sequence[tuple[str, RewardFunc]],
        ref: Callable[[dict[str, Tensor]], Tensor] | None,
        batch_size: int,
        grad_accum: int,
        seed: int,
        out_dir: Path,
        eos_ids: list[int],
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % cfg.num_generations:
            raise ConfigError(
                f"train.batch_size={batch_size} completions do not split into groups of grpo.num_generations="
                f"{cfg.num_generations}: make batch_size a multiple of num_generations"
            )
        self.model, self.tok, self.cfg, self.rewards, self.ref = model, tokenizer, cfg, list(rewards), ref
        self.prompts, self.prompt_ids, self.extra = prompts, prompt_ids, extra
        self.per_batch = batch_size // cfg.num_generations
        if len(prompts) < self.per_batch:
            raise DataError(f"{len(prompts)} prompts, fewer than the {self.per_batch} a batch takes: lower "
                            "train.batch_size or add prompts")  # fmt: skip
        self.grad_accum, self.seed, self.out, self.eos = grad_accum, seed, out_dir, eos_ids
        self.rank, self.world_size, self.is_main = rank, world_size, rank == 0
        self.generations_per_epoch = max(1, len(prompts) // self.per_batch)
        self.weights = torch.tensor(cfg.reward_weights or [1.0] * len(self.rewards), dtype=torch.float32)
        self.pad = pad_id(tokenizer, eos_ids)
        self._cache: dict[tuple[int, int], dict[str, Tensor]] = {}
        self._round_raw: dict[int, list[dict[str, Tensor]]] = {}  # per round: each micro-batch's raw values
        self._eager_generation = not cfg.compile_generation  # True also once the compiled step is refused
        self._copy: Any = None  # the MergedCopy that generates with compile_generation (made at the first)
        self._packed: Any = None  # its StepLinears' prepacked weights (PackedBinding)

    def batch(self, index: int) -> dict[str, Tensor]:
        """Micro-batch ``index`` (generated when its round first asks for it)."""
        step, micro = divmod(index, self.grad_accum)
        key = (step // self.cfg.num_iterations, micro)
        if key not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k[0] == key[0]}
            self._cache[key] = self._generate(key[0] * self.grad_accum + micro, step)
        return {**self._cache[key], "step": torch.tensor(step + 1), "micro": torch.tensor(micro)}

    def _generate(self, g: int, step: int) -> dict[str, Tensor]:
        from lamina.config import GenerationConfig

        cfg, G = self.cfg, self.cfg.num_generations
        g = g * self.world_size + self.rank  # each process its own prompts (and seeds)
        epoch, k = divmod(g, self.generations_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))
        rows = order[k * self.per_batch : (k + 1) * self.per_batch].tolist()
        gens = [
            GenerationConfig(n=G, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                             max_new_tokens=cfg.max_completion_length, seed=(self.seed * 1_000_003 + g * 1009 + j) % 2**31)
            for j in range(len(rows))
        ]  # fmt: skip
        seqs = self.generate([self.prompt_ids[r] for r in rows], gens)
        comp_ids = [s.tokens + ([s.stop_token] if s.stop_token is not None else []) for s in seqs]
        texts = [completion_text(self.tok, self.prompt_ids[r], s.tokens) for r, s in zip(
            [r for r in rows for _ in range(G)], seqs, strict=True)]  # fmt: skip
        prompts = [self.prompts[r] for r in rows for _ in range(G)]
        completions: list[Any] = [
            [{"role": "assistant", "content": t}] if not isinstance(p, str) else t
            for p, t in zip(prompts, texts, strict=True)
        ]
        columns: dict[str, list[Any]] = {}
        for key in {k for r in rows for k in self.extra[r]}:
            columns[key] = [self.extra[r].get(key) for r in rows for _ in range(G)]
        rewards = call_rewards(self.rewards, prompts, completions, completion_ids=comp_ids, **columns)
        adv = group_advantages(rewards, G, cfg.scale_rewards, self.weights)
        total = reward_totals(rewards, self.weights)
        # the batch: prompt + completion per row, right-padded
        plens = [len(self.prompt_ids[r]) for r in rows for _ in range(G)]
        full = [
            self.prompt_ids[r] + c for r, c in zip([r for r in rows for _ in range(G)], comp_ids, strict=True)
        ]
        T = max(len(f) for f in full)
        x = torch.full((len(full), T), self.pad, dtype=torch.long)
        att = torch.zeros_like(x)
        comp = torch.zeros_like(x)
        for b, (ids, pl) in enumerate(zip(full, plens, strict=True)):
            x[b, : len(ids)] = torch.tensor(ids)
            att[b, : len(ids)] = 1
            comp[b, pl : len(ids)] = 1
        batch = {"input_ids": x, "attention_mask": att, "completion_mask": comp, "advantages": adv}
        model = self.model
        dev = model.tok_emb.weight.device
        on_dev = {k: v.to(dev) for k, v in batch.items()}
        # in the run's precision (bf16 autocast where auto picks it), as the objective computes the
        # policy's: at step 1 the ratio is then exactly 1 and the KL to an identical reference 0
        with run_autocast():
            if cfg.num_iterations > 1:
                with torch.no_grad():
                    batch["old_logps"] = token_logps(model, on_dev).cpu()
            if cfg.beta != 0.0 and self.ref is not None:
                batch["ref_logps"] = self.ref(on_dev).cpu()
        raw = {"total": total, "rewards": rewards,
               "lengths": torch.tensor([len(c) for c in comp_ids], dtype=torch.float32),
               "clipped": torch.tensor([s.finish_reason == "length" for s in seqs], dtype=torch.float32)}  # fmt: skip
        rnd = step // cfg.num_iterations
        self._round_raw = {r: v for r, v in self._round_raw.items() if r >= rnd - 1}
        self._round_raw.setdefault(rnd, []).append(raw)
        if self.is_main and cfg.samples:
            with open(self.out / "samples.jsonl", "a", encoding="utf-8") as fh:
                for j in range(min(cfg.samples, len(rows)) * G):
                    fh.write(json.dumps({"step": step + 1, "prompt": prompts[j], "completion": texts[j],
                                         "reward": _number(total[j]), "advantage": float(adv[j])}) + "\n")  # fmt: skip
        return batch

    def generate(self, prompt_ids: list[list[int]], configs: list[Any]) -> list[Any]:
        """The completions (``lamina.generate.engine.generate_ids``'s sequences, prompt by prompt) of
        ``prompt_ids`` with ``configs`` (one ``GenerationConfig`` per prompt), sampled from the policy as it
        is now: through ``generating_model()`` in eval mode without autograd (the policy's mode is
        restored). No tokenizer goes to the engine (GRPO has no stop strings): ``completion_text`` decodes
        each completion once, after."""
        from lamina.generate.engine import generate_ids

        was_training = self.model.training
        self.model.eval()
        try:
            model = self.generating_model()
            with torch.no_grad():
                return generate_ids(model, prompt_ids, configs, self.eos)
        finally:
            self.model.train(was_training)

    def generating_model(self) -> Any:
        """The model that generates: the policy, or with ``grpo.compile_generation`` its ``MergedCopy``
        (adapters merged, projections fused; refreshed here from the policy's current weights; float32
        linears as ``aot.StepLinear`` s, their prepacked weights bound to the step here) with
        ``lamina.model.aot``'s compiled decode step attached (at the first call, and again if it was
        dropped); a policy the copy or the step does not cover (off the CPU, an int8/int4 base under LoRA,
        a model ``aot.supported`` refuses) or a failed compile generates eagerly from the policy (one line
        on stderr)."""
        if self._eager_generation:
            return self.model
        if self._copy is None:
            from lamina.model.lora import MergedCopy

            device = self.model.tok_emb.weight.device
            if device.type != "cpu":  # no copy made for nothing: the compiled step is the CPU's
                return self._generate_eagerly(f"device {device} (CPU only)")
            try:
                self._copy = MergedCopy(self.model, fuse=True)
            except ConfigError as e:
                return self._generate_eagerly(str(e))
            from lamina.model.aot import PackedBinding, step_linears

            self._packed = PackedBinding(step_linears(self._copy.model))
        try:
            model = self._copy.refresh()
        except ConfigError as e:  # an adapter swapped in with an int8/int4 base, a module taken out
            return self._generate_eagerly(str(e))
        self.attach_decode_step(model)
        if self._eager_generation:
            return self.model
        if self._packed.linears:
            from lamina.model import aot

            self._packed.bind(aot.attached_step(model))
        return model

    def attach_decode_step(self, model: Any = None) -> None:
        """With ``grpo.compile_generation``: ``model``'s (default: the generating model's) compiled decode
        step (``lamina.model.aot``, which ``model(ids, cache=cache)`` runs for one token per row in eval
        mode without autograd: every decoding step of the generation, never training's forwards), attached
        at the first generation and again if ``.to()`` dropped it; a model it does not cover, or a failed
        compile, decodes eagerly (one line on stderr)."""
        from lamina.model import aot

        if model is None:
            model = self.generating_model()
        if self._eager_generation or aot.attached_step(model) is not None:
            return
        why = aot.supported(model)
        if why is None:
            from lamina.checkpoint.load import attach_decode_step_or_warn

            attach_decode_step_or_warn(model)
            why = None if aot.attached_step(model) is not None else "its compile failed"
        if why is not None:
            self._generate_eagerly(why)

    def _generate_eagerly(self, why: str) -> Any:
        self._eager_generation, self._copy = True, None
        print(f"lamina: grpo.compile_generation: generating eagerly ({why})", file=sys.stderr)
        return self.model

    def round_values(self, step: int) -> dict[str, Tensor]:
        """Step ``step``'s generation, its micro-batches together: ``total`` (N,), ``rewards`` (N, F),
        ``lengths`` and ``clipped`` (N,) (empty before any generation)."""
        micro = self._round_raw.get((step - 1) // self.cfg.num_iterations, [])
        return {k: torch.cat([m[k] for m in micro]) for k in (micro[0] if micro else {})}

    def stats(self, raw: dict[str, Tensor]) -> dict[str, float]:
        """The logged values of ``raw`` (``round_values``, or every process's gathered): TRL's ``reward``,
        ``reward_std``, ``rewards/NAME/mean`` and ``/std``, ``completions/mean_length`` and
        ``completions/clipped_ratio``, over all its completions."""
        if not raw:
            return {}
        total, rewards = raw["total"], raw["rewards"]
        stats = {"reward": float(torch.nanmean(total)), "reward_std": float(_std(total)) if len(total) > 1 else 0.0,
                 "completions/mean_length": float(raw["lengths"].mean()),
                 "completions/clipped_ratio": float(raw["clipped"].mean())}  # fmt: skip
        for f, (spec, _) in enumerate(self.rewards):
            col = rewards[:, f]
            stats[f"rewards/{reward_name(spec)}/mean"] = float(torch.nanmean(col))
            stats[f"rewards/{reward_name(spec)}/std"] = float(_std(col)) if len(col) > 1 else 0.0
        return stats


def reward_totals(rewards: Tensor, weights: Tensor) -> Tensor:
    """Each completion's weighted reward (N,) from ``rewards`` (N, F): a NaN (None: not applicable) counts
    as 0 (``nansum``), and a completion no reward applies to is NaN, left out of the logged mean and std
    as TRL 1.16's ``_generate_and_score_completions`` does."""
    total = (rewards * weights.to(rewards)).nansum(1)
    total[torch.isnan(rewards).all(1)] = torch.nan
    return total


def _number(x: Tensor) -> float | None:
    """A JSON-safe float (None for NaN)."""
    v = float(x)
    return None if math.isnan(v) else v


class GrpoObjective:
    """The trainer's objective: ``grpo_loss`` of the batch's completions, counted per completion token
    (dapo: the trainer's token-weighted accumulation makes it TRL's mean over the accumulated batch's
    tokens) or once per micro-batch (grpo, bnpo, dr_grpo: the mean of the micro-batches' losses, as TRL).
    ``step_metrics()`` (called by the trainer when it logs a step) gives the last full step's generation
    stats, KL and clip ratio, so they go to metrics.jsonl through the trainer's ``MetricsLog``."""

    def __init__(self, cfg: GrpoConfig, source: GenerationBatches) -> None:
        self.cfg, self.source = cfg, source
        self._acc: dict[str, list[float]] = {}
        self._last: tuple[dict[str, Tensor], dict[str, float]] = ({}, {})

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        cfg = self.cfg
        logps = token_logps(model, batch)
        mask = batch["completion_mask"][:, 1:]
        value, m = grpo_loss(
            logps, batch["advantages"], mask, batch.get("old_logps"), batch.get("ref_logps"), cfg.beta,
            cfg.epsilon, cfg.epsilon_high, cfg.loss_type, cfg.max_completion_length,
        )  # fmt: skip
        for k, v in m.items():
            self._acc.setdefault(k, []).append(v)
        if int(batch["micro"]) == self.source.grad_accum - 1:
            values = {k: float(np.mean(v)) for k, v in self._acc.items()}
            self._last = (self.source.round_values(int(batch["step"])), values)
            self._acc.clear()
        return value, int(mask.sum()) if cfg.loss_type == "dapo" else 1

    def step_metrics(self) -> dict[str, float]:
        """The record of the last step whose every micro-batch was computed: its generation's stats over
        every completion of the step (under torchrun, every process's: gathered, as TRL's), and the mean
        KL and clip ratio (over micro-batches and processes). Called on every process at the same steps."""
        raw, values = self._last
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            if world > 1:
                nccl = torch.distributed.get_backend() == "nccl"
                dev = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
                gathered = {}
                for k in sorted(raw):
                    parts = [torch.empty_like(raw[k], device=dev) for _ in range(world)]
                    torch.distributed.all_gather(parts, raw[k].to(dev).contiguous())
                    gathered[k] = torch.cat(parts).cpu()
                raw = gathered
                keys = sorted(values)
                v = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=dev)
                torch.distributed.all_reduce(v)
                values = {k: float(x) / world for k, x in zip(keys, v.tolist(), strict=True)}
        return {**self.source.stats(raw), **values}


def grpo_objective(cfg: GrpoConfig, source: GenerationBatches) -> GrpoObjective:
    """The trainer's objective for ``source``'s batches (``GrpoObjective``)."""
    return GrpoObjective(cfg, source)


def _reference(model: Any, lora: bool) -> Callable[[dict[str, Tensor]], Tensor]:
    """The reference's per-token log-probs (B, T-1) without gradients: the model with its adapters
    disabled (LoRA), else a frozen copy of the model as it is now."""
    if lora:
        from lamina.model.lora import disable_adapters

        def ref_lora(batch: dict[str, Tensor]) -> Tensor:
            with torch.no_grad(), disable_adapters(model):
                return token_logps(model, batch)

        return ref_lora
    frozen = copy.deepcopy(model).eval().requires_grad_(False)

    def ref_copy(batch: dict[str, Tensor]) -> Tensor:
        dev = batch["input_ids"].device
        if next(frozen.parameters()).device != dev:
            frozen.to(dev)
        with torch.no_grad():
            return token_logps(frozen, batch)

    return ref_copy


def finetune_grpo(run: Any, resume: bool = False, overwrite: bool = False) -> tuple[Any, Any, Any]:
    """Train ``run``'s policy with GRPO on its prompts (``run.task.task == "grpo"``); see the module
    docstring. Raises ``ConfigError`` (no data or reward, a reward that does not import, not a decoder LM,
    a batch size that is not a multiple of num_generations) and ``DataError`` (no usable prompt) before
    training starts, ``RewardError`` from a reward function during training (checkpoints saved before it
    stay)."""
    from lamina.checkpoint.eos import eos_token_ids
    from lamina.data.chat import Problem, _Skip, read_template
    from lamina.data.preference import encode_prompt, read_prompts
    from lamina.train.finetune import base_model
    from lamina.train.freeze import apply_run_lora
    from lamina.train.trainer import train

    cfg, t, tcfg = run.grpo, run.task, run.train
    if not t.data:
        raise ConfigError('task.data is not set: pass a JSONL file of prompts ({"prompt": ...} per line)')
    if not cfg.reward_funcs:
        raise ConfigError(
            "grpo.reward_funcs is empty: give module:function, path.py:function or a reward model folder"
        )
    rewards = [(spec, load_reward(spec)) for spec in cfg.reward_funcs]
    model, tokenizer = base_model(run)
    if model.config.arch != "decoder" or model.config.head != "lm":
        raise ConfigError(f"task=grpo trains a decoder's language-model head; this model is "
                          f"arch={model.config.arch}, head={model.config.head}")  # fmt: skip
    template = read_template(cfg.chat_template)
    data = read_prompts(t.data, cfg.prompt_field)
    max_prompt = min(t.max_seq_len, model.config.max_seq_len) - cfg.max_completion_length
    prompts, ids, extra, problems = [], [], [], list(data.problems)
    for p, e, where in zip(data.prompts, data.extra, data.where, strict=True):
        try:
            enc = encode_prompt(tokenizer, p, template)
        except _Skip as err:
            problems.append(Problem(where, str(err), "skipped"))
            continue
        if len(enc) > max_prompt:
            problems.append(Problem(where, f"{len(enc)} prompt tokens + grpo.max_completion_length "
                                    f"{cfg.max_completion_length} > task.max_seq_len", "skipped"))  # fmt: skip
            continue
        prompts.append(p)
        ids.append(enc)
        extra.append(e)
    for pr in problems[:20]:
        print(f"lamina: prompts: {pr}", file=sys.stderr)
    if not prompts:
        first = f"; first: {problems[0]}" if problems else ""
        raise DataError(f"no usable prompt in {t.data}{first}: fix the data, or raise task.max_seq_len")
    notes = apply_run_lora(run.lora, model, tcfg.seed)
    if problems:
        notes.append(f"prompts: {len(prompts)} used, {len(problems)} skipped")
    ref = _reference(model, run.lora is not None) if cfg.beta != 0.0 else None
    out = Path(tcfg.out_dir)
    from lamina.train.trainer import check_out_dir, clear_run

    check_out_dir(out, resume=resume, overwrite=overwrite)
    if overwrite:
        clear_run(out)
        overwrite = False
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        (out / "samples.jsonl").unlink(missing_ok=True)
    else:
        _trim_samples(out)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun's
    source = GenerationBatches(
        model, tokenizer, prompts, ids, extra, cfg, rewards, ref, tcfg.batch_size, tcfg.grad_accum_steps,
        tcfg.seed, out, eos_token_ids(tokenizer=tokenizer), rank, world,
    )  # fmt: skip
    rounds = max(1, source.generations_per_epoch // (tcfg.grad_accum_steps * world))
    steps = tcfg.max_steps or max(1, round((tcfg.epochs or 1) * rounds * cfg.num_iterations))
    mean_prompt = sum(map(len, ids)) / len(ids)
    tokens = max(1, round(tcfg.batch_size * (mean_prompt + cfg.max_completion_length)))
    stats = {"prompts": float(len(prompts)), "prompts_skipped": float(len(problems))}
    result = train(
        model, tcfg, source, grpo_objective(cfg, source), None, tokens_per_batch=tokens, total_steps=steps,
        tokenizer=tokenizer, run_config=run.to_dict(), resume=resume, overwrite=overwrite, perplexity=False,
        data_stats=stats, notes=notes,
    )  # fmt: skip
    if rank == 0:
        plot_rewards(out / "metrics.jsonl", out / "rewards.png")
    return model, tokenizer, result


def _trim_samples(out: Path) -> None:
    """On resume, drop the samples of steps after the newest checkpoint (they are generated again), as
    the trainer's MetricsLog trims metrics.jsonl."""
    from lamina.train.trainer import latest_checkpoint

    path, last = out / "samples.jsonl", latest_checkpoint(out)
    if not path.is_file() or last is None:
        return
    step = int(last.name.split("-")[-1])  # checkpoints/step-NNNNNNNN
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]  # fmt: skip
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    tmp.replace(path)


def plot_rewards(metrics_path: Path, out_png: Path) -> Path | None:
    """A PNG of the mean reward (with +- its std) and of each reward function's mean against step, from a
    GRPO run's metrics.jsonl; None without matplotlib or without reward records."""
    from lamina.train.metrics import MetricsLog

    rows = [r for r in MetricsLog.read(metrics_path) if "reward" in r] if metrics_path.exists() else []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    mean = np.array([r["reward"] for r in rows])
    std = np.array([r.get("reward_std", 0.0) for r in rows])
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(steps, mean, label="reward (weighted sum)", lw=1.5)
    ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    for key in sorted({k for r in rows for k in r if k.startswith("rewards/") and k.endswith("/mean")}):
        ax.plot(steps, [r.get(key, np.nan) for r in rows], label=key, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
