"""Attention maps are the model's own (the recorded forward equals the fused one), each causal row sums
to 1 with zeros above the diagonal; the logit lens's last layer is the model's output distribution;
surprisal is the model's own next-token loss; the figures are written."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_chat import tiny_lm

from lamina.analysis.explain import explain, figures, logit_lens, record_attention
from lamina.errors import ConfigError

TEXT = "the cat sat on the mat and the dog ran"


@pytest.fixture(scope="module")
def lm() -> Any:
    return tiny_lm(n_layers=3)  # GQA: 4 query heads over 2 KV heads, RoPE


def test_recorded_attention_is_the_models_own(lm: Any) -> None:
    x = torch.tensor([lm.tokenizer.encode(TEXT)])
    with torch.no_grad():
        fused = lm.model(x)
        with record_attention() as probs:
            recorded = lm.model(x)
    torch.testing.assert_close(recorded, fused, atol=1e-5, rtol=1e-5)
    assert len(probs) == 3 and probs[0].shape == (1, 4, x.shape[1], x.shape[1])


def test_causal_maps_rows_and_lens(lm: Any) -> None:
    ex = explain(lm, TEXT)
    L, H, T, _ = ex.attentions.shape
    assert (L, H, T) == (3, 4, len(ex.ids))
    torch.testing.assert_close(ex.attentions.sum(-1), torch.ones(L, H, T))
    assert torch.all(ex.attentions.triu(1) == 0)
    x = torch.tensor([ex.ids])
    with torch.no_grad():
        own = lm.model(x)[0].float().log_softmax(-1)
    lens = logit_lens(lm.model, x)
    torch.testing.assert_close(lens[-1, 0], own, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(lens[0, 0], own, atol=1e-3)  # earlier layers differ
    want = -own[torch.arange(T - 1), x[0, 1:]] / math.log(2)
    torch.testing.assert_close(ex.surprisal[1:], want)
    assert math.isnan(float(ex.surprisal[0]))
    assert ex.lens_top_ids[-1].tolist() == own.argmax(-1).tolist()


def test_encoder_maps_are_bidirectional() -> None:
    enc = tiny_lm(arch="encoder", pos_encoding="learned")
    ex = explain(enc, TEXT)
    torch.testing.assert_close(ex.attentions.sum(-1), torch.ones(ex.attentions.shape[:3]))
    assert float(ex.attentions.triu(1).sum()) > 0


def test_figures_and_cli(lm: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    ex = explain(lm, TEXT)
    paths = figures(ex, tmp_path / "fig", lm.tokenizer, layer=1, head=2)
    names = sorted(p.name for p in paths)
    assert names == ["attention_L1_H2.png", "attention_grid.png", "logit_lens.png", "surprisal.png"]
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    assert "bits" in ex.table(lm.tokenizer)
    with pytest.raises(ConfigError, match="no tokens"):
        explain(lm, "")
    with pytest.raises(ConfigError, match=r"heads 0\.\.3"):
        figures(ex, tmp_path / "bad", lm.tokenizer, layer=0, head=99)
    with pytest.raises(ConfigError, match="max_tokens"):
        explain(lm, TEXT, max_tokens=0)
