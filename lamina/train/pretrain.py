"""Pretraining from a run config: data folder -> model -> trainer. A decoder learns the causal-LM
objective, an encoder (``model.arch: encoder``) the masked-LM one, an encoder-decoder
(``model.arch: encoder-decoder``, e.g. ``preset: t5-small``) T5's span corruption
(``lamina.data.span_corruption``; its knobs are the ``span_corruption`` section, whose ``input_length``
defaults to ``train.seq_len``, else the model section's ``max_seq_len``). ``train.objective`` picks explicitly.

A run config is a YAML file with three sections, each one dataclass (the same fields as the Python
API and the ``--section.field`` flags)::

    model: {preset: small, n_layers: 4}     # a ModelConfig, optionally from a preset
    data:  {out: runs/data, builtin: stdlib, train_tokenizer: 8192}   # a DataConfig
    train: {out_dir: runs/gpt, lr: 3.0e-4, max_steps: 2000}           # a TrainConfig
    init: null                              # or a MODEL to continue training from
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lamina.config import GenerationConfig, ModelConfig, TrainConfig, from_dict, to_dict
from lamina.data.batches import CausalBatches, TokenShards, val_batches
from lamina.data.corpus import DataConfig, Manifest, prepare
from lamina.data.masking import MaskedBatches, special_ids, with_mask_token, word_start_table
from lamina.data.span_corruption import (
    SpanCorruptionBatches,
    SpanCorruptionConfig,
    input_and_target_lengths,
    num_noise_spans,
    with_sentinel_tokens,
)
from lamina.errors import ConfigError, DataError
from lamina.fields import coerce, read_yaml
from lamina.model.transformer import Transformer
from lamina.tokenizer import Tokenizer
from lamina.train.objectives import Objective, causal_lm, masked_lm, seq2seq
from lamina.train.trainer import TrainResult, check_out_dir, train

SECTIONS: dict[str, type | None] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    # encoder-decoders: T5 span corruption (input_length unset: train.seq_len, else model.max_seq_len)
    "span_corruption": SpanCorruptionConfig,
    "init": None,
}


@dataclass
class RunConfig:
    """A whole pretraining run: model architecture, data, training hyperparameters, optional init."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig.preset("small"))
    data: DataConfig = field(default_factory=lambda: DataConfig(out="runs/data", builtin="stdlib"))
    train: TrainConfig = field(default_factory=TrainConfig)
    init: str | None = None  # continue from this MODEL (its architecture and tokenizer win)
    span_corruption: SpanCorruptionConfig = field(default_factory=SpanCorruptionConfig)
    model_explicit: frozenset[str] = (
        frozenset()
    )  # model fields the user set (vocab_size is derived otherwise)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build from ``{"model": {...}, "data": {...}, "train": {...}, "init": ...}``."""
        unknown = set(data) - set(SECTIONS)
        if unknown:
            raise ConfigError(
                f"unknown run config section(s) {sorted(unknown)}; sections: {', '.join(SECTIONS)}"
            )
        model = dict(data.get("model") or {})
        model_cfg = from_dict(ModelConfig, model, "model")
        train = from_dict(TrainConfig, data.get("train") or {}, "train")
        spans = dict(data.get("span_corruption") or {})
        if model_cfg.arch == "encoder-decoder" or train.objective == "span_corruption":
            spans.setdefault("input_length", train.seq_len or model_cfg.max_seq_len)
        return cls(
            model=model_cfg,
            data=from_dict(DataConfig, data.get("data") or {"out": "runs/data", "builtin": "stdlib"}, "data"),
            train=train,
            init=coerce(data.get("init"), str | None, "init"),
            span_corruption=from_dict(SpanCorruptionConfig, spans, "span_corruption"),
            model_explicit=frozenset(model) - {"preset"},
        )

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> RunConfig:
        """Read a run YAML file."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"run config {str(p)!r} does not exist")
        return cls.from_dict(read_yaml(p))

    def to_dict(self) -> dict[str, Any]:
        """The exact config, as written to ``run.yaml`` next to the checkpoints."""
        data = {k: (str(v) if isinstance(v, Path) else v) for k, v in to_dict(self.data).items()}
        out = {"model": to_dict(self.model), "data": data, "train": to_dict(self.train), "init": self.init}
        if self.model.arch == "encoder-decoder" or self.train.objective == "span_corruption":
            out["span_corruption"] = to_dict(self.span_corruption)
        return out


def prepare_data(run: RunConfig, progress: bool = True) -> Manifest:
    """The run's data folder: reused when its manifest exists, else prepared now."""
    out = Path(run.data.out)
    if (out / "manifest.json").is_file() and not run.data.overwrite:
        return Manifest.load(out)
    cfg = run.data
    if not cfg.sources and cfg.builtin is None:  # nothing to prepare: most likely a mistyped data.out
        raise ConfigError(
            f"data.out={cfg.out!r} holds no prepared data (no manifest.json): give the folder "
            "`lamina data prepare --out` wrote, or data.sources / data.builtin to prepare it in this run"
        )
    if cfg.tokenizer is None and cfg.train_tokenizer is None:
        if run.init is None:
            raise ConfigError(
                "the data needs a tokenizer: set data.tokenizer (a tokenizer.json or MODEL), "
                "data.train_tokenizer (a vocabulary size to train one), or init (a MODEL whose tokenizer to use)"
            )
        cfg = dataclasses.replace(cfg, tokenizer=run.init)
    return prepare(cfg, progress=progress)


def build_model(run: RunConfig, tokenizer: Tokenizer) -> tuple[Transformer, GenerationConfig | None]:
    """A fresh model (vocab_size from the tokenizer unless set explicitly) or the ``init`` model, with
    the init model's decoding defaults (its eos ids among them; None for a fresh model)."""
    generation = None
    if run.init is not None:
        from lamina.checkpoint.load import load

        lm = load(run.init, compile=False)  # a model to train: no compiled decode step
        model, generation = lm.model.train(), lm.generation
    else:
        cfg = run.model
        if "vocab_size" not in run.model_explicit:
            cfg = dataclasses.replace(cfg, vocab_size=_round_up(tokenizer.vocab_size, 64))
        torch.manual_seed(run.train.seed)
        model = Transformer(cfg)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{model.config.vocab_size}: set model.vocab_size >= {tokenizer.vocab_size} (or use the model's tokenizer)"
        )
    return model, generation


def pretrain(
    run: RunConfig, resume: bool = False, overwrite: bool = False
) -> tuple[Transformer, Tokenizer, TrainResult]:
    """Prepare (or reuse) the data, build the model, and train it with the causal-LM objective (decoders)
    or the masked-LM one (encoders; a mask token is added to a tokenizer that has none).

    ``resume`` continues the run in ``run.train.out_dir`` from its newest checkpoint; ``overwrite``
    replaces a run that is there. Without either, a folder that holds a run is refused (``ConfigError``,
    before any data is prepared); see ``lamina.train.trainer.check_out_dir``.
    """
    started = time.perf_counter()
    check_out_dir(run.train.out_dir, resume=resume, overwrite=overwrite)
    manifest = prepare_data(run, progress=run.train.progress)
    tokenizer = manifest.load_tokenizer()
    sc = run.span_corruption
    n_spans = num_noise_spans(
        input_and_target_lengths(sc.input_length, sc.noise_density, sc.mean_noise_span_length)[0],
        sc.noise_density, sc.mean_noise_span_length,
    )  # fmt: skip
    if (run.train.objective or _default_objective(run.model.arch)) == "masked_lm":
        tokenizer = with_mask_token(tokenizer)
    elif (run.train.objective or _default_objective(run.model.arch)) == "span_corruption":
        tokenizer = with_sentinel_tokens(tokenizer, n_spans)  # <extra_id_0> ... as T5 lays them out
    model, generation = build_model(run, tokenizer)
    objective_name = run.train.objective or _default_objective(model.config.arch)
    if objective_name == "masked_lm" and tokenizer.mask_token_id is None:  # an --init encoder
        tokenizer = with_mask_token(tokenizer)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ConfigError(
                f"masked_lm needs a mask token, and the init model's tokenizer has none and no room for "
                f"one (vocab_size={model.config.vocab_size}); use a tokenizer with a mask token"
            )
    if objective_name == "span_corruption" and tokenizer.token_to_id("<extra_id_0>") is None:  # --init
        tokenizer = with_sentinel_tokens(tokenizer, n_spans)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ConfigError(
                f"span_corruption needs {n_spans} sentinel tokens, and the init model's tokenizer has none "
                f"and no room for them (vocab_size={model.config.vocab_size}); use a T5 tokenizer"
            )
    want = {"masked_lm": "encoder", "causal_lm": "decoder", "span_corruption": "encoder-decoder"}[
        objective_name
    ]
    if model.config.arch != want:
        why = {
            "decoder": "an encoder sees the next token, so it cannot learn causal LM",
            "encoder": "masked LM trains bidirectional encoders",
            "encoder-decoder": "span corruption trains an encoder-decoder (e.g. --model.preset t5-small)",
        }[want]
        raise ConfigError(
            f"train.objective={objective_name!r} needs model.arch={want!r}, got {model.config.arch!r}: "
            f"{why}; leave train.objective unset to follow the model"
        )
    if objective_name == "span_corruption":
        return _pretrain_spans(run, model, tokenizer, manifest, generation, resume, overwrite, started)
    run = dataclasses.replace(run, model=model.config)  # run.yaml records the model actually built
    tcfg = run.train
    seq_len = tcfg.seq_len or model.config.max_seq_len
    if seq_len > model.config.max_seq_len:
        raise ConfigError(
            f"train.seq_len={seq_len} is longer than the model's context window max_seq_len="
            f"{model.config.max_seq_len}: lower train.seq_len or raise model.max_seq_len"
        )
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    train_tokens = TokenShards.open(manifest.root, "train")
    global_batch = tcfg.batch_size * tcfg.grad_accum_steps * world
    needed = global_batch * seq_len + 1
    if len(train_tokens) < needed:
        raise DataError(
            f"the training split has {len(train_tokens):,} tokens, fewer than one step needs "
            f"({global_batch} sequences x {seq_len} tokens + 1 = {needed:,}): lower train.batch_size, "
            "train.grad_accum_steps or train.seq_len, or add data"
        )
    # one micro-batch index = one CausalBatches step of batch_size x (world x accumulation) windows
    batches = CausalBatches(
        train_tokens, tcfg.batch_size, seq_len, seed=tcfg.seed, rank=rank, world_size=world
    )
    source: Any = _MicroBatches(batches, tcfg.grad_accum_steps)
    val_tokens = TokenShards.open(manifest.root, "val") if manifest.splits["val"].tokens > seq_len else None
    objective: Objective = causal_lm(tcfg.label_smoothing)
    masker = None
    if objective_name == "masked_lm":
        assert tokenizer.mask_token_id is not None
        masker = MaskedBatches(
            source,
            mask_id=tokenizer.mask_token_id,
            vocab_size=tokenizer.vocab_size,
            special=special_ids(tokenizer),
            probability=tcfg.mlm_probability,
            word_starts=word_start_table(tokenizer) if tcfg.whole_word_masking else None,
            seed=tcfg.seed + rank,
        )
        source, objective = masker, masked_lm()

    def val() -> Any:
        assert val_tokens is not None
        for x, y in val_batches(
            val_tokens, tcfg.batch_size, seq_len, rank, world, max_batches=tcfg.eval_batches
        ):
            if len(x):
                yield {"input_ids": x, "targets": y}

    def masked_val() -> Any:
        assert masker is not None
        return masker.masked_stream({"input_ids": b["input_ids"]} for b in val())

    steps = tcfg.max_steps
    if tcfg.epochs is not None:
        steps = max(1, math.ceil(tcfg.epochs * (len(train_tokens) - 1) / (global_batch * seq_len)))
    result = train(
        model,
        tcfg,
        source,
        objective,
        (masked_val if masker is not None else val) if val_tokens is not None else None,
        tokens_per_batch=tcfg.batch_size * seq_len,
        total_steps=steps,
        tokenizer=tokenizer,
        run_config=run.to_dict(),
        resume=resume,
        overwrite=overwrite,
        generation=generation,
    )
    result.elapsed = time.perf_counter() - started
    return model, tokenizer, result


class _MicroBatches:
    """Adapts ``CausalBatches`` to the trainer: micro-batch ``i`` is step ``i`` of a source whose global
    batch is batch_size x world_size, so accumulation and data parallelism see disjoint windows."""

    def __init__(self, batches: CausalBatches, accum: int) -> None:
        self.batches, self.accum = batches, accum

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        x, y = self.batches.batch_at(index)
        return {"input_ids": x, "targets": y}


def _pretrain_spans(
    run: RunConfig, model: Transformer, tokenizer: Tokenizer, manifest: Manifest,
    generation: GenerationConfig | None, resume: bool, overwrite: bool, started: float,
) -> tuple[Transformer, Tokenizer, TrainResult]:  # fmt: skip
    """Span-corruption pretraining of an encoder-decoder (single process) on the token shards."""
    run = dataclasses.replace(run, model=model.config)
    tcfg, sc = run.train, run.span_corruption
    _, target_length = input_and_target_lengths(sc.input_length, sc.noise_density, sc.mean_noise_span_length)
    if max(sc.input_length, target_length) > model.config.max_seq_len:
        raise ConfigError(
            f"span_corruption.input_length={sc.input_length} is longer than the model's max_seq_len="
            f"{model.config.max_seq_len}: lower span_corruption.input_length or raise model.max_seq_len"
        )
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 or tcfg.grad_accum_steps > 1:
        raise ConfigError(
            "span-corruption pretraining runs in one process without accumulation for now; "
            "launch without torchrun and leave train.grad_accum_steps at 1"
        )
    kw: dict[str, Any] = {"decoder_start_token_id": model.config.decoder_start_token_id, "seed": tcfg.seed}
    train_b = SpanCorruptionBatches(
        TokenShards.open(manifest.root, "train"), tokenizer, tcfg.batch_size, sc, **kw
    )
    val_b = None
    if manifest.splits["val"].tokens >= train_b.tokens_length:
        val_b = SpanCorruptionBatches(
            TokenShards.open(manifest.root, "val"), tokenizer, tcfg.batch_size, sc, **kw
        )

    def val() -> Any:
        assert val_b is not None
        return itertools.islice(val_b.eval_batches(), tcfg.eval_batches)

    steps = tcfg.max_steps
    if tcfg.epochs is not None:
        steps = max(1, math.ceil(tcfg.epochs * train_b.steps_per_epoch))
    result = train(
        model, tcfg, train_b, seq2seq(tcfg.label_smoothing), val if val_b is not None else None,
        tokens_per_batch=tcfg.batch_size * (sc.input_length + target_length), total_steps=steps,
        tokenizer=tokenizer, run_config=run.to_dict(), resume=resume, overwrite=overwrite, generation=generation,
        data_stats={"train_windows": train_b.n_windows, "input_length": sc.input_length,
                    "target_length": target_length, "sentinels": len(train_b.sentinels)},
    )  # fmt: skip
    result.elapsed = time.perf_counter() - started
    return model, tokenizer, result


def _default_objective(arch: str) -> str:
    return {"encoder": "masked_lm", "encoder-decoder": "span_corruption"}.get(arch, "causal_lm")


def _round_up(n: int, multiple: int) -> int:
    return multiple * math.ceil(n / multiple)
