"""``lamina demo``: the embedded corpus -> a BPE tokenizer -> a small GPT trained for a few minutes on a
CPU -> validation perplexity falling below a unigram baseline -> samples of generated Python."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lamina.config import ModelConfig, TrainConfig
from lamina.data.batches import TokenShards
from lamina.data.corpus import DataConfig
from lamina.generate.text import sample_text
from lamina.train.objectives import unigram_baseline_loss
from lamina.train.pretrain import RunConfig, pretrain

PROMPTS = ["def ", "import os\n", "class ", "    return "]


@dataclass
class DemoResult:
    """What the demo measured."""

    unigram_loss: float
    val_losses: list[tuple[int, float]]
    samples: list[str]
    out_dir: Path
    seconds: float = 0.0  # wall time of the whole demo: data, tokenizer, training, sampling

    @property
    def final_val_loss(self) -> float:
        """The last validation loss."""
        return self.val_losses[-1][1]


def demo_run(
    out: str | Path = "runs/demo",
    steps: int = 300,
    max_bytes: int = 3_000_000,
    vocab_size: int = 8192,
    seq_len: int = 128,
    batch_size: int = 16,
    eval_every: int = 50,
    progress: bool = True,
) -> RunConfig:
    """The demo's run config: a 4-layer GPT (d_model 256) on the standard library's source.

    Args:
        out: output folder (data shards, checkpoints, metrics.jsonl, curves.png)
        steps: training steps (300: about three minutes on 2 CPU cores)
        max_bytes: bytes of standard-library source to read
        vocab_size: size of the byte-level BPE vocabulary trained first
        seq_len: tokens per training sequence (also the model's context window)
        batch_size: sequences per step
        eval_every: validate every N steps
        progress: show progress bars
    """
    out = Path(out)
    model = ModelConfig(n_layers=4, d_model=256, n_heads=4, max_seq_len=seq_len, vocab_size=vocab_size)
    data = DataConfig(
        out=str(out / "data"),
        builtin="stdlib",
        max_bytes=max_bytes,
        train_tokenizer=vocab_size,
        val_fraction=0.02,
    )
    train = TrainConfig(
        out_dir=str(out / "model"),
        lr=2e-3,
        warmup_steps=min(30, steps // 10),
        max_steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        eval_every=eval_every,
        eval_batches=10,
        save_every=max(steps // 2, 1),
        log_every=10,
        progress=progress,
    )
    return RunConfig(model=model, data=data, train=train)


def demo(run: RunConfig, samples: int = len(PROMPTS), max_new_tokens: int = 48) -> DemoResult:
    """Run the demo end to end; returns the baseline, the validation curve, the samples and the time."""
    start = time.perf_counter()
    model, tokenizer, result = pretrain(run, overwrite=True)  # a demo starts over: it replaces its last run
    data = Path(run.data.out)
    train_ids = torch.from_numpy(np.asarray(TokenShards.open(data, "train")[:], dtype=np.int64))
    val_ids = torch.from_numpy(np.asarray(TokenShards.open(data, "val")[:], dtype=np.int64))
    baseline = unigram_baseline_loss(train_ids, val_ids, model.config.vocab_size)
    model.eval()
    texts = [
        sample_text(model, tokenizer, p, max_new_tokens, temperature=0.8, top_k=40, seed=i)
        for i, p in enumerate(PROMPTS[:samples])
    ]
    out = Path(run.train.out_dir)
    return DemoResult(baseline, result.val_losses, texts, out, time.perf_counter() - start)


def report(res: DemoResult) -> str:
    """A short human summary, ending with the wall time (``done in N s``)."""
    lines = [
        f"unigram baseline (no context): loss {res.unigram_loss:.3f}, perplexity {math.exp(res.unigram_loss):.1f}"
    ]
    for step, v in res.val_losses:
        lines.append(f"  step {step:>5}: validation loss {v:.3f}, perplexity {math.exp(v):.1f}")
    gain = 1 - res.final_val_loss / res.unigram_loss
    if gain >= 0.005:
        lines.append(f"final validation loss is {gain:.0%} below the unigram baseline")
    else:  # too few steps to beat counting tokens
        where = f"{-gain:.0%} above" if gain <= -0.005 else "level with"
        lines.append(f"final validation loss is {where} the unigram baseline: train for more steps")
    if (res.out_dir / "curves.png").is_file():
        lines.append(f"checkpoints, metrics.jsonl and curves.png: {res.out_dir}")
    else:
        lines.append(
            f"checkpoints and metrics.jsonl: {res.out_dir} (for curves.png: pip install 'lamina[train]')"
        )
    lines.append("\nsamples (temperature 0.8, top-k 40):")
    for s in res.samples:
        lines.append("-" * 60 + "\n" + s)
    lines.append("-" * 60 + f"\ndone in {res.seconds:.0f} s")
    return "\n".join(lines)
