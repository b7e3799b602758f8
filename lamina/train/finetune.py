"""Fine-tuning a task head (sequence classification, regression or token classification) on labeled
text, with the one trainer.

A run has the sections of pretraining plus ``task``::

    task:  {task: classify, data: reviews.csv, text_field: text, label_field: label, max_seq_len: 128}
    init:  minilm                      # start from this MODEL (its tokenizer too) ...
    model: {preset: minilm-l6, ...}    # ... or build one from scratch (then task.tokenizer is needed)
    train: {epochs: 3, lr: 5.0e-5, freeze: ["0-3"]}

The model keeps its encoder (or decoder) weights and gets a fresh head: ``head=classify`` with one
output per label (the labels are ``task.labels`` or else the sorted distinct values of the label
column), ``head=regress``, or ``head=token_classify`` (one label per word; the data is JSONL with
``tokens`` and ``tags`` columns, see ``lamina.data.labeled.TaggedBatches``). The label names are kept
in the saved model config (``labels``). Every epoch ends with an evaluation on the held-out rows, printed
and written to ``metrics.jsonl``: loss, then accuracy and macro F1 (classify), MSE (regress), or token
accuracy, macro F1 over labels and, for IOB tags (``B-PER``, ``I-PER``, ``O``), entity-level F1 as
seqeval computes it (token_classify).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lamina.config import ModelConfig, TrainConfig, from_dict, to_dict
from lamina.data.chat import ChatFormat, LossOn
from lamina.data.labeled import (
    IGNORE,
    LabeledBatches,
    LabeledData,
    TaggedBatches,
    TaggedData,
    read_labeled,
    read_tagged,
)
from lamina.errors import ConfigError, DataError
from lamina.fields import coerce
from lamina.model.lora import LoraConfig
from lamina.model.transformer import Transformer
from lamina.tokenizer import Tokenizer
from lamina.train.grpo import GrpoConfig
from lamina.train.objectives import Batch, Objective
from lamina.train.preference import DpoConfig, RewardConfig
from lamina.train.seq2seq import Seq2SeqConfig
from lamina.train.trainer import LORA_UNDER_FSDP, TrainResult, check_out_dir, train

HeadTask = Literal["classify", "regress", "token_classify"]  # the tasks that train a fresh head
Task = Literal[HeadTask, "sft", "reward", "dpo", "grpo", "seq2seq"]


@dataclass
class TaskConfig:
    """What to learn and from which file; ``val_data`` or else ``val_fraction`` of ``data`` is held out."""

    # classify (a class per row), regress (a number per row), token_classify (a tag per word) or sft
    # (supervised fine-tuning of a language model on chat or instruction data; options: the sft section),
    # reward (a reward model from prompt/chosen/rejected pairs), dpo (preference tuning; the dpo section),
    # grpo (RL from rewards of sampled completions to prompts; the grpo section) or seq2seq (an
    # encoder-decoder on source/target pairs; the seq2seq section)
    task: Task = "classify"
    # the training file: .csv with a header or .jsonl (token_classify, sft: .jsonl)
    data: str = ""
    val_data: str | None = None  # a validation file like data (None: hold out val_fraction of data)
    val_fraction: float = 0.1  # share of data's rows held out for validation without val_data, in (0, 1)
    text_field: str = "text"  # the column (CSV) or key (JSONL) that holds the text
    pair_field: str | None = None  # a second text per row (sentence pairs: [CLS] a [SEP] b [SEP])
    label_field: str = "label"  # the column or key that holds the label: a class, or a number (regress)
    tokens_field: str = "tokens"  # token_classify: the key of a row's list of words
    tags_field: str = "tags"  # token_classify: the key of a row's list of tags, one per word (CoNLL-style)
    labels: list[str] | None = None  # the label names in output order; None: the data's, sorted
    # tokens per row (sft: per conversation, and per packed row), >= 3 (at most the model's max_seq_len)
    max_seq_len: int = 128
    tokenizer: str | None = None  # tokenizer.json or MODEL for a model built from scratch (init has its own)
    # cut rows longer than max_seq_len and count them in the run's summary; false: refuse them (sft: skip
    # and count them)
    truncate: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction={self.val_fraction} must be in (0, 1)")
        if self.max_seq_len < 3:
            raise ConfigError(f"max_seq_len={self.max_seq_len} must be >= 3")
        if self.labels is not None:
            if self.task == "regress":
                raise ConfigError("task.labels names classes; task=regress has none: leave labels unset")
            self.labels = [_name(v) for v in self.labels]
            if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
                raise ConfigError(f"task.labels={self.labels} must be >= 2 distinct names")


@dataclass
class SftConfig:
    """How ``task=sft`` reads, renders and masks conversations (``lamina.data.chat``), and what it samples
    at each evaluation. The files, ``max_seq_len`` and ``truncate`` are the task section's."""

    # the JSONL shape: messages (OpenAI), prompt_completion, alpaca (instruction/input/output) or auto
    # (each line by its keys)
    format: ChatFormat = "auto"
    messages_field: str = "messages"  # format=messages: the key of a line's list of messages
    chat_template: str | None = None  # a Jinja chat template file (or text); None: the tokenizer's
    # the tokens with loss: assistant (each answer and its end-of-turn token) or all (every token)
    loss_on: LossOn = "assistant"
    # several conversations per row of max_seq_len tokens, attention and positions kept to each
    packing: bool = False
    samples: int = 4  # validation prompts answered (greedy) at each evaluation, into samples.jsonl; 0: none
    sample_max_new_tokens: int = 64  # the longest sampled answer, in tokens, > 0

    def __post_init__(self) -> None:
        if self.samples < 0:
            raise ConfigError(f"sft.samples={self.samples} must be >= 0")
        if self.sample_max_new_tokens <= 0:
            raise ConfigError(f"sft.sample_max_new_tokens={self.sample_max_new_tokens} must be positive")


SECTIONS: dict[str, type | None] = {
    "model": ModelConfig,
    "task": TaskConfig,
    "sft": SftConfig,
    "dpo": DpoConfig,
    "reward": RewardConfig,
    "grpo": GrpoConfig,
    "seq2seq": Seq2SeqConfig,
    "lora": LoraConfig,  # given (even empty, ``lora: {}``): train LoRA adapters instead of the weights
    "train": TrainConfig,
    "init": None,
}


@dataclass
class FinetuneRun:
    """A whole fine-tuning run: the task, the starting model (``init`` or ``model``), the trainer's config."""

    task: TaskConfig
    train: TrainConfig = field(default_factory=lambda: from_dict(TrainConfig, {"preset": "finetune"}))
    model: ModelConfig | None = None
    init: str | None = None
    sft: SftConfig = field(default_factory=SftConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    seq2seq: Seq2SeqConfig = field(default_factory=Seq2SeqConfig)
    # task=sft, dpo, grpo or reward: LoRA adapters (lamina.model.lora) train, the model is frozen (reward: but its head)
    lora: LoraConfig | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneRun:
        """Build from ``{"task": {...}, "train": {...}, "model": {...}, "init": ...}``."""
        unknown = set(data) - set(SECTIONS)
        if unknown:
            raise ConfigError(
                f"unknown finetune section(s) {sorted(unknown)}; sections: {', '.join(SECTIONS)}"
            )
        model = from_dict(ModelConfig, data["model"], "model") if data.get("model") else None
        init = coerce(data.get("init"), str | None, "init")
        if (model is None) == (init is None):
            raise ConfigError(
                "give exactly one of init (a MODEL to fine-tune: --init smollm2) and model (a config to "
                f"build: --model.preset tiny); got {'both' if init is not None else 'neither'}"
            )
        return cls(
            task=from_dict(TaskConfig, data.get("task") or {}, "task"),
            # the train section starts from the `finetune` preset (a few epochs at a small lr)
            train=from_dict(TrainConfig, {"preset": "finetune", **(data.get("train") or {})}, "train"),
            model=model,
            init=init,
            sft=from_dict(SftConfig, data.get("sft") or {}, "sft"),
            dpo=from_dict(DpoConfig, data.get("dpo") or {}, "dpo"),
            reward=from_dict(RewardConfig, data.get("reward") or {}, "reward"),
            grpo=from_dict(GrpoConfig, data.get("grpo") or {}, "grpo"),
            seq2seq=from_dict(Seq2SeqConfig, data.get("seq2seq") or {}, "seq2seq"),
            lora=from_dict(LoraConfig, data["lora"], "lora") if data.get("lora") is not None else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """The exact config, as written to ``run.yaml`` (the sft section only for task=sft)."""
        out = {"task": to_dict(self.task), "train": to_dict(self.train),
               "model": to_dict(self.model) if self.model else None, "init": self.init}  # fmt: skip
        if self.task.task == "sft":
            out["sft"] = to_dict(self.sft)
        if self.task.task in ("dpo", "reward"):
            out[self.task.task] = to_dict(self.dpo if self.task.task == "dpo" else self.reward)
        if self.task.task == "grpo":
            out["grpo"] = to_dict(self.grpo)
        if self.task.task == "seq2seq":
            out["seq2seq"] = to_dict(self.seq2seq)
        if self.lora is not None:
            out["lora"] = to_dict(self.lora)
        return out


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


def with_task_head(model: Transformer, task: HeadTask, labels: list[str] | None) -> Transformer:
    """A copy of ``model`` with a fresh ``task`` head (the body's weights kept; an encoder's sequence head
    gets a pooler, the pretrained one when it has it)."""
    cfg = dataclasses.replace(
        model.config,
        head=task,
        n_labels=len(labels) if labels is not None else 1,
        labels=labels,
        pooler=model.config.arch == "encoder" and task != "token_classify",
        lm_head_transform=False,
    )
    new = Transformer(cfg)
    old = model.state_dict()
    keep = {k: v for k, v in old.items() if k in new.state_dict() and new.state_dict()[k].shape == v.shape}
    new.load_state_dict(keep, strict=False)
    return new


def classification_loss(task: HeadTask) -> Objective:
    """Cross-entropy over classes (classify), over the labelled positions (token_classify: labels
    (B, T), -100 where unlabelled) or mean squared error (regress) of ``batch["labels"]``."""

    def loss(model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=batch.get("token_type_ids"))  # fmt: skip
        labels = batch["labels"]
        if task == "token_classify":  # out (B, T, n_labels), labels (B, T)
            n = int((labels != IGNORE).sum())
            total = F.cross_entropy(out.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                    reduction="sum")  # fmt: skip
            return total / max(n, 1), n
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


def token_classification_metrics(
    preds: list[Tensor], labels: list[Tensor], names: list[str]
) -> dict[str, float]:
    """Token accuracy and macro F1 over the labels of the labelled positions of each sentence (one
    tensor of tag ids per sentence), plus ``entity_f1`` when the names are IOB tags."""
    m = classification_metrics(torch.cat(preds), torch.cat(labels), len(names))
    if all(n == "O" or n.startswith(("B-", "I-")) for n in names) and any(n.startswith("B-") for n in names):
        m["entity_f1"] = entity_f1(
            [[names[i] for i in y.tolist()] for y in labels], [[names[i] for i in p.tolist()] for p in preds]
        )
    return m


def entity_f1(true: list[list[str]], pred: list[list[str]]) -> float:
    """Entity-level F1 of IOB-tagged sentences, as seqeval's default mode (conlleval): an entity of type
    X starts at ``B-X`` or at an ``I-X`` that does not continue an X, and runs over the ``I-X`` after it;
    a predicted entity counts when its type and span both match a true one."""
    t = {(k, c) for k, tags in enumerate(true) for c in _chunks(tags)}
    p = {(k, c) for k, tags in enumerate(pred) for c in _chunks(tags)}
    return 2 * len(t & p) / (len(t) + len(p)) if t or p else 0.0


def _chunks(tags: list[str]) -> list[tuple[str, int, int]]:
    """The (type, start, end) entities of one IOB-tagged sentence."""
    out, kind, start = [], "", 0
    for i, tag in enumerate([*tags, "O"]):
        if tag.startswith("I-") and tag[2:] == kind:
            continue
        if kind:
            out.append((kind, start, i))
        kind, start = (tag[2:], i) if tag.startswith(("B-", "I-")) else ("", i)
    return out


def finetune(
    run: FinetuneRun, resume: bool = False, overwrite: bool = False
) -> tuple[Transformer, Tokenizer, TrainResult]:
    """Read the data, put a task head on the model, train it; returns the model, tokenizer and summary.

    ``resume`` continues an interrupted run from the newest checkpoint in ``run.train.out_dir`` (the
    same data and config give exactly the uninterrupted run's weights); ``overwrite`` replaces a run
    that is there. Without either, a folder that holds a run is refused (``ConfigError``, before the
    data is read); see ``lamina.train.trainer.check_out_dir``.
    """
    started = time.perf_counter()
    check_out_dir(run.train.out_dir, resume=resume, overwrite=overwrite)
    t = run.task
    if run.lora is not None and t.task not in ("sft", "dpo", "grpo", "reward"):
        raise ConfigError(
            f"the lora section trains adapters for task=sft, dpo, grpo or reward; task={t.task} trains a "
            "new head"
        )
    if run.lora is not None and run.lora.modules_to_save and t.task in ("dpo", "grpo"):
        raise ConfigError(
            f"lora.modules_to_save trains whole modules, but task={t.task} scores its reference model by "
            "switching the adapters off, which would keep those modules trained; leave modules_to_save empty "
            "(or train them in an sft run first)"
        )
    if run.lora is not None and run.train.parallel == "fsdp":
        raise ConfigError(LORA_UNDER_FSDP)
    qlora = run.lora.base_weights if run.lora is not None else None
    device = run.train.device
    if qlora in ("int8", "int4") and device != "cpu" and (device != "auto" or torch.cuda.is_available()):
        raise ConfigError(
            f"lora.base_weights={qlora} runs on lamina's CPU kernels but train.device={device}; set "
            "--train.device cpu (on a GPU, base_weights bf16)"
        )
    if t.task in ("dpo", "reward"):
        from lamina.train.preference import finetune_dpo, finetune_reward

        fn = finetune_dpo if t.task == "dpo" else finetune_reward
        model, tokenizer, result = fn(run, resume=resume, overwrite=overwrite)
        result.elapsed = time.perf_counter() - started
        return model, tokenizer, result
    if t.task == "grpo":
        from lamina.train.grpo import finetune_grpo

        model, tokenizer, result = finetune_grpo(run, resume=resume, overwrite=overwrite)
        result.elapsed = time.perf_counter() - started
        return model, tokenizer, result
    if t.task == "seq2seq":
        from lamina.train.seq2seq import finetune_seq2seq

        model, tokenizer, result = finetune_seq2seq(run, resume=resume, overwrite=overwrite)
        result.elapsed = time.perf_counter() - started
        return model, tokenizer, result
    if t.task == "sft":
        from lamina.train.sft import finetune_sft

        model, tokenizer, result = finetune_sft(run, resume=resume, overwrite=overwrite)
        result.elapsed = time.perf_counter() - started
        return model, tokenizer, result
    if not t.data:
        kind = "JSONL file with tokens and tags" if t.task == "token_classify" else "CSV or JSONL file"
        raise ConfigError(f"task.data is not set: pass a labeled {kind}")
    train_data = _read(t, t.data)
    if t.val_data:
        val_data = _read(t, t.val_data)
    else:
        train_data, val_data = train_data.split(t.val_fraction, run.train.seed)
    base, tokenizer = base_model(run)
    names = _label_names(t, train_data, val_data)
    head_task = cast(HeadTask, t.task)  # sft, reward, dpo and seq2seq returned above
    model = with_task_head(base, head_task, names)
    max_len = min(t.max_seq_len, model.config.max_seq_len)
    tt = model.type_emb is not None
    tcfg = run.train
    train_b = _batches(tokenizer, train_data, names, tcfg.batch_size, max_len, tcfg.seed, tt, t.truncate)
    val_b = _batches(tokenizer, val_data, names, tcfg.batch_size, max_len, tcfg.seed, tt, t.truncate)
    # every truncation is counted: in metrics.jsonl (a step-0 record), the result and the summary
    what = "sentences" if t.task == "token_classify" else "texts"
    stats: dict[str, float] = {
        "train_rows": len(train_b.ids), "train_truncated": train_b.truncated,
        "val_rows": len(val_b.ids), "val_truncated": val_b.truncated, "max_seq_len": max_len,
    }  # fmt: skip
    notes = [f"{b.truncated} of {len(b.ids)} {split} {what} truncated to {max_len} tokens"
             for split, b in (("training", train_b), ("held-out", val_b)) if b.truncated]  # fmt: skip
    per_epoch = train_b.steps_per_epoch
    steps = tcfg.max_steps or max(1, round((tcfg.epochs or 1) * per_epoch))
    tcfg = dataclasses.replace(
        tcfg, eval_every=per_epoch, eval_batches=val_b.n_eval_batches(), save_every=steps
    )

    def metrics(net: nn.Module) -> dict[str, float]:
        preds, labels = [], []
        dev = next(net.parameters()).device
        for b in val_b.eval_batches():
            out = net(b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev),
                      token_type_ids=b["token_type_ids"].to(dev) if "token_type_ids" in b else None)  # fmt: skip
            out, y = out.float().cpu(), b["labels"]
            if t.task == "token_classify":  # one sentence's labelled positions at a time
                p = out.argmax(-1)
                preds += [p[r][y[r] != IGNORE] for r in range(len(y))]
                labels += [y[r][y[r] != IGNORE] for r in range(len(y))]
            else:
                preds.append(out)
                labels.append(y)
        if names is None:
            return {"mse": float(F.mse_loss(torch.cat(preds).squeeze(-1), torch.cat(labels).float()))}
        if t.task == "token_classify":
            return token_classification_metrics(preds, labels, names)
        return classification_metrics(torch.cat(preds).argmax(-1), torch.cat(labels), len(names))

    result = train(
        model, tcfg, train_b, classification_loss(head_task), val_b.eval_batches,
        tokens_per_batch=tcfg.batch_size * max_len, total_steps=steps, tokenizer=tokenizer,
        run_config=dataclasses.replace(run, train=tcfg).to_dict(), eval_metrics=metrics, resume=resume,
        overwrite=overwrite, perplexity=False,  # a class or a number per row: no per-token perplexity
        data_stats=stats, notes=notes,
    )  # fmt: skip
    result.elapsed = time.perf_counter() - started
    return model, tokenizer, result


def _read(t: TaskConfig, path: str) -> LabeledData | TaggedData:
    if t.task == "token_classify":
        return read_tagged(path, t.tokens_field, t.tags_field)
    return read_labeled(path, t.text_field, t.label_field, t.pair_field)


def _label_names(
    t: TaskConfig, train_data: LabeledData | TaggedData, val_data: LabeledData | TaggedData
) -> list[str] | None:
    """``task.labels``, or else the data's distinct labels, sorted; None for regression."""
    if t.task == "regress":
        return None
    if t.labels is not None:
        return t.labels
    if isinstance(train_data, TaggedData) and isinstance(val_data, TaggedData):
        names = label_names([v for tags in train_data.tags + val_data.tags for v in tags])
        column = t.tags_field
    else:
        assert isinstance(train_data, LabeledData) and isinstance(val_data, LabeledData)
        names = label_names(train_data.labels + val_data.labels)
        column = t.label_field
    if len(names) < 2:
        raise DataError(f"the label column {column!r} has one value ({names[0]!r}): need >= 2 classes")
    return names


def _batches(
    tokenizer: Tokenizer,
    data: LabeledData | TaggedData,
    names: list[str] | None,
    batch_size: int,
    max_len: int,
    seed: int,
    token_types: bool,
    truncate: bool = True,
) -> LabeledBatches | TaggedBatches:
    if isinstance(data, TaggedData):
        assert names is not None
        index = {n: i for i, n in enumerate(names)}
        tag_ids = [
            [_label_id(index, v, where) for v in tags]
            for tags, where in zip(data.tags, _where(data), strict=True)
        ]
        return TaggedBatches(tokenizer, data, tag_ids, batch_size, max_len, seed, token_types, truncate)
    return LabeledBatches(
        tokenizer, data, _targets(data, names), batch_size, max_len, seed, token_types, truncate
    )


def _targets(data: LabeledData, names: list[str] | None) -> Tensor:
    if names is None:
        for v, where in zip(data.labels, _where(data), strict=True):
            if isinstance(v, str) and not _is_number(v):
                raise DataError(f"{where}: label {v!r} is not a number; task=regress needs numeric labels")
        return torch.tensor([float(v) for v in data.labels])
    index = {n: i for i, n in enumerate(names)}
    return torch.tensor(
        [_label_id(index, v, where) for v, where in zip(data.labels, _where(data), strict=True)]
    )


def _where(data: LabeledData | TaggedData) -> list[str]:
    return data.where or [f"row {i}" for i in range(1, len(data) + 1)]


def _label_id(index: dict[str, int], value: str | float, where: str) -> int:
    name = _name(value)
    if name not in index:
        raise DataError(
            f"{where}: label {name!r} is not one of task.labels {list(index)}; fix: add it to task.labels "
            "or leave task.labels unset to take the data's labels"
        )
    return index[name]


def base_model(run: FinetuneRun) -> tuple[Transformer, Tokenizer]:
    """The model to fine-tune (``run.init`` loaded in fp32, or built from ``run.model`` with ``run.task.tokenizer``) and its tokenizer."""
    if run.init is not None:
        from lamina.checkpoint.load import load

        lm = load(run.init, compile=False)  # a model to train: no compiled decode step
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
