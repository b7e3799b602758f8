"""The seq2seq objective: teacher-forced, label-smoothed cross-entropy of an encoder-decoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lamina.config import ModelConfig, TrainConfig
from lamina.data.pairs import PairBatches
from lamina.data.synthetic import reverse_pairs, symbol_tokenizer
from lamina.errors import ConfigError
from lamina.model.transformer import Transformer
from lamina.train.objectives import seq2seq


@pytest.fixture(scope="module")
def setup() -> tuple[Transformer, PairBatches]:
    torch.manual_seed(0)
    tok = symbol_tokenizer()
    model = Transformer(ModelConfig.preset("t5-tiny", vocab_size=len(tok)))
    batches = PairBatches(tok, reverse_pairs(256, seed=0), batch_size=16, decoder_start_token_id=0)
    return model, batches


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_is_the_mean_over_target_tokens(
    setup: tuple[Transformer, PairBatches], smoothing: float
) -> None:
    model, batches = setup
    b = batches.batch(0)
    loss, n = seq2seq(label_smoothing=smoothing)(model, b)
    assert n == int((b["labels"] != -100).sum()) and n < b["labels"].numel()  # padding is not scored
    logits = model(
        b["input_ids"], attention_mask=b["attention_mask"], decoder_input_ids=b["decoder_input_ids"]
    )
    keep = b["labels"] != -100
    logp = logits[keep].float().log_softmax(-1)
    nll = -logp.gather(1, b["labels"][keep][:, None]).squeeze(1)
    want = ((1 - smoothing) * nll + smoothing * -logp.mean(-1)).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_one_step_decreases_the_loss(setup: tuple[Transformer, PairBatches]) -> None:
    model, batches = setup
    model = Transformer(model.config)
    model.load_state_dict(setup[0].state_dict())
    objective = seq2seq(label_smoothing=0.1)
    b = batches.batch(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before, _ = objective(model, b)
    before.backward()
    opt.step()
    after, _ = objective(model, b)
    assert after.item() < before.item() - 0.01


def test_a_decoder_model_is_one_line_naming_the_arch(setup: tuple[Transformer, PairBatches]) -> None:
    decoder = Transformer(ModelConfig.preset("tiny", vocab_size=24))
    with pytest.raises(
        ConfigError, match=r"needs an encoder-decoder model .*arch='encoder-decoder'.*got arch='decoder'"
    ):
        seq2seq()(decoder, setup[1].batch(0))


def test_the_trainer_runs_pair_batches(setup: tuple[Transformer, PairBatches], tmp_path: Path) -> None:
    from lamina.train.trainer import train

    model = Transformer(setup[0].config)
    batches = setup[1]
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=20, lr=3e-3, warmup_steps=2, eval_every=10, save_every=20,
                      log_every=5, progress=False)  # fmt: skip
    res = train(model, cfg, batches, seq2seq(0.1), lambda: batches.eval_batches(), tokens_per_batch=16 * 18)
    assert res.steps == 20 and res.val_losses[-1][1] < res.val_losses[0][1]
