"""Run by tests/train/test_distributed.py, alone or under torchrun: a few training steps on a fixed
global batch, each process taking its slice of the rows. Not a test module itself.

``python ddp_worker.py OUT PARALLEL [uneven]``: with ``uneven``, row j of a global batch is scored at
``COUNTS[j]`` positions only (the other targets -100), each process accumulates two micro-batches, and
the optimizer is plain SGD at lr 1 (the update is minus the gradient). With ``interrupt``, the last
process sends itself SIGINT while it reads the batch of step 3 (the others get no signal). With ``qlora``,
the model trains LoRA adapters over a frozen int8 base (``LoraConfig.base_weights``).

``python ddp_worker.py ROOT references``: the one-process runs of every mode, one after the other in this
one process (one interpreter start instead of three), into ROOT/plain, ROOT/uneven and ROOT/qlora."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys

import torch

from lamina.config import ModelConfig, TrainConfig
from lamina.model.lora import LoraConfig, apply_lora
from lamina.model.transformer import Transformer
from lamina.train.objectives import causal_lm
from lamina.train.trainer import train

GLOBAL_BATCH, SEQ = 8, 32
COUNTS = [2, 16, 1, 5, 0, 30, 3, 9]  # scored targets per row: uneven across micro-batches and processes


class Slice:
    """Global batch i is seeded by i; process r of w takes rows [r*B/w, (r+1)*B/w), cut into ``accum``
    micro-batches of consecutive rows."""

    def __init__(self, uneven: bool = False, accum: int = 1) -> None:
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.uneven, self.accum = uneven, accum

    interrupt_at: int | None = None

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        if index == self.interrupt_at and self.rank == self.world - 1:
            os.kill(os.getpid(), signal.SIGINT)
        step, micro = divmod(index, self.accum)
        x = torch.randint(0, 64, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(step))
        y = x[:, 1:].clone()
        if self.uneven:
            for j, n in enumerate(COUNTS):
                y[j, n:] = -100
        per = GLOBAL_BATCH // (self.world * self.accum)
        rows = slice((self.rank * self.accum + micro) * per, (self.rank * self.accum + micro + 1) * per)
        return {"input_ids": x[rows, :-1], "targets": y[rows]}


def run(out: str, parallel: str, mode: list[str]) -> None:
    """Train the fixed model for ``mode`` ([], ["uneven"], ["interrupt"] or ["qlora"]) into ``out``."""
    uneven = mode == ["uneven"]
    interrupt = mode == ["interrupt"]
    world = int(os.environ.get("WORLD_SIZE", 1))
    accum = 2 if uneven and world > 1 else 1
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=64, max_seq_len=SEQ))
    if mode == ["qlora"]:
        apply_lora(model, LoraConfig(r=4, lora_alpha=8, base_weights="int8"))
    extra: dict = dict(optimizer="sgd", momentum=0.0, lr=1.0, weight_decay=0.0, grad_clip=0.0,
                       schedule="constant", max_steps=2, save_every=2) if uneven else {}  # fmt: skip
    cfg = TrainConfig(**{**dict(
        out_dir=out, max_steps=5, lr=1e-3, warmup_steps=0, log_every=1, save_every=5, eval_every=10**6,
        progress=False, parallel=parallel, batch_size=GLOBAL_BATCH // (world * accum),
        grad_accum_steps=accum), **extra})  # fmt: skip
    source = Slice(uneven, accum)
    if interrupt:
        source.interrupt_at = 2
        cfg = dataclasses.replace(cfg, max_steps=50, save_every=1000)
    train(model, cfg, source, causal_lm(), tokens_per_batch=cfg.batch_size * SEQ)


if __name__ == "__main__":
    if sys.argv[2:] == ["references"]:
        for name, mode in (("plain", []), ("uneven", ["uneven"]), ("qlora", ["qlora"])):
            run(os.path.join(sys.argv[1], name), "none", mode)
    else:
        run(sys.argv[1], sys.argv[2], sys.argv[3:])
