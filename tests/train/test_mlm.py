"""Masked LM: 15% of tokens chosen (80% mask / 10% random / 10% kept), whole words together, loss only
on the chosen positions; `lamina pretrain` trains an encoder with it and `lamina fill-mask` reads it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lamina.cli.main import main
from lamina.config import ModelConfig
from lamina.data.masking import IGNORE, mask_tokens, special_ids, with_mask_token, word_start_table
from lamina.model.transformer import Transformer
from lamina.tokenizer import Tokenizer
from lamina.train.objectives import masked_lm


def test_mask_rates_and_specials() -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (64, 512))
    ids[:, 0], ids[:, -1] = 1, 2  # specials at both ends
    x, labels = mask_tokens(ids, mask_id=3, vocab_size=1000, generator=g, special=[1, 2])
    chosen = labels != IGNORE
    assert abs(chosen.float().mean().item() - 0.15) < 0.005
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(x[~chosen], ids[~chosen])
    n = chosen.sum().item()
    masked = (x[chosen] == 3).sum().item() / n
    kept = (x[chosen] == ids[chosen]).sum().item() / n
    assert abs(masked - 0.8) < 0.01 and abs(kept - 0.1) < 0.01  # the rest (~10%) is random tokens
    again, _ = mask_tokens(
        ids, mask_id=3, vocab_size=1000, generator=torch.Generator().manual_seed(0), special=[1, 2]
    )
    assert torch.equal(x, again)  # a seed fixes the masks (resume, fixed validation masks)


def test_whole_word_masking_hides_whole_words(minilm_path: Path) -> None:
    tok = Tokenizer.from_file(minilm_path)
    text = "tokenization of unbelievably antidisestablishmentarianism embeddings " * 40
    ids = torch.tensor([tok.encode(text)])
    starts = word_start_table(tok)
    _, labels = mask_tokens(ids, mask_id=tok.mask_token_id or 0, vocab_size=tok.vocab_size, special=special_ids(tok),
                            word_starts=starts, generator=torch.Generator().manual_seed(1))  # fmt: skip
    chosen = (labels != IGNORE)[0]
    word = starts[ids[0]].long().cumsum(0)
    for w in word.unique():
        part = chosen[word == w]
        assert part.all() or not part.any()  # a word is hidden entirely or not at all
    assert 0.05 < chosen.float().mean() < 0.3
    assert not chosen[0] and not chosen[-1]  # [CLS] and [SEP]


def test_loss_only_on_masked_positions() -> None:
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig.preset("bert-base", vocab_size=50, n_layers=1, d_model=16, n_heads=2, max_seq_len=16)
    )
    x = torch.randint(0, 50, (2, 10))
    labels = torch.full_like(x, IGNORE)
    labels[0, 3], labels[1, 7] = 5, 9
    loss, n = masked_lm()(model, {"input_ids": x, "labels": labels})
    logits = model(x)
    ref = F.cross_entropy(torch.stack([logits[0, 3], logits[1, 7]]), torch.tensor([5, 9]))
    assert n == 2 and torch.allclose(loss, ref)


def test_with_mask_token_adds_one_when_missing() -> None:
    tok = Tokenizer.train(["def f(x): return x"] * 20, vocab_size=270, show_progress=False)
    assert tok.mask_token is None
    new = with_mask_token(tok)
    assert new.mask_token == "<|mask|>" and new.mask_token_id == tok.vocab_size
    assert new.encode("a <|mask|> b").count(new.mask_token_id) == 1
    assert with_mask_token(new) is new


@pytest.mark.slow
def test_pretrain_encoder_beats_unigram_and_fills_masks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    from lamina.data.batches import TokenShards

    out = tmp_path / "out"
    argv = [
        "pretrain", "--data.builtin", "stdlib", "--data.max_bytes", "200000", "--data.train_tokenizer", "300",
        "--data.out", str(tmp_path / "data"), "--model.preset", "bert-base", "--model.norm_placement", "pre",
        "--model.pos_encoding", "rope", "--model.n_layers", "2", "--model.d_model", "128", "--model.n_heads", "4",
        "--model.d_ff", "256", "--model.max_seq_len", "64", "--train.seq_len", "64", "--train.batch_size", "32",
        "--train.max_steps", "150", "--train.eval_every", "150", "--train.lr", "3e-3", "--train.warmup_steps", "20",
        "--train.eval_batches", "8", "--train.out_dir", str(out), "--train.progress", "false",
    ]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    import json

    val = [
        json.loads(line)["val_loss"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if "val_loss" in line
    ]
    # the unigram baseline on the same masked validation targets (the pretrain val batches, same seed)
    from lamina.data.batches import val_batches
    from lamina.data.masking import MaskedBatches

    tok = with_mask_token(Tokenizer.from_file(tmp_path / "data" / "tokenizer"))
    train = torch.from_numpy(np.asarray(TokenShards.open(tmp_path / "data", "train")[:]).astype(np.int64))
    counts = torch.bincount(train, minlength=tok.vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    masker = MaskedBatches(
        None, mask_id=tok.mask_token_id or 0, vocab_size=tok.vocab_size, special=special_ids(tok), seed=1337
    )
    vt = TokenShards.open(tmp_path / "data", "val")
    targets = torch.cat([b["labels"][b["labels"] != IGNORE] for b in masker.masked_stream(
        {"input_ids": x} for x, _ in val_batches(vt, 32, 64, max_batches=8))])  # fmt: skip
    baseline = float(-logp[targets].mean())
    assert val[-1] <= 0.8 * baseline, (val, baseline)
    assert main(["fill-mask", str(out / "last"), "    def __init__([MASK], x):"]) == 0
    printed = capsys.readouterr().out
    lines = (
        printed.splitlines()
    )  # "mask 1:", five "  prob  'token'" lines (most likely first), the filled text
    probs = [float(line.split()[0]) for line in lines[1:6]]
    assert lines[0] == "mask 1:" and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
    assert lines[6].startswith("    def __init__(") and lines[6].endswith(", x):")


def test_fill_mask_matches_transformers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], minilm_path: Path
) -> None:
    import transformers as tf

    import lamina
    from lamina.fill_mask import fill_mask

    torch.manual_seed(0)
    hf = tf.BertForMaskedLM(tf.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=64, max_position_embeddings=64)).eval()  # fmt: skip
    hf.save_pretrained(tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_bytes((minilm_path / f).read_bytes())
    lm = lamina.load(tmp_path)
    preds = fill_mask(lm, "Paris is the [MASK] of [MASK].", top_k=3)
    tok = tf.AutoTokenizer.from_pretrained(tmp_path)
    enc = tok("Paris is the [MASK] of [MASK].", return_tensors="pt")
    with torch.no_grad():
        probs = hf(**enc).logits[0].softmax(-1)
    where = (enc["input_ids"][0] == tok.mask_token_id).nonzero().squeeze(1)
    assert len(preds) == 2
    for p, pos in zip(preds, where.tolist(), strict=True):
        top = probs[pos].topk(3)
        assert [c.token_id for c in p] == top.indices.tolist()
        assert torch.allclose(torch.tensor([c.score for c in p]), top.values, atol=1e-5)
    assert main(["fill-mask", "minilm", "a [MASK]"]) == 1
    assert "no masked-LM head" in capsys.readouterr().err
