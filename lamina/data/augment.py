"""Data augmentation for seq2seq pairs: back-translation (Sennrich et al. 2016, "Improving Neural Machine
Translation Models with Monolingual Data").

A reverse model (target language -> source language) translates monolingual target-side text; each
output becomes the synthetic source of a pair whose target is the real text. Training on these pairs
teaches the forward model to produce fluent targets.

    pairs = back_translate(translate, ["Le chat dort.", ...])     # translate: list[str] -> list[str]
    report = augment(AugmentConfig(back_translate="out/fr-en", input="fr.txt", out="pairs.jsonl"))

``lamina data augment --back-translate MODEL --input target_side.txt --out pairs.jsonl`` runs ``augment``:
MODEL is loaded with ``lamina.load``; an encoder-decoder translates each batch of texts through
``lamina.generate.seq2seq`` (encoder once, cached decoder), a decoder continues each text on the batched
generation engine (``lamina.eval.seq2seq.generation_predictor``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamina.errors import ConfigError

if TYPE_CHECKING:
    from lamina.checkpoint.load import LoadedModel, LoadOptions

__all__ = ["AugmentConfig", "AugmentReport", "augment", "back_translate", "write_pairs"]


@dataclass
class AugmentConfig:
    """``lamina data augment``: what to translate, with which model, and where the pairs go."""

    back_translate: str = ""  # the reverse model (target -> source language): a path or models-directory name
    input: str = ""  # the target-side texts: a text file (one per line), a .jsonl file (its input_field) or -
    out: str = ""  # where the synthetic pairs go: a .jsonl file, one {source_field, target_field} per line
    input_field: str = "text"  # the key of each .jsonl input row that holds the text
    source_field: str = "source"  # the output rows' key of the synthetic source (the model's translation)
    target_field: str = "target"  # the output rows' key of the real target-side text
    max_batch_size: int = 16  # texts translated together in one batch

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size={self.max_batch_size} must be >= 1")
        if self.source_field == self.target_field:
            raise ConfigError(f"source_field and target_field are both {self.source_field!r}; name two keys")

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first required field left empty."""
        for name, what in (
            ("back_translate", "the reverse MODEL"),
            ("input", "the target-side text file"),
            ("out", "the output .jsonl file"),
        ):
            if not getattr(self, name):
                raise ConfigError(f"{name} is not set; fix: pass --{name.replace('_', '-')} ({what})")


def back_translate(
    translate: Callable[[list[str]], list[str]],
    target_texts: Sequence[str],
    *,
    batch_size: int = AugmentConfig.max_batch_size,
    progress: Callable[[int, int], None] | None = None,
) -> list[tuple[str, str]]:
    """(synthetic source, target) pairs: ``translate`` (target texts -> source texts, one each) runs on
    ``target_texts`` ``batch_size`` at a time; ``progress(done, total)`` after each batch.

    Raises ``ConfigError`` when ``translate`` returns a different number of texts than it was given.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    texts = list(target_texts)
    pairs: list[tuple[str, str]] = []
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        sources = list(translate(batch))
        if len(sources) != len(batch):
            raise ConfigError(
                f"the translation returned {len(sources)} texts for {len(batch)}; fix: one output per input"
            )
        pairs += zip(sources, batch, strict=True)
        if progress is not None:
            progress(len(pairs), len(texts))
    return pairs


def write_pairs(
    pairs: Sequence[tuple[str, str]],
    path: str | Path,
    source_field: str = "source",
    target_field: str = "target",
) -> Path:
    """Write ``pairs`` as JSONL (``{source_field: ..., target_field: ...}`` per line), atomically (a
    temporary file renamed at the end); the folder is created. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for source, target in pairs:
            f.write(json.dumps({source_field: source, target_field: target}, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


@dataclass
class AugmentReport:
    """What ``augment`` wrote."""

    out: Path
    pairs: int
    skipped_blank: int
    seconds: float

    def summary(self) -> str:
        """One line: how many pairs, where, how long."""
        skipped = f" ({self.skipped_blank} blank lines skipped)" if self.skipped_blank else ""
        return f"wrote {self.pairs} back-translated pairs to {self.out}{skipped} in {self.seconds:.1f} s"


def augment(
    cfg: AugmentConfig,
    *,
    lm: LoadedModel | None = None,
    load: LoadOptions | None = None,
    progress: Callable[[int, int], None] | None = None,
    **controls: Any,
) -> AugmentReport:
    """Back-translate ``cfg.input`` with ``cfg.back_translate`` (or the already loaded ``lm``) and write
    the pairs to ``cfg.out``. Blank input lines are skipped; ``controls`` are decoding controls
    (``GenerationConfig`` fields; default: the model's own, else greedy); ``load`` says how to load the model.

    Raises ``ConfigError`` for an unset field or bad controls, ``DataError`` for an unreadable input,
    ``CheckpointError`` for a model that does not load.
    """
    from lamina.data.texts import read_texts
    from lamina.eval.seq2seq import generation_predictor

    cfg.validate()
    started = time.perf_counter()
    texts = read_texts(cfg.input, cfg.input_field)
    kept = [t for t in texts if t.strip()]
    if not kept:
        raise ConfigError(f"--input {cfg.input!r} has no text to translate")
    if lm is None:
        from lamina.checkpoint.load import LoadOptions
        from lamina.checkpoint.load import load as load_model

        opts = load or LoadOptions()
        if opts.threads is not None:
            import torch

            torch.set_num_threads(opts.threads)
        lm = load_model(
            cfg.back_translate, dtype=opts.dtype, weights=opts.weights, compile=opts.compile,
            int4_kernel=opts.int4_kernel, head_topk=opts.head_topk,
        )  # fmt: skip
    predict = generation_predictor(lm, max_batch_size=cfg.max_batch_size, **controls)
    pairs = back_translate(predict, kept, batch_size=cfg.max_batch_size, progress=progress)
    out = write_pairs(pairs, cfg.out, cfg.source_field, cfg.target_field)
    return AugmentReport(out, len(pairs), len(texts) - len(kept), time.perf_counter() - started)
