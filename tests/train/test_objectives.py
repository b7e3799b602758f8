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


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_bf16_cross_entropy_matches_the_fp32_upcast(label_smoothing: float) -> None:
    """bf16 logits with a gradient take the chunked path (token_cross_entropy's _ReducedCrossEntropy,
    several chunks here): same loss and gradient as F.cross_entropy on the fp32 upcast."""
    import lamina.train.objectives as objectives

    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 50, 1000, generator=g)).bfloat16().requires_grad_()
    targets = torch.randint(0, 1000, (3, 50), generator=g)
    targets[0, :7] = -100
    rows = objectives._CHUNK_ELEMENTS
    objectives._CHUNK_ELEMENTS = 16 * 1000  # 16 rows per chunk: 10 chunks, the last one short
    try:
        loss, n = objectives.token_cross_entropy(logits, targets, label_smoothing=label_smoothing)
    finally:
        objectives._CHUNK_ELEMENTS = rows
    (2 * loss).backward()
    grad, logits.grad = logits.grad, None
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                            label_smoothing=label_smoothing, reduction="sum") / n  # fmt: skip
    (2 * ref).backward()
    assert n == 143 and torch.allclose(loss, ref, rtol=1e-6)
    assert grad is not None and logits.grad is not None and grad.dtype == torch.bfloat16
    assert torch.allclose(grad.float(), logits.grad.float(), rtol=2**-7, atol=1e-12)  # a bf16 rounding apart
    assert grad[0, :7].abs().sum() == 0  # ignored targets: no gradient
