"""Preference tuning on the one trainer: reward models (``--task reward``) and the DPO family
(``--task dpo``) from prompt/chosen/rejected pairs (``lamina.data.preference``)::

    task:  {task: dpo, data: prefs.jsonl, max_seq_len: 512}
    dpo:   {loss: sigmoid, beta: 0.1, label_smoothing: 0.0}    # ipo | hinge | robust | simpo
    init:  smollm2
    lora:  {r: 16, target_modules: all-linear}   # optional: the reference is the base, adapters disabled

DPO (Rafailov et al. 2023, arXiv:2305.18290) trains the policy pi on ``log pi(y|x)`` summed over the
completion's tokens against a frozen reference: ``d = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log
ref(y_r))`` and, with TRL's names and formulas (``trl.DPOTrainer``, TRL 1.16, checked in
tests/train/test_dpo.py):

- ``sigmoid``: ``-(1 - e) log s(beta d) - e log s(-beta d)`` (``e`` = ``label_smoothing``, conservative DPO;
  e = 0 is DPO and TRL 1.16's ``sigmoid``);
- ``ipo`` (Azar et al. 2023): ``((d_c / n_c - d_r / n_r) - 1 / (2 beta))^2``, each log-ratio averaged
  over its completion's ``n`` tokens (as TRL, with the IPO authors);
- ``hinge`` (SLiC): ``relu(1 - beta d)``;
- ``robust`` (Chowdhury et al. 2024): ``((1 - e) * -log s(beta d) + e * log s(-beta d)) / (1 - 2e)``;
- ``simpo`` (Meng et al. 2024, arXiv:2405.14734): reference-free, length-normalised:
  ``z = beta (log pi(y_c) / n_c - log pi(y_r) / n_r) - gamma``, loss ``-(1 - e) log s(z) - e log s(-z)``.

The reference is a frozen copy of the starting model, or with LoRA the model itself with its adapters
disabled (``lamina.model.lora.disable_adapters``; no second copy). Its log-probabilities are computed
without gradients once per batch, or once for the whole data as training starts with ``dpo.precompute_ref``
(then the copy is dropped); either way in the trainer's precision (``lamina.train.precision.run_precision``).
Evaluations report TRL's metrics on the held-out pairs: ``rewards/chosen``, ``rewards/rejected`` (``beta``
x the policy/reference log-ratio; SimPO: ``beta`` x the mean log-prob), ``rewards/accuracies`` (share of
pairs with chosen > rejected) and ``rewards/margins``.

A reward model is the model with a scalar head (``head=regress``, one output pooled on the last real
token, as transformers' ``*ForSequenceClassification``; with a ``lora`` section, LoRA adapters train and
the head trains in full, saved beside them as PEFT's ``modules_to_save``) trained with the Bradley-Terry loss
``-log s(r_c - r_r - margin)`` (``margin`` from the data's ``"margin"`` key; TRL's ``RewardTrainer``);
each evaluation reports the held-out pairwise ``accuracy`` (r_c > r_r) and mean ``margin``. The saved
model scores completions (``reward_scores``; ``score_completions`` for a JSONL file: ``lamina score``) on
the rendering it was trained on.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lamina.data.preference import EncodedPairs, Pair, PreferenceBatches, encode_preferences, read_preferences
from lamina.data.rows import iter_jsonl, pad_id
from lamina.errors import ConfigError, DataError
from lamina.model.transformer import Transformer
from lamina.tokenizer import Tokenizer
from lamina.train.freeze import apply_run_lora
from lamina.train.objectives import Batch, Objective
from lamina.train.precision import run_autocast, run_device
from lamina.train.trainer import TrainResult, train

if TYPE_CHECKING:
    from lamina.checkpoint.load import LoadedModel

DpoLoss = Literal["sigmoid", "ipo", "hinge", "robust", "simpo"]
REWARD_HEAD = "task_head.classifier"  # the reward model's scalar head (transformers' `score`)


@dataclass
class DpoConfig:
    """The ``dpo`` section of ``lamina finetune --task dpo`` (names as TRL's ``DPOConfig``)."""

    # sigmoid (DPO), ipo, hinge, robust, or simpo (reference-free, length-normalised)
    loss: DpoLoss = "sigmoid"
    beta: float = 0.1  # the strength of the preference (inverse KL weight; IPO's tau), > 0
    # share of pairs assumed flipped, in [0, 0.5): conservative DPO (sigmoid, simpo), robust DPO (robust)
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5  # simpo: the target reward margin gamma subtracted inside the sigmoid
    precompute_ref: bool = False  # reference log-probs computed once for every pair before training
    chat_template: str | None = None  # a Jinja chat template file (or text); None: the tokenizer's

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta={self.beta} must be positive")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.label_smoothing and self.loss in ("ipo", "hinge"):
            raise ConfigError(f"dpo.label_smoothing applies to sigmoid, robust and simpo, not {self.loss}")


@dataclass
class RewardConfig:
    """The ``reward`` section of ``lamina finetune --task reward``."""

    use_margin: bool = True  # subtract each pair's "margin" (data key; 0 when absent) inside the loss
    # add coefficient x mean((r_c + r_r)^2), keeping rewards centred (TRL's center_rewards_coefficient); None: off
    center_rewards_coefficient: float | None = None
    chat_template: str | None = None  # a Jinja chat template file (or text); None: the tokenizer's


# ------------------------------------------------------------------------------------------------- DPO maths


def sequence_logps(logits: Tensor, input_ids: Tensor, completion_mask: Tensor) -> Tensor:
    """Sum of the log-probabilities of the completion tokens of each row: logits (R, T, V) predicting
    ``input_ids`` (R, T) one position on, ``completion_mask`` (R, T) marking the counted tokens -> (R,) in
    fp32."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tok = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (R, T-1)
    return (tok * completion_mask[:, 1:]).sum(1)


def dpo_loss(
    logps: Tensor,
    ref_logps: Tensor | None,
    lengths: Tensor,
    cfg: DpoConfig,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The DPO-family loss per pair and TRL's reward metrics.

    ``logps`` / ``ref_logps`` (2B,): summed completion log-probs of policy / reference, chosen rows first
    (``ref_logps`` unused by SimPO, may be None then); ``lengths`` (2B,) completion token counts.
    Returns (loss per pair (B,), {"chosen", "rejected"} rewards (B,), detached).
    """
    c, r = logps.chunk(2)
    nc, nr = lengths.float().clamp(min=1).chunk(2)
    beta, e = cfg.beta, cfg.label_smoothing
    if cfg.loss == "simpo":
        rc, rr = beta * c / nc, beta * r / nr
        z = rc - rr - cfg.simpo_gamma
        loss = -(1 - e) * F.logsigmoid(z) - e * F.logsigmoid(-z)
        return loss, {"chosen": rc.detach(), "rejected": rr.detach()}
    assert ref_logps is not None
    rc_ref, rr_ref = ref_logps.chunk(2)
    lc, lr = c - rc_ref, r - rr_ref  # log-ratios policy / reference
    d = lc - lr
    if cfg.loss == "sigmoid":
        loss = -(1 - e) * F.logsigmoid(beta * d) - e * F.logsigmoid(-beta * d)
    elif cfg.loss == "ipo":
        loss = (lc / nc - lr / nr - 1 / (2 * beta)) ** 2
    elif cfg.loss == "hinge":
        loss = torch.relu(1 - beta * d)
    elif cfg.loss == "robust":
        loss = ((1 - e) * -F.logsigmoid(beta * d) + e * F.logsigmoid(-beta * d)) / (1 - 2 * e)
    else:
        raise ConfigError(f"dpo.loss={cfg.loss!r} is not one of sigmoid, ipo, hinge, robust, simpo")
    return loss, {"chosen": (beta * lc).detach(), "rejected": (beta * lr).detach()}


def reward_metrics(chosen: Tensor, rejected: Tensor) -> dict[str, float]:
    """TRL's logged reward metrics of a set of pairs: chosen/rejected rewards (B,) -> means, accuracy
    and margin."""
    return {
        "rewards/chosen": float(chosen.mean()),
        "rewards/rejected": float(rejected.mean()),
        "rewards/accuracies": float((chosen > rejected).float().mean()),
        "rewards/margins": float((chosen - rejected).mean()),
    }


def _forward_logps(model: nn.Module, batch: Batch) -> Tensor:
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    return sequence_logps(logits, batch["input_ids"], batch["completion_mask"])


def reference(model: Transformer, lora: bool) -> Callable[[Batch], Tensor]:
    """The reference's summed completion log-probs (2B,) of a batch, without gradients: with ``lora``
    the model with its adapters disabled, else a frozen copy of ``model`` as it is now."""
    if lora:
        from lamina.model.lora import disable_adapters

        def ref_lora(batch: Batch) -> Tensor:
            with torch.no_grad(), disable_adapters(model):
                return _forward_logps(model, batch)

        return ref_lora
    frozen = copy.deepcopy(model).eval().requires_grad_(False)

    def ref_copy(batch: Batch) -> Tensor:
        p = next(frozen.parameters())
        dev = batch["input_ids"].device
        if p.device != dev:
            frozen.to(dev)
        with torch.no_grad():
            return _forward_logps(frozen, batch)

    return ref_copy


def dpo(cfg: DpoConfig, ref: Callable[[Batch], Tensor] | None) -> Objective:
    """The trainer's objective: the mean DPO-family loss over the batch's pairs, counted per pair.
    The batch is ``PreferenceBatches``'; its ``ref_logps`` (2B,) when precomputed, else ``ref(batch)``."""

    def loss(model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
        logps = _forward_logps(model, batch)
        ref_logps = None
        if cfg.loss != "simpo":
            ref_logps = batch["ref_logps"] if "ref_logps" in batch else ref(batch) if ref else None
            if ref_logps is None:
                raise ConfigError("DPO needs the reference's log-probs: precompute them or pass ref")
        per_pair, _ = dpo_loss(logps, ref_logps, batch["completion_mask"].sum(1), cfg)
        return per_pair.mean(), len(per_pair)

    return loss


class WithRef:
    """A ``PreferenceBatches`` whose batches carry the reference's log-probs, computed once per pair
    (``dpo.precompute_ref``): ``ref_logps`` (2B,) in the batch's row order. They are computed when the
    first batch is asked for, in the trainer's run: on its device and in its precision
    (``lamina.train.precision.run_autocast``, bf16 autocast where it trains in bf16), as the loop would
    compute them per batch; then ``ref`` is let go (a frozen copy is freed)."""

    def __init__(self, batches: PreferenceBatches, ref: Callable[[Batch], Tensor]) -> None:
        self.inner = batches
        self.steps_per_epoch = batches.steps_per_epoch
        self.ref: Callable[[Batch], Tensor] | None = ref
        self.chosen = self.rejected = torch.empty(0)

    def _tables(self) -> None:
        if self.ref is None:
            return
        device = run_device() or torch.device("cpu")
        chosen, rejected = [], []
        with run_autocast():
            for b in self.inner.eval_batches():
                lp = self.ref({k: v.to(device) for k, v in b.items()}).cpu()
                c, r = lp.chunk(2)
                chosen.append(c)
                rejected.append(r)
        self.chosen, self.rejected = torch.cat(chosen), torch.cat(rejected)
        self.ref = None

    def _add(self, b: dict[str, Tensor], rows: list[int]) -> dict[str, Tensor]:
        self._tables()
        idx = torch.tensor(rows, dtype=torch.long)
        return {**b, "ref_logps": torch.cat([self.chosen[idx], self.rejected[idx]])}

    def batch(self, index: int) -> dict[str, Tensor]:
        """Training batch ``index``, as the inner source's, with ``ref_logps``."""
        inner = self.inner
        epoch, k = divmod(index, inner.steps_per_epoch)
        order = np.random.default_rng([inner.seed, epoch]).permutation(len(inner.pairs))
        rows = order[k * inner.batch_size : (k + 1) * inner.batch_size].tolist()
        return self._add(inner.collate(rows), rows)

    def eval_batches(self) -> Iterator[dict[str, Tensor]]:
        """Every pair once, in order, with ``ref_logps``."""
        n, bs = len(self.inner.pairs), self.inner.batch_size
        for start in range(0, n, bs):
            rows = list(range(start, min(start + bs, n)))
            yield self._add(self.inner.collate(rows), rows)


# ------------------------------------------------------------------------------------------------ reward model


def bradley_terry(use_margin: bool = True, center_rewards_coefficient: float | None = None) -> Objective:
    """The reward model's objective: ``-log s(r_c - r_r - margin)`` averaged over the batch's pairs
    (counted per pair), the model's scalar output (2B, 1) at rows chosen-then-rejected; TRL's
    ``RewardTrainer.compute_loss``."""

    def loss(model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
        r = model(batch["input_ids"], attention_mask=batch["attention_mask"]).float().squeeze(-1)
        rc, rr = r.chunk(2)
        margin = batch["margin"].to(rc) if use_margin and "margin" in batch else 0.0
        total = -F.logsigmoid(rc - rr - margin).mean()
        if center_rewards_coefficient is not None:
            total = total + center_rewards_coefficient * ((rc + rr) ** 2).mean()
        return total, len(rc)

    return loss


# ---------------------------------------------------------------------------------------------------- runs


def _encoded(
    run: Any, template: str | None, tokenizer: Tokenizer, max_len: int
) -> tuple[EncodedPairs, EncodedPairs]:
    t, tcfg = run.task, run.train
    if not t.data:
        raise ConfigError("task.data is not set: pass a JSONL file of prompt/chosen/rejected pairs")
    train_data = read_preferences(t.data)
    if t.val_data:
        val_data = read_preferences(t.val_data)
    else:
        train_data, val_data = train_data.split(t.val_fraction, tcfg.seed)
    tr = encode_preferences(tokenizer, train_data, max_len, template, t.truncate)
    va = encode_preferences(tokenizer, val_data, max_len, template, t.truncate)
    for split, e in (("training", tr), ("validation", va)):
        if not e.pairs:
            first = f"; first: {e.problems[0]}" if e.problems else ""
            raise DataError(
                f"every {split} pair was dropped ({e.skipped} skipped{first}); nothing to "
                f"{'train on' if split == 'training' else 'validate on'}: fix the data"
                + ("" if split == "training" or t.val_data else " or raise task.val_fraction")
            )
    return tr, va


def _problem_notes(split: str, e: EncodedPairs) -> list[str]:
    """Prints the first problems on stderr; the run's note counting them, when there are any."""
    for p in e.problems[:20]:
        print(f"lamina: {split} data: {p}", file=sys.stderr)
    if len(e.problems) > 20:
        print(f"lamina: {split} data: ... and {len(e.problems) - 20} more", file=sys.stderr)
    if not e.problems:
        return []
    return [f"{split} data: {len(e.pairs)} pairs used, {e.skipped} skipped, {e.truncated} truncated"]


def _stats(tr: EncodedPairs, va: EncodedPairs, max_len: int) -> dict[str, float]:
    return {"train_pairs": len(tr.pairs), "train_skipped": tr.skipped, "train_truncated": tr.truncated,
            "val_pairs": len(va.pairs), "val_skipped": va.skipped, "val_truncated": va.truncated,
            "max_seq_len": max_len}  # fmt: skip


def _tokens_per_batch(pairs: list[Pair], batch_size: int) -> int:
    """Real tokens in a batch of ``batch_size`` pairs (two rows each: prompt + chosen, prompt + rejected),
    from the mean pair, padding aside: what tokens/s and MFU count."""
    per_pair = sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs) / max(1, len(pairs))
    return max(1, round(per_pair * batch_size))


def finetune_dpo(
    run: Any, resume: bool = False, overwrite: bool = False
) -> tuple[Transformer, Tokenizer, TrainResult]:
    """Train ``run``'s policy on its preference pairs with ``run.dpo``'s loss (``run.task.task == "dpo"``);
    see the module docstring. Raises ``ConfigError`` (no data, not a decoder LM, a quantized base) and
    ``DataError`` (a split with no usable pair, naming the first problem) before training starts."""
    from lamina.train.finetune import base_model

    d, t, tcfg = run.dpo, run.task, run.train
    model, tokenizer = base_model(run)
    if model.config.arch != "decoder" or model.config.head != "lm":
        raise ConfigError(f"task=dpo trains a decoder's language-model head; this model is "
                          f"arch={model.config.arch}, head={model.config.head}")  # fmt: skip
    from lamina.data.chat import read_template

    template = read_template(d.chat_template)
    max_len = min(t.max_seq_len, model.config.max_seq_len)
    tr, va = _encoded(run, template, tokenizer, max_len)
    notes = (
        apply_run_lora(run.lora, model, run.train.seed)
        + _problem_notes("training", tr)
        + _problem_notes("validation", va)
    )
    ref = None if d.loss == "simpo" else reference(model, run.lora is not None)
    train_b: Any = PreferenceBatches(tr.pairs, tcfg.batch_size, tcfg.seed, pad_id(tokenizer))
    val_b: Any = PreferenceBatches(va.pairs, tcfg.batch_size, tcfg.seed, pad_id(tokenizer))
    if d.precompute_ref and ref is not None:  # computed as training starts, in the run's precision
        train_b, val_b = WithRef(train_b, ref), WithRef(val_b, ref)
        ref = None  # the frozen copy (if any) goes once both have their log-probs
    steps = tcfg.max_steps or max(1, round((tcfg.epochs or 1) * train_b.steps_per_epoch))

    def metrics(net: nn.Module) -> dict[str, float]:
        dev = next(net.parameters()).device
        chosen, rejected = [], []
        for b in val_b.eval_batches():
            b = {k: v.to(dev) for k, v in b.items()}
            logps = _forward_logps(net, b)
            ref_logps = b.get("ref_logps") if d.loss != "simpo" else None
            if ref_logps is None and ref is not None:
                ref_logps = ref(b)
            _, rw = dpo_loss(logps, ref_logps, b["completion_mask"].sum(1), d)
            chosen.append(rw["chosen"].cpu())
            rejected.append(rw["rejected"].cpu())
        return reward_metrics(torch.cat(chosen), torch.cat(rejected))

    result = train(
        model, tcfg, train_b, dpo(d, ref), val_b.eval_batches, tokens_per_batch=_tokens_per_batch(tr.pairs, tcfg.batch_size),
        total_steps=steps, tokenizer=tokenizer, run_config=run.to_dict(), eval_metrics=metrics,
        resume=resume, overwrite=overwrite, perplexity=False, data_stats=_stats(tr, va, max_len), notes=notes,
    )  # fmt: skip
    return model, tokenizer, result


def finetune_reward(
    run: Any, resume: bool = False, overwrite: bool = False
) -> tuple[Transformer, Tokenizer, TrainResult]:
    """Train a reward model (a scalar head on ``run``'s model) on its preference pairs with the
    Bradley-Terry loss (``run.task.task == "reward"``); see the module docstring. Raises ``ConfigError`` /
    ``DataError`` as ``finetune_dpo``."""
    from lamina.data.chat import read_template
    from lamina.train.finetune import base_model, with_task_head

    rc, t, tcfg = run.reward, run.task, run.train
    base, tokenizer = base_model(run)
    model = (
        base
        if base.config.head == "regress" and base.config.n_labels == 1
        else with_task_head(base, "regress", None)
    )
    template = read_template(rc.chat_template)
    max_len = min(t.max_seq_len, model.config.max_seq_len)
    tr, va = _encoded(run, template, tokenizer, max_len)
    lora = run.lora
    if lora is not None and REWARD_HEAD not in (lora.modules_to_save or []):  # the head trains in full
        lora = dataclasses.replace(lora, modules_to_save=[*(lora.modules_to_save or []), REWARD_HEAD])
    notes = (
        apply_run_lora(lora, model, tcfg.seed)
        + _problem_notes("training", tr)
        + _problem_notes("validation", va)
    )
    train_b = PreferenceBatches(tr.pairs, tcfg.batch_size, tcfg.seed, pad_id(tokenizer))
    val_b = PreferenceBatches(va.pairs, tcfg.batch_size, tcfg.seed, pad_id(tokenizer))
    steps = tcfg.max_steps or max(1, round((tcfg.epochs or 1) * train_b.steps_per_epoch))

    def metrics(net: nn.Module) -> dict[str, float]:
        dev = next(net.parameters()).device
        chosen, rejected = [], []
        for b in val_b.eval_batches():
            r = (
                net(b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev))
                .float()
                .squeeze(-1)
                .cpu()
            )
            c, x = r.chunk(2)
            chosen.append(c)
            rejected.append(x)
        c, x = torch.cat(chosen), torch.cat(rejected)
        return {"accuracy": float((c > x).float().mean()), "margin": float((c - x).mean())}

    result = train(
        model, tcfg, train_b, bradley_terry(rc.use_margin, rc.center_rewards_coefficient), val_b.eval_batches,
        tokens_per_batch=_tokens_per_batch(tr.pairs, tcfg.batch_size), total_steps=steps, tokenizer=tokenizer,
        run_config=run.to_dict(), eval_metrics=metrics, resume=resume, overwrite=overwrite, perplexity=False,
        data_stats=_stats(tr, va, max_len), notes=notes,
    )  # fmt: skip
    return model, tokenizer, result


# ------------------------------------------------------------------------------------------------ scoring


def reward_scores(
    lm: LoadedModel, prompts: list[Any], completions: list[Any], batch_size: int = 16
) -> list[float]:
    """The reward model ``lm``'s score of each prompt + completion (strings, or message lists with a chat
    template), rendered as in training (``lamina.data.preference.render_completion``; the tail kept when
    longer than the model's context), in batches of ``batch_size`` rows. Raises ``ConfigError`` when ``lm``
    is not a reward model (a one-output regress head with a tokenizer)."""
    from lamina.data.preference import render_completion

    cfg, tok = lm.model.config, lm.tokenizer
    if cfg.head != "regress" or cfg.n_labels != 1 or tok is None:
        raise ConfigError(
            f"this model has head={cfg.head} with {cfg.n_labels} output(s){'' if tok else ' and no tokenizer'}, "
            "not a reward model; fix: train one with `lamina finetune --task reward`"
        )
    templated = tok.chat_template is not None
    rows = []
    for p, c in zip(prompts, completions, strict=True):
        ids, _, end = render_completion(tok, p, c, None, templated or not isinstance(p, str))
        rows.append(ids[:end][-cfg.max_seq_len :])
    model, out = lm.model.eval(), []
    dev = next(model.parameters()).device
    for k in range(0, len(rows), batch_size):
        chunk = rows[k : k + batch_size]
        x = torch.full((len(chunk), max(map(len, chunk))), pad_id(tok), dtype=torch.long)
        att = torch.zeros_like(x)
        for b, r in enumerate(chunk):
            x[b, : len(r)] = torch.tensor(r)
            att[b, : len(r)] = 1
        with torch.no_grad():
            out += model(x.to(dev), attention_mask=att.to(dev)).float().squeeze(-1).cpu().tolist()
    return out


def score_completions(
    model: str,
    source: str,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    batch_size: int = 16,
) -> list[float]:
    """The reward model ``model``'s (a MODEL path or name) score of every line of the JSONL file ``source``.

    Raises ``DataError`` naming the line when it is not JSON or lacks a string or message-list field,
    ``ConfigError`` when the model is not a reward model.

    Args:
        prompt_field: the JSONL key of each prompt (a string or a list of messages)
        completion_field: the JSONL key of each completion (a string or a list of messages)
        batch_size: rows scored per forward pass
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    path = Path(source)
    if not path.is_file():
        raise DataError(
            f"--input {source!r} does not exist; fix: pass a JSONL file of prompt/completion lines"
        )
    prompts, completions = [], []
    for n, row in iter_jsonl(path, lambda n, e: DataError(f"{path.name} line {n}: not JSON ({e.msg})")):
        for key in (prompt_field, completion_field):
            if not isinstance(row, dict) or not isinstance(row.get(key), str | list):
                raise DataError(f"{path.name} line {n}: no {key!r} string or message list; fix the line or "
                                f"name the key (--{'prompt' if key == prompt_field else 'completion'}-field)")  # fmt: skip
        prompts.append(row[prompt_field])
        completions.append(row[completion_field])
    return reward_scores(load_reward_model(model), prompts, completions, batch_size)


def load_reward_model(model: str, device: torch.device | str = "cpu") -> LoadedModel:
    """``lamina.load(model)``, or for a LoRA reward-model checkpoint (``finetune --task reward --lora.r
    ...``: the base weights plus ``adapter/`` with the trained head) the base with its adapter merged.

    Raises as ``lamina.load`` and ``lamina.checkpoint.peft.load_adapter`` do."""
    from lamina.checkpoint.load import load
    from lamina.checkpoint.peft import load_with_adapter, own_adapter

    own = own_adapter(model)
    if own is None:
        return load(model, device=device)
    lm = load_with_adapter(model, own)
    lm.model.to(device)
    return lm
