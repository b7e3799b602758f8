"""Supervised fine-tuning of a language model on chat or instruction data, on the one trainer
(``lamina finetune --task sft``; ``lamina.train.finetune.finetune`` with ``task.task = "sft"``)::

    task:  {task: sft, data: chat.jsonl, max_seq_len: 512}   # val_data or val_fraction, truncate
    sft:   {loss_on: assistant, packing: false, samples: 4}  # lamina.train.finetune.SftConfig
    init:  smollm2
    train: {epochs: 3, lr: 5.0e-5, freeze: ["0-19"]}
    lora:  {r: 16, lora_alpha: 32, target_modules: all-linear}   # optional: adapters train, nothing else

With a ``lora`` section (``lamina.model.lora.LoraConfig``) the model is frozen and LoRA adapters are put
on the layers ``target_modules`` names before the optimizer is built, so only they get gradients and
optimizer state; the trainable count is printed. Every checkpoint then holds the base weights and the
adapters in PEFT's format in ``adapter/`` (``adapter_config.json`` + ``adapter_model.safetensors``), and
the training state keeps the adapters exactly, so a resumed LoRA run is exact too. QLoRA:
``lora: {base_weights: int4}`` (or int8) trains the same adapters over lamina's 4-bit (8-bit) weight-only
base in bf16 (CPU); the run's notes print the base's bytes before and after, and the checkpoints still
hold the fp32 base and a PEFT adapter for it.

The conversations are read, rendered with the model's chat template (or ``sft.chat_template``) and
masked by ``lamina.data.chat``: the loss counts each answer and its end-of-turn token (or every token,
``loss_on: all``). Every line or conversation not used as it is (not JSON, no assistant turn, rejected
by the template, longer than ``max_seq_len``) is printed with its file line and what was done, and
counted in ``metrics.jsonl`` (step 0) and the result; if none is left, the run stops before training.

At every evaluation the model also answers the first ``sft.samples`` validation prompts (greedy, at
most ``sft.sample_max_new_tokens`` tokens); each answer goes to ``OUT/samples.jsonl`` as
``{"step", "where", "prompt", "reference", "output"}``, so one can read how the answers change, and
the share equal to the reference is reported as ``sample_exact``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from lamina.config import TrainConfig
from lamina.data.chat import ChatBatches, Encoded, Example, encode_chats, read_chat, read_template
from lamina.data.rows import pad_id
from lamina.errors import ConfigError, DataError
from lamina.model.transformer import Transformer
from lamina.tokenizer import Tokenizer
from lamina.train.finetune import FinetuneRun, base_model
from lamina.train.freeze import apply_run_lora
from lamina.train.objectives import sft
from lamina.train.trainer import TrainResult, latest_checkpoint, train

SAMPLES_FILE = "samples.jsonl"
_SHOWN = 20  # problems printed one by one per split; the rest are counted


def finetune_sft(
    run: FinetuneRun, resume: bool = False, overwrite: bool = False
) -> tuple[Transformer, Tokenizer, TrainResult]:
    """Train ``run``'s model on its chat data (``run.task.task == "sft"``); see the module docstring.

    Raises ``ConfigError`` (no data file, not a decoder with an LM head, no chat template, packing
    without segment support) and ``DataError`` (a split with no usable conversation, naming the first
    problem) before training starts.
    """
    t, s, tcfg = run.task, run.sft, run.train
    if not t.data:
        raise ConfigError(
            "task.data is not set: pass a JSONL file of conversations (messages, prompt/completion or "
            "instruction/input/output)"
        )
    template = read_template(s.chat_template)
    train_data = read_chat(t.data, s.format, s.messages_field)
    if t.val_data:
        val_data = read_chat(t.val_data, s.format, s.messages_field)
    else:
        train_data, val_data = train_data.split(t.val_fraction, tcfg.seed)
    model, tokenizer = base_model(run)
    cfg = model.config
    if cfg.arch != "decoder" or cfg.head != "lm":
        raise ConfigError(
            f"task=sft trains a decoder's language-model head; this model is arch={cfg.arch}, head={cfg.head}"
        )
    if template is None and tokenizer.chat_template is None:
        raise ConfigError("the tokenizer has no chat template; pass one with --sft.chat_template FILE")
    adapters = apply_run_lora(run.lora, model, tcfg.seed)
    max_len = min(t.max_seq_len, cfg.max_seq_len)
    train_e = encode_chats(tokenizer, train_data, max_len, template, s.loss_on, t.truncate)
    val_e = encode_chats(tokenizer, val_data, max_len, template, s.loss_on, t.truncate)
    notes = adapters + _notes("training", train_e) + _notes("validation", val_e)
    for split, e in (("training", train_e), ("validation", val_e)):
        if not e.examples:
            first = f"; first: {e.problems[0]}" if e.problems else ""
            raise DataError(
                f"every {split} conversation was dropped ({e.skipped} skipped{first}); nothing to "
                f"{'train on' if split == 'training' else 'validate on'}: fix the data"
                + ("" if split == "training" or t.val_data else " or raise task.val_fraction")
            )
    pad = pad_id(tokenizer)
    train_b = ChatBatches(train_e.examples, tcfg.batch_size, max_len, tcfg.seed, s.packing, pad)
    val_b = ChatBatches(val_e.examples, tcfg.batch_size, max_len, tcfg.seed, s.packing, pad)
    stats: dict[str, float] = {
        "train_conversations": len(train_e.examples), "train_skipped": train_e.skipped,
        "train_truncated": train_e.truncated, "train_rows": len(train_b),
        "train_answer_tokens": sum(sum(e.loss) for e in train_e.examples),
        "val_conversations": len(val_e.examples), "val_skipped": val_e.skipped,
        "val_truncated": val_e.truncated, "max_seq_len": max_len,
    }  # fmt: skip
    # tokens/s counts real tokens: a batch holds batch_size rows of the mean row length (padding aside)
    per_batch = max(1, round(sum(len(e.ids) for e in train_e.examples) / len(train_b) * tcfg.batch_size))
    steps = tcfg.max_steps or max(1, round((tcfg.epochs or 1) * train_b.steps_per_epoch))
    out = Path(tcfg.out_dir)
    start = _resumed_step(out) if resume else 0
    samples = _Samples(model, tokenizer, val_e.examples[: s.samples], s.sample_max_new_tokens,
                       out / SAMPLES_FILE, _eval_steps(tcfg, steps, start))  # fmt: skip
    if overwrite and samples.path.exists():
        samples.path.unlink()  # the trainer clears its own outputs; this file is the task's
    samples.keep_until(start)
    result = train(
        model, tcfg, train_b, sft(tcfg.label_smoothing), val_b.eval_batches,
        tokens_per_batch=per_batch, total_steps=steps, tokenizer=tokenizer,
        run_config=run.to_dict(), eval_metrics=samples if s.samples else None, resume=resume,
        overwrite=overwrite, data_stats=stats, notes=notes,
    )  # fmt: skip
    return model, tokenizer, result


def _notes(split: str, e: Encoded) -> list[str]:
    """Prints one line per problem (the first ``_SHOWN``) on stderr; returns the count of what was used,
    skipped and truncated (a note of the run) when anything was."""
    for p in e.problems[:_SHOWN]:
        print(f"lamina: {split} data: {p}", file=sys.stderr)
    if len(e.problems) > _SHOWN:
        print(f"lamina: {split} data: ... and {len(e.problems) - _SHOWN} more", file=sys.stderr)
    if not e.problems:
        return []
    return [
        f"{split} data: {len(e.examples)} conversations used, {e.skipped} skipped, {e.truncated} truncated"
    ]


def _resumed_step(out: Path) -> int:
    last = latest_checkpoint(out)
    return int(last.name.split("-")[1]) if last is not None else 0


def _eval_steps(cfg: TrainConfig, steps: int, start: int) -> Iterator[int]:
    """The steps after ``start`` at which the trainer evaluates (every ``eval_every`` and the last)."""
    return iter([k for k in range(start + 1, steps + 1) if k % cfg.eval_every == 0 or k == steps])


@dataclasses.dataclass
class _Samples:
    """The trainer's ``eval_metrics``: answers the sample prompts and appends them to ``path``. The
    trainer calls it once per evaluation, in step order, so the n-th call is the n-th of ``steps``."""

    model: Transformer
    tokenizer: Tokenizer
    examples: Sequence[Example]
    max_new_tokens: int
    path: Path
    steps: Iterator[int]

    def keep_until(self, step: int) -> None:
        """Drop lines of steps after ``step`` (a resumed run writes those again); all of them for 0."""
        if not self.path.exists():
            return
        lines = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        self.path.write_text("".join(ln + "\n" for ln in lines))

    def __call__(self, net: nn.Module) -> dict[str, float]:
        from lamina.generate.engine import greedy_decode

        step = next(self.steps, -1)
        examples = [e for e in self.examples if e.prompt]
        if not examples or (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0):
            return {}
        eos = self.tokenizer.eos_token_ids
        outs = greedy_decode(self.model, [e.prompt for e in examples], self.max_new_tokens, eos)
        texts = [self.tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for e, text in zip(examples, texts, strict=True):
                prompt = self.tokenizer.decode(e.prompt, skip_special_tokens=False)
                row = {
                    "step": step,
                    "where": e.where,
                    "prompt": prompt,
                    "reference": e.reference,
                    "output": text,
                }
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        exact = sum(text == e.reference.strip() for e, text in zip(examples, texts, strict=True))
        return {"sample_exact": exact / len(examples)}
