"""Sequence-to-sequence fine-tuning (``lamina finetune --task seq2seq``): an encoder-decoder
(``model.arch: encoder-decoder``, e.g. ``--model.preset t5-small``) learns source -> target pairs
(translation, summarization) with the teacher-forced, label-smoothed cross-entropy of
``lamina.train.objectives.seq2seq``, on the one trainer (checkpoints, resume, early stopping on the
validation loss).

    task:    {task: seq2seq, data: pairs.jsonl, val_data: val.jsonl, tokenizer: tokenizer.json}
    seq2seq: {source_field: source, target_field: target, max_source_len: 512, max_target_len: 128}
    model:   {preset: t5-tiny}        # built from scratch (task.tokenizer) ... or init: MODEL
    train:   {lr: 3.0e-3, max_steps: 600, label_smoothing: 0.1}

The pairs are read by ``lamina.data.pairs`` (TSV/CSV with a header, or JSONL) and batched by
``PairBatches`` with the model's ``decoder_start_token_id``; truncation is counted in the run's notes and
``data_stats``. Every evaluation adds, next to the validation loss, the greedy outputs' scores on the first
``seq2seq.eval_pairs`` validation pairs (``lamina.eval.seq2seq.pair_metrics``): ``val_bleu``, ``val_chrf``,
``val_rouge1``, ``val_rouge2``, ``val_rougeL``, ``val_exact_match``, printed and written
to ``metrics.jsonl``. The checkpoints' generation.yaml holds that decoding (greedy, ``max_target_len`` new
tokens, ``seq2seq.no_repeat_ngram_size``, ``seq2seq.repetition_penalty``), so ``lamina generate`` and
``generation_predictor`` decode as the evaluations did. ``seq2seq.best_metric`` picks ``OUT/best`` by
another figure of the evaluation than the validation loss (``val_rougeL``: the highest wins).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lamina.config import GenerationConfig
from lamina.data.pairs import PairBatches, PairData, PairDataConfig, load_pairs
from lamina.errors import ConfigError
from lamina.eval.seq2seq import PAIR_METRICS
from lamina.model.transformer import Transformer
from lamina.tokenizer import Tokenizer
from lamina.train.objectives import seq2seq
from lamina.train.trainer import DEFAULT_BEST_METRIC, LOWER_IS_BETTER, TrainResult, train

if TYPE_CHECKING:
    from lamina.train.finetune import FinetuneRun

__all__ = ["BEST_METRICS", "Seq2SeqConfig", "finetune_seq2seq", "pair_config"]

# what seq2seq.best_metric may name: the validation loss, its exponential, and pair_metrics' figures
BEST_METRICS = (*LOWER_IS_BETTER, *PAIR_METRICS)


@dataclass
class Seq2SeqConfig:
    """How ``task=seq2seq`` reads its pairs and what each evaluation decodes. The files, ``val_fraction``
    and ``truncate`` are the task section's."""

    source_field: str = "source"  # the column (TSV/CSV header) or key (JSONL) holding the source text
    target_field: str = "target"  # the column or key holding the target text
    max_source_len: int = 512  # source tokens per pair, eos included (at most the model's max_seq_len)
    # target tokens per pair, eos included (at most the model's max_seq_len); also the longest output decoded
    max_target_len: int = 128
    eval_pairs: int = 200  # validation pairs decoded (greedy) at each evaluation for BLEU/ROUGE; 0: none
    # greedy decoding's ban on repeating n-grams of this size (0: off), in the evaluations and as the
    # checkpoint's default decoding (generation.yaml); 2 stops a copying model from looping on a word
    no_repeat_ngram_size: int = 0
    # greedy decoding's HF/CTRL repetition penalty (> 0; 1: off), in the evaluations and generation.yaml
    repetition_penalty: float = 1.0
    # the evaluation's figure that picks OUT/best (and early stopping): val_loss (lower wins) or a pair
    # metric, val_rougeL, val_bleu, ... (higher wins; needs eval_pairs > 0)
    best_metric: str = DEFAULT_BEST_METRIC

    def __post_init__(self) -> None:
        if self.eval_pairs < 0:
            raise ConfigError(f"seq2seq.eval_pairs={self.eval_pairs} must be >= 0")
        if self.best_metric not in BEST_METRICS:
            raise ConfigError(
                f"seq2seq.best_metric={self.best_metric!r} must be one of {', '.join(BEST_METRICS)}"
            )
        if self.best_metric not in LOWER_IS_BETTER and not self.eval_pairs:
            raise ConfigError(
                f"seq2seq.best_metric={self.best_metric!r} is scored on the decoded validation pairs: "
                "set seq2seq.eval_pairs > 0"
            )
        self.generation(max_new_tokens=1)  # the decoding fields, checked once (GenerationConfig.validate)

    def generation(self, max_new_tokens: int) -> GenerationConfig:
        """The decoding of the evaluations and of the checkpoints' generation.yaml: greedy, at most
        ``max_new_tokens`` tokens, this section's controls. Raises ``ConfigError`` naming the field."""
        try:
            return GenerationConfig(
                temperature=0.0,
                max_new_tokens=max_new_tokens,
                no_repeat_ngram_size=self.no_repeat_ngram_size,
                repetition_penalty=self.repetition_penalty,
            )
        except ConfigError as e:
            raise ConfigError(f"seq2seq.{e}") from None


def pair_config(run: FinetuneRun, model: Transformer | None = None) -> PairDataConfig:
    """The ``PairDataConfig`` of ``run`` (files from the task section, fields and lengths from the seq2seq
    section; lengths capped at ``model``'s ``max_seq_len`` when given)."""
    t, s = run.task, run.seq2seq
    cap = model.config.max_seq_len if model is not None else None
    return PairDataConfig(
        path=t.data,
        val_path=t.val_data,
        val_fraction=t.val_fraction,
        source_field=s.source_field,
        target_field=s.target_field,
        max_source_len=min(s.max_source_len, cap or s.max_source_len),
        max_target_len=min(s.max_target_len, cap or s.max_target_len),
        truncate=t.truncate,
    )


def finetune_seq2seq(
    run: FinetuneRun, resume: bool = False, overwrite: bool = False
) -> tuple[Transformer, Tokenizer, TrainResult]:
    """Train ``run``'s encoder-decoder on its pairs (``run.task.task == "seq2seq"``); see the module
    docstring. Returns the model, its tokenizer and the trainer's summary.

    Raises ``ConfigError`` (no data file; a model that is not ``arch="encoder-decoder"``) and ``DataError``
    (a pair file that cannot be read, a row without the source or target field, naming ``FILE:LINE``)
    before training starts.
    """
    from lamina.eval.seq2seq import pair_metrics
    from lamina.train.finetune import base_model

    t, s, tcfg = run.task, run.seq2seq, run.train
    if not t.data:
        raise ConfigError(
            "task.data is not set: pass a file of source/target pairs (.tsv or .csv with a header, or .jsonl)"
        )
    if run.model is not None and run.model.arch != "encoder-decoder":
        raise ConfigError(_arch_message(run.model.arch))
    train_data, val_data = load_pairs(pair_config(run), tcfg.seed)
    model, tokenizer = base_model(run)
    if model.config.arch != "encoder-decoder":
        raise ConfigError(_arch_message(model.config.arch))
    pc = pair_config(run, model)
    train_b = _batches(tokenizer, train_data, pc, tcfg.batch_size, model, tcfg.seed)
    val_b = _batches(tokenizer, val_data, pc, tcfg.batch_size, model, tcfg.seed)
    notes = train_b.notes("training") + val_b.notes("validation")
    stats = {f"train_{k}": v for k, v in train_b.stats().items()}
    stats |= {f"val_{k}": v for k, v in val_b.stats().items()}
    stats |= {"max_source_len": pc.max_source_len, "max_target_len": pc.max_target_len}
    steps = tcfg.max_steps or max(1, round((tcfg.epochs or 1) * train_b.steps_per_epoch))
    tcfg = dataclasses.replace(tcfg, eval_batches=val_b.n_eval_batches())
    # the checkpoints decode as the evaluations do (generation.yaml; the trainer adds the eos ids)
    decoding = s.generation(pc.max_target_len)
    metrics = None
    if s.eval_pairs:
        metrics = pair_metrics(tokenizer, val_data, config=decoding, limit=s.eval_pairs,
                               batch_size=max(tcfg.batch_size, 32), max_source_len=pc.max_source_len)  # fmt: skip
    # tokens/s counts real tokens: a batch holds batch_size pairs of the mean source + target length
    per_pair = stats["train_mean_source_tokens"] + stats["train_mean_target_tokens"]
    result = train(
        model, tcfg, train_b, seq2seq(tcfg.label_smoothing), val_b.eval_batches,
        tokens_per_batch=max(1, round(per_pair * tcfg.batch_size)), total_steps=steps, tokenizer=tokenizer,
        run_config=dataclasses.replace(run, train=tcfg).to_dict(), eval_metrics=metrics, resume=resume,
        overwrite=overwrite, data_stats=stats, notes=notes, generation=decoding, best_metric=s.best_metric,
    )  # fmt: skip
    return model, tokenizer, result


def _batches(
    tokenizer: Tokenizer, data: PairData, pc: PairDataConfig, batch_size: int, model: Transformer, seed: int
) -> PairBatches:
    return PairBatches(
        tokenizer, data, batch_size, pc.max_source_len, pc.max_target_len,
        decoder_start_token_id=model.config.decoder_start_token_id, seed=seed, truncate=pc.truncate,
    )  # fmt: skip


def _arch_message(arch: str) -> str:
    return (
        f"task=seq2seq trains an encoder-decoder (model.arch='encoder-decoder', e.g. --model.preset t5-small "
        f"or an --init T5 model); this model is arch={arch!r}"
    )
