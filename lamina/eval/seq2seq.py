"""Sequence-to-sequence metrics (BLEU, chrF, ROUGE-1/2/L, exact match) and a runner that scores any model on
a pair file.

    scores = score_pairs(["the cat sat"], ["the cat sat down"])
    # {"bleu": ..., "chrf": ..., "rouge1": ..., "rouge2": ..., "rougeL": ..., "exact_match": 0.0, "n": 1}
    result = evaluate_pairs(predict, "test.jsonl")       # predict: list[str] -> list[str], any model
    result = evaluate_pairs(generation_predictor(lamina.load("out/best")), "test.jsonl")
    metrics = pair_metrics(tokenizer, val_pairs)          # the trainer's eval_metrics(model) for seq2seq

The numbers are the reference libraries' own, unchanged, on their own scales:

- ``bleu``: ``sacrebleu.corpus_bleu(predictions, [references]).score`` (0-100; corpus-level, 13a
  tokenization, exponential smoothing: sacrebleu's defaults, Post 2018);
- ``chrf``: ``sacrebleu.corpus_chrf(predictions, [references]).score`` (0-100; chrF2, character 6-grams,
  Popović 2015), which also scores text without spaces between words;
- ``rouge1``, ``rouge2``, ``rougeL``: the mean over pairs of the F-measure of
  ``rouge_score.rouge_scorer.RougeScorer([...], use_stemmer=True).score(reference, prediction)`` (0-1;
  Lin 2004; stemming as in transformers' summarization examples). rouge-score's default tokenizer keeps
  only ``[a-z0-9]`` after lowercasing, so text in other scripts scores 0; ``rouge_tokenizer="unicode"``
  splits on any non-word character instead (Unicode letters kept, no stemming);
- ``exact_match``: the fraction of pairs whose prediction equals the reference after stripping leading
  and trailing whitespace (0-1).

The reference libraries are the ``seq2seq`` extra (``pip install 'lamina[seq2seq]'``), imported on first use.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lamina.errors import ConfigError, LaminaError

if TYPE_CHECKING:
    from torch import nn

    from lamina.checkpoint.load import LoadedModel
    from lamina.config import GenerationConfig
    from lamina.data.pairs import PairData
    from lamina.tokenizer import Tokenizer

__all__ = [
    "PAIR_METRICS",
    "ROUGE_TYPES",
    "MissingExtraError",
    "PairEvaluation",
    "evaluate_pairs",
    "generation_predictor",
    "pair_metrics",
    "rouge_scores",
    "score_pairs",
    "seq2seq_predictor",
    "trained_source_len",
    "with_controls",
]

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
RougeTokenizer = Literal["default", "unicode"]
# the figures pair_metrics returns at each evaluation (score_pairs' keys but n, prefixed val_)
PAIR_METRICS = tuple(f"val_{k}" for k in ("bleu", "chrf", *ROUGE_TYPES, "exact_match"))
Predict = Callable[[list[str]], list[str]]


class MissingExtraError(LaminaError, ImportError):
    """An optional dependency of the capability asked for is not installed."""


def _import(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        package = {"rouge_score": "rouge-score"}.get(name, name)
        raise MissingExtraError(
            f"{package} is not installed; seq2seq metrics need it: pip install 'lamina[seq2seq]'"
        ) from None


class _UnicodeTokenizer:
    """Lowercased words of any script: runs of Unicode word characters (``\\w``), no stemming."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"\w+", text.lower())


def rouge_scores(
    predictions: Sequence[str],
    references: Sequence[str],
    rouge_tokenizer: RougeTokenizer = "default",
) -> dict[str, list[float]]:
    """Per-pair ROUGE-1/2/L F-measures (0-1) from ``rouge_score`` (see the module docstring)."""
    rouge_scorer = _import("rouge_score.rouge_scorer")
    if rouge_tokenizer == "default":
        scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    elif rouge_tokenizer == "unicode":
        scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=_UnicodeTokenizer())
    else:
        raise ConfigError(f"rouge_tokenizer={rouge_tokenizer!r} must be 'default' or 'unicode'")
    out: dict[str, list[float]] = {k: [] for k in ROUGE_TYPES}
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)  # rouge-score's order: (target, prediction)
        for k in ROUGE_TYPES:
            out[k].append(float(scores[k].fmeasure))
    return out


def score_pairs(
    predictions: Sequence[str],
    references: Sequence[str],
    rouge_tokenizer: RougeTokenizer = "default",
) -> dict[str, float]:
    """BLEU, chrF, ROUGE-1/2/L, exact match and the count ``n`` of ``predictions`` against ``references``
    (one reference per prediction), on the scales of the module docstring.

    Raises ``ConfigError`` when the lists differ in length or are empty, and ``MissingExtraError`` (one line
    naming ``pip install 'lamina[seq2seq]'``) without sacrebleu or rouge-score.
    """
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ConfigError(
            f"{len(predictions)} predictions but {len(references)} references; fix: one reference per prediction"
        )
    if not predictions:
        raise ConfigError("no predictions to score; fix: pass at least one (prediction, reference) pair")
    bad = [x for x in (*predictions, *references) if not isinstance(x, str)][:1]
    if bad:
        raise ConfigError(
            f"predictions and references must be strings, got {type(bad[0]).__name__} {bad[0]!r:.40}"
        )
    sacrebleu = _import("sacrebleu")
    rouge = rouge_scores(predictions, references, rouge_tokenizer)
    n = len(predictions)
    out = {
        "bleu": float(sacrebleu.corpus_bleu(predictions, [references]).score),
        "chrf": float(sacrebleu.corpus_chrf(predictions, [references]).score),
    }
    out |= {k: sum(v) / n for k, v in rouge.items()}
    out["exact_match"] = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)) / n
    out["n"] = n
    return out


@dataclass
class PairEvaluation:
    """What ``evaluate_pairs`` did: the scores (``score_pairs``'s dict) and every pair with its prediction."""

    scores: dict[str, float]
    sources: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    predictions: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """The scores on one line: ``n=200 bleu=12.3 chrf=40.1 rouge1=0.412 ... exact_match=0.050``."""
        s = self.scores
        head = f"n={int(s['n'])} bleu={s['bleu']:.2f} chrf={s['chrf']:.2f} "
        return head + " ".join(f"{k}={s[k]:.4f}" for k in (*ROUGE_TYPES, "exact_match"))


def evaluate_pairs(
    predict: Predict,
    pairs: PairData | str | Path,
    *,
    source_field: str = "source",
    target_field: str = "target",
    batch_size: int = 32,
    limit: int | None = None,
    rouge_tokenizer: RougeTokenizer = "default",
    progress: Callable[[int, int], None] | None = None,
) -> PairEvaluation:
    """Run ``predict`` (a batch of source texts -> one output text each: any model, or a baseline) over
    ``pairs`` (a ``PairData`` or a pair file, read by ``lamina.data.pairs.read_pairs`` with the fields
    named) ``batch_size`` sources at a time, and score the outputs against the targets (``score_pairs``).

    ``limit`` scores the first ``limit`` pairs only; ``progress(done, total)`` is called after each batch.
    Raises ``ConfigError`` when ``predict`` returns a different number of texts than it was given.
    """
    from lamina.data.pairs import PairData, read_pairs

    data = pairs if isinstance(pairs, PairData) else read_pairs(pairs, source_field, target_field)
    if limit is not None:
        data = data.subset(range(min(limit, len(data))))
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    outputs: list[str] = []
    for start in range(0, len(data), batch_size):
        batch = data.sources[start : start + batch_size]
        got = list(predict(batch))
        if len(got) != len(batch):
            raise ConfigError(
                f"predict returned {len(got)} texts for {len(batch)} sources; fix: one per source"
            )
        outputs += got
        if progress is not None:
            progress(len(outputs), len(data))
    scores = score_pairs(outputs, data.targets, rouge_tokenizer)
    return PairEvaluation(scores, list(data.sources), list(data.targets), outputs)


def generation_predictor(
    lm: LoadedModel,
    *,
    config: GenerationConfig | None = None,
    chat: bool | None = False,
    max_batch_size: int | None = None,
    **controls: Any,
) -> Predict:
    """A ``predict`` callable over a loaded model; each output is stripped of surrounding whitespace.

    Decoding: ``config``, else the model's own controls (its generation.yaml), else greedy; ``controls``
    (``GenerationConfig`` field names, values read by the field's type: ``max_new_tokens=32``,
    ``num_beams="4"``) replace fields on top. They are checked here, once, before any text is decoded.

    An encoder-decoder translates each text (``seq2seq_predictor``: a batch through
    ``lamina.generate.seq2seq``; stop strings, beams and logprobs are not there yet); a decoder continues
    it (``chat=False``: no chat template), each batch of texts decoding together on the generation engine
    (``lamina.generate.batch.generate_batch``).

    Raises ``ConfigError`` for a name that is not a ``GenerationConfig`` field (naming the nearest), a
    value its field refuses, or controls the model cannot take (token ids outside its vocabulary).
    """
    from lamina.generate.text import generation_config, model_defaults

    if lm.model.config.arch == "encoder-decoder":
        from lamina.config import GenerationConfig

        if lm.tokenizer is None:
            raise ConfigError(f"{lm.entry.name} has no tokenizer; texts cannot be encoded for it")
        # the checkpoint's own decoding controls, else greedy; the controls given on top
        base = (
            config
            or model_defaults(lm)
            or GenerationConfig(
                temperature=0.0,
                max_new_tokens=lm.generation.max_new_tokens,
                eos_token_ids=lm.generation.eos_token_ids,
            )
        )
        decoding = with_controls(base, controls)
        decoding.check_token_ids(lm.model.config.vocab_size)
        return seq2seq_predictor(
            lm.model, lm.tokenizer, config=decoding, max_source_len=trained_source_len(lm)
        )

    from lamina.generate.batch import MAX_BATCH_SIZE, generate_batch

    decoding = generation_config(lm, config, **controls)  # every control checked now, not at the first batch
    rows_at_once = max_batch_size or MAX_BATCH_SIZE

    def predict(texts: list[str]) -> list[str]:
        # decoding as resolved above, exactly (its None fields stay None; not merged and checked again)
        rows = generate_batch(lm, [{"prompt": t} for t in texts], chat=chat, max_batch_size=rows_at_once,
                              config=decoding)  # fmt: skip
        out = [""] * len(texts)
        for row in rows:
            if row.get("n", 0) == 0:  # the first choice of each request
                out[row["index"]] = row["text"].strip()
        return out

    return predict


def with_controls(config: GenerationConfig, controls: Mapping[str, Any]) -> GenerationConfig:
    """``config`` with ``controls`` (``GenerationConfig`` field names; None values skipped) replacing its
    fields, built through ``lamina.fields.build`` as flags and YAML are: values read by the field's type,
    the whole config validated. Raises ``ConfigError`` for an unknown name (naming the nearest field) or
    a value its field refuses."""
    from lamina.config import GenerationConfig, from_dict, to_dict

    given = {k: v for k, v in controls.items() if v is not None}
    return from_dict(GenerationConfig, {**to_dict(config), **given}) if given else config


def trained_source_len(lm: LoadedModel) -> int:
    """The source length (tokens, eos included) ``lm``'s encoder-decoder was fine-tuned on: the
    ``seq2seq.max_source_len`` of the run.yaml a lamina checkpoint folder holds (``lamina finetune --task
    seq2seq`` writes it, capped at ``max_seq_len`` as training cut the pairs), else the model's
    ``max_seq_len`` (a pretrained or imported model: the length it was configured for)."""
    import yaml

    from lamina.train.trainer import read_run_config

    limit = lm.model.config.max_seq_len
    if lm.entry.format != "lamina":
        return limit
    try:
        run = read_run_config(lm.entry.path)
    except (OSError, yaml.YAMLError):
        return limit
    trained = (run.get("seq2seq") or {}).get("max_source_len")
    return min(int(trained), limit) if isinstance(trained, int) and trained > 0 else limit


def seq2seq_predictor(
    model: nn.Module,
    tokenizer: Tokenizer,
    *,
    config: GenerationConfig | None = None,
    max_source_len: int = 512,
    **controls: Any,
) -> Predict:
    """A ``predict`` callable over an encoder-decoder ``model`` (``arch="encoder-decoder"``; a DDP/FSDP
    wrapper is looked through): each batch of texts is encoded as ``lamina.data.pairs.PairBatches``
    encodes sources (tokens + eos, cut to ``max_source_len``), decoded together by
    ``lamina.generate.seq2seq.generate_seq2seq`` (the encoder once, cached decoder) with ``config`` (default:
    greedy, stopping at the tokenizer's eos, max_new_tokens 64, ``controls`` on top) and turned back
    into text without special tokens, stripped. ``controls`` replace fields of ``config`` as in
    ``generation_predictor`` (``with_controls``). Raises ``ConfigError`` for a model of another arch, and
    for a control that is not a ``GenerationConfig`` field or a value its field refuses.
    """
    from lamina.config import GenerationConfig
    from lamina.generate.seq2seq import generate_seq2seq

    net: Any = getattr(model, "module", model)  # DDP / FSDP wrappers keep the model as .module
    if config is None:
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        config = GenerationConfig(temperature=0.0, max_new_tokens=64, eos_token_ids=eos)
    config = with_controls(config, controls)
    eos_id = tokenizer.eos_token_id

    def predict(texts: list[str]) -> list[str]:
        if not texts:
            return []
        # as in training (PairBatches): a "</s>" written in a source is text, never the control token
        ids = tokenizer.encode_batch(list(texts), add_special_tokens=False, split_special_tokens=True)
        if eos_id is not None:
            ids = [[*row[: max_source_len - 1], eos_id] for row in ids]
        else:
            ids = [row[:max_source_len] or [0] for row in ids]
        outs = generate_seq2seq(net, ids, config, tokenizer)
        return [tokenizer.decode(o[0].token_ids, skip_special_tokens=True).strip() for o in outs]

    return predict


def pair_metrics(
    tokenizer: Tokenizer,
    pairs: PairData,
    *,
    config: GenerationConfig | None = None,
    limit: int | None = 200,
    batch_size: int = 32,
    max_source_len: int = 512,
    rouge_tokenizer: RougeTokenizer = "default",
) -> Callable[[nn.Module], dict[str, float]]:
    """The trainer's ``eval_metrics`` for a seq2seq run: at each evaluation, the outputs decoded with
    ``config`` (default: greedy, 64 new tokens; the tokenizer's end-of-generation ids added, as the
    trainer adds them to a checkpoint's generation.yaml) by ``seq2seq_predictor`` for the first ``limit``
    validation ``pairs`` (None: all), scored by ``score_pairs``; the keys get a ``val_`` prefix
    (``PAIR_METRICS``: ``val_bleu``, ``val_rougeL``, ...; ``n`` left out)."""
    from lamina.checkpoint.eos import eos_token_ids
    from lamina.config import GenerationConfig

    config = config or GenerationConfig(temperature=0.0, max_new_tokens=64)
    config = replace(config, eos_token_ids=eos_token_ids(config.eos_token_ids, tokenizer=tokenizer))

    def metrics(model: nn.Module) -> dict[str, float]:
        predict = seq2seq_predictor(model, tokenizer, config=config, max_source_len=max_source_len)
        result = evaluate_pairs(
            predict, pairs, batch_size=batch_size, limit=limit, rouge_tokenizer=rouge_tokenizer
        )
        return {f"val_{k}": v for k, v in result.scores.items() if k != "n"}

    return metrics
