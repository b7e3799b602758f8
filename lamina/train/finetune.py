"""Fine-tuning a task head (sequence classification or regression) on labeled text, with the one trainer.

A run has the sections of pretraining plus ``task``::

    task:  {task: classify, data: reviews.csv, text_field: text, label_field: label, max_seq_len: 128}
    init:  minilm                      # start from this MODEL (its tokenizer too) ...
    model: {preset: minilm-l6, ...}    # ... or build one from scratch (then task.tokenizer is needed)
    train: {epochs: 3, lr: 5.0e-5, freeze: ["0-3"]}

The model keeps its encoder (or decoder) weights and gets a fresh head: ``head=classify`` with one
output per label (the labels are the sorted distinct values of the label column) or ``head=regress``.
Every epoch ends with an evaluation on the held-out rows: loss, accuracy and macro F1 (classify) or
MSE (regress), printed and written to ``metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lamina.config import ModelConfig, TrainConfig, from_dict, to_dict
from lamina.data.labeled import LabeledBatches, LabeledData, read_labeled
from lamina.errors import ConfigError, DataError
from lamina.model.transformer import Transformer
from lamina.tokenizer import Tokenizer
from lamina.train.objectives import Batch, Objective
from lamina.train.trainer import TrainResult, train

Task = Literal["classify", "regress"]


@dataclass
class TaskConfig:
    """What to learn and from which file; ``val_data`` or else ``val_fraction`` of ``data`` is held out."""

    task: Task = "classify"
    data: str = ""
    val_data: str | None = None
    val_fraction: float = 0.1
    text_field: str = "text"
    pair_field: str | None = None  # a second text per row (sentence pairs: [CLS] a [SEP] b [SEP])
    label_field: str = "label"
    max_seq_len: int = 128
    tokenizer: str | None = None  # a model built from scratch needs one (tokenizer.json or MODEL)

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction={self.val_fraction} must be in (0, 1)")
        if self.max_seq_len < 3:
            raise ConfigError(f"max_seq_len={self.max_seq_len} must be >= 3")


SECTIONS: dict[str, type | None] = {
    "model": ModelConfig,
    "task": TaskConfig,
    "train": TrainConfig,
    "init": None,
}
TRAIN_DEFAULTS: dict[str, Any] = {"epochs": 3, "max_steps": None, "lr": 5e-5, "warmup_steps": 0,
                                  "weight_decay": 0.01, "out_dir": "runs/finetune"}  # fmt: skip


@dataclass
class FinetuneRun:
    """A whole fine-tuning run: the task, the starting model (``init`` or ``model``), the trainer's config."""

    task: TaskConfig
    train: TrainConfig = field(default_factory=lambda: from_dict(TrainConfig, TRAIN_DEFAULTS))
    model: ModelConfig | None = None
    init: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneRun:
        """Build from ``{"task": {...}, "train": {...}, "model": {...}, "init": ...}``."""
        unknown = set(data) - set(SECTIONS)
        if unknown:
            raise ConfigError(
                f"unknown finetune section(s) {sorted(unknown)}; sections: {', '.join(SECTIONS)}"
            )
        user_train = dict(data.get("train") or {})
        defaults = dict(TRAIN_DEFAULTS)
        if "max_steps" in user_train and "epochs" not in user_train:
            defaults["epochs"] = None
        model = None
        if data.get("model"):
            m = dict(data["model"])
            preset = m.pop("preset", None)
            model = ModelConfig.preset(preset, **m) if preset else from_dict(ModelConfig, m)
        if (model is None) == (data.get("init") is None):
            raise ConfigError("give exactly one of init (a MODEL to fine-tune) and model (a config to build)")
        return cls(
            task=from_dict(TaskConfig, data.get("task") or {}),
            train=from_dict(TrainConfig, {**defaults, **user_train}),
            model=model,
            init=data.get("init"),
        )

    def to_dict(self) -> dict[str, Any]:
        """The exact config, as written to ``run.yaml``."""
        return {"task": to_dict(self.task), "train": to_dict(self.train),
                "model": to_dict(self.model) if self.model else None, "init": self.init}  # fmt: skip


def label_names(labels: list[str | float]) -> list[str]:
    """The sorted distinct labels as names (1.0 -> "1")."""
    return sorted(
        {_name(v) for v in labels}, key=lambda s: (not _is_number(s), float(s) if _is_number(s) else 0, s)
    )


def _name(v: str | float) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def with_task_head(model: Transformer, task: Task, labels: list[str] | None) -> Transformer:
    """A copy of ``model`` with a fresh ``task`` head (the body's weights kept; an encoder gets a pooler,
    the pretrained one when it has it)."""
    cfg = dataclasses.replace(
        model.config,
        head=task,
        n_labels=len(labels) if labels is not None else 1,
        labels=labels,
        pooler=model.config.arch == "encoder",
        lm_head_transform=False,
    )
    new = Transformer(cfg)
    old = model.state_dict()
    keep = {k: v for k, v in old.items() if k in new.state_dict() and new.state_dict()[k].shape == v.shape}
    new.load_state_dict(keep, strict=False)
    return new


def classification_loss(task: Task) -> Objective:
    """Cross-entropy over classes (classify) or mean squared error (regress) of ``batch["labels"]``."""

    def loss(model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=batch.get("token_type_ids"))  # fmt: skip
        labels = batch["labels"]
        if task == "classify":
            return F.cross_entropy(out.float(), labels), len(labels)
        return F.mse_loss(out.float().squeeze(-1), labels.float()), len(labels)

    return loss


def classification_metrics(preds: Tensor, labels: Tensor, n_classes: int) -> dict[str, float]:
    """Accuracy and macro F1 of predicted class ids against the true ones."""
    f1s = []
    for c in range(n_classes):
        tp = int(((preds == c) & (labels == c)).sum())
        fp = int(((preds == c) & (labels != c)).sum())
        fn = int(((preds != c) & (labels == c)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0)
    return {"accuracy": float((preds == labels).float().mean()), "f1": sum(f1s) / n_classes}


def finetune(run: FinetuneRun) -> tuple[Transformer, Tokenizer, TrainResult]:
    """Read the data, put a task head on the model, train it; returns the model, tokenizer and summary."""
    t = run.task
    if not t.data:
        raise ConfigError("task.data is not set: pass a CSV or JSONL file with text and label columns")
    data = read_labeled(t.data, t.text_field, t.label_field, t.pair_field)
    if t.val_data:
        train_data, val_data = data, read_labeled(t.val_data, t.text_field, t.label_field, t.pair_field)
    else:
        train_data, val_data = data.split(t.val_fraction, run.train.seed)
    base, tokenizer = _base_model(run)
    names = label_names(train_data.labels + val_data.labels) if t.task == "classify" else None
    if names is not None and len(names) < 2:
        raise DataError(f"the label column {t.label_field!r} has one value ({names[0]!r}): need >= 2 classes")
    model = with_task_head(base, t.task, names)
    max_len = min(t.max_seq_len, model.config.max_seq_len)
    tt = model.type_emb is not None
    tcfg = run.train
    train_b = LabeledBatches(
        tokenizer, train_data, _targets(train_data, names), tcfg.batch_size, max_len, tcfg.seed, tt
    )
    val_b = LabeledBatches(
        tokenizer, val_data, _targets(val_data, names), tcfg.batch_size, max_len, tcfg.seed, tt
    )
    per_epoch = train_b.steps_per_epoch
    steps = tcfg.max_steps or max(1, round((tcfg.epochs or 1) * per_epoch))
    tcfg = dataclasses.replace(
        tcfg, eval_every=per_epoch, eval_batches=val_b.n_eval_batches(), save_every=steps
    )

    def metrics(net: nn.Module) -> dict[str, float]:
        preds, labels = [], []
        for b in val_b.eval_batches():
            dev = next(net.parameters()).device
            out = net(b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev),
                      token_type_ids=b["token_type_ids"].to(dev) if "token_type_ids" in b else None)  # fmt: skip
            preds.append(out.float().cpu())
            labels.append(b["labels"])
        p, y = torch.cat(preds), torch.cat(labels)
        if names is None:
            return {"mse": float(F.mse_loss(p.squeeze(-1), y.float()))}
        return classification_metrics(p.argmax(-1), y, len(names))

    result = train(
        model, tcfg, train_b, classification_loss(t.task), val_b.eval_batches,
        tokens_per_batch=tcfg.batch_size * max_len, total_steps=steps, tokenizer=tokenizer,
        run_config=dataclasses.replace(run, train=tcfg).to_dict(), eval_metrics=metrics,
    )  # fmt: skip
    return model, tokenizer, result


def _targets(data: LabeledData, names: list[str] | None) -> Tensor:
    if names is None:
        try:
            return torch.tensor([float(v) for v in data.labels])
        except ValueError as e:
            raise DataError(f"task=regress needs numeric labels: {e}") from e
    index = {n: i for i, n in enumerate(names)}
    return torch.tensor([index[_name(v)] for v in data.labels])


def _base_model(run: FinetuneRun) -> tuple[Transformer, Tokenizer]:
    if run.init is not None:
        from lamina.checkpoint.load import load

        lm = load(run.init)
        if lm.tokenizer is None:
            raise ConfigError(f"init model {run.init!r} has no tokenizer; fine-tuning needs one")
        return lm.model.float(), lm.tokenizer
    assert run.model is not None
    if run.task.tokenizer is None:
        raise ConfigError("a model built from scratch needs task.tokenizer (a tokenizer.json or MODEL)")
    from lamina.data.corpus import load_tokenizer

    tokenizer = load_tokenizer(run.task.tokenizer)
    if tokenizer.vocab_size > run.model.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size={run.model.vocab_size}: "
            f"set model.vocab_size >= {tokenizer.vocab_size}"
        )
    torch.manual_seed(run.train.seed)
    return Transformer(run.model), tokenizer
