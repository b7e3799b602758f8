"""Run by tests/train/test_distributed.py, alone or under torchrun: a few training steps on a fixed
global batch, each process taking its slice of the rows. Not a test module itself."""

from __future__ import annotations

import os
import sys

import torch

from lamina.config import ModelConfig, TrainConfig
from lamina.model.transformer import Transformer
from lamina.train.objectives import causal_lm
from lamina.train.trainer import train

GLOBAL_BATCH, SEQ = 8, 32


class Slice:
    """Global batch i is seeded by i; process r of w takes rows [r*B/w, (r+1)*B/w)."""

    def __init__(self) -> None:
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        x = torch.randint(0, 64, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(index))
        per = GLOBAL_BATCH // self.world
        x = x[self.rank * per : (self.rank + 1) * per]
        return {"input_ids": x[:, :-1], "targets": x[:, 1:]}


if __name__ == "__main__":
    out, parallel = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=64, max_seq_len=SEQ))
    cfg = TrainConfig(
        out_dir=out, max_steps=5, lr=1e-3, warmup_steps=0, log_every=1, save_every=5, eval_every=10**6,
        progress=False, parallel=parallel, batch_size=GLOBAL_BATCH // int(os.environ.get("WORLD_SIZE", 1)),
    )  # fmt: skip
    train(model, cfg, Slice(), causal_lm(), tokens_per_batch=cfg.batch_size * SEQ)
