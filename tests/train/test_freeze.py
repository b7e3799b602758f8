"""Freezing by block index, range or name glob (``lamina.train.freeze``), in the one trainer, so it holds
for every task: pretraining's causal LM here, fine-tuning heads and SFT in their own tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lamina.config import ModelConfig, TrainConfig
from lamina.errors import ConfigError
from lamina.model.transformer import Transformer
from lamina.train.freeze import freeze
from lamina.train.objectives import causal_lm
from lamina.train.trainer import train


def _model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.preset("llama-tiny", vocab_size=64, d_model=32, n_heads=2, n_kv_heads=2, d_ff=64,
                             n_layers=3, max_seq_len=16)  # fmt: skip
    return Transformer(cfg)


def test_specs_select_blocks_ranges_and_globs() -> None:
    m = _model()
    names = freeze(m, ["0", "2-2", "tok_emb.*", "*.mlp_norm.*"])
    assert "tok_emb.weight" in names and "blocks.1.mlp_norm.weight" in names
    assert all(n.startswith(("blocks.0.", "blocks.2.", "tok_emb.")) or "mlp_norm" in n for n in names)
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen == set(names)
    assert any(p.requires_grad for n, p in m.named_parameters() if n.startswith("blocks.1.attn."))


@pytest.mark.parametrize(("spec", "message"), [("3", "0..2"), ("1-0", "0..2"), ("nothing.*", "matches no")])
def test_bad_spec_is_one_clear_error(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        freeze(_model(), [spec])


class _Batches:
    def batch(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(index)
        x = torch.randint(0, 64, (4, 17), generator=g)
        return {"input_ids": x[:, :-1], "targets": x[:, 1:]}


def test_causal_lm_training_leaves_frozen_weights_bit_identical(tmp_path: Path) -> None:
    m = _model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cfg = TrainConfig(out_dir=str(tmp_path / "out"), max_steps=3, lr=1e-2, warmup_steps=0, progress=False,
                      freeze=["0-1", "tok_emb.*"], weight_decay=0.1)  # fmt: skip
    train(m, cfg, _Batches(), causal_lm(), tokens_per_batch=64)
    after = m.state_dict()
    frozen = [k for k in before if k.startswith(("blocks.0.", "blocks.1.", "tok_emb."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["blocks.2.attn.q_proj.weight"], after["blocks.2.attn.q_proj.weight"])
