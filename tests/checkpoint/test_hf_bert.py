"""BERT checkpoints: lamina's outputs equal `transformers`' on tiny random BERTs of every head, with
padding and token types; exported folders load back in `transformers` and `sentence-transformers`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf

import lamina
from lamina.checkpoint.hf import export_hf
from lamina.embeddings import EmbeddingConfig
from lamina.errors import CheckpointError

V = 101
HEADS = {
    "BertModel": (tf.BertModel, {}),
    "BertForMaskedLM": (tf.BertForMaskedLM, {}),
    "BertForSequenceClassification": (tf.BertForSequenceClassification, {"num_labels": 3}),
    "regression": (tf.BertForSequenceClassification, {"num_labels": 1, "problem_type": "regression"}),
    "BertForTokenClassification": (tf.BertForTokenClassification, {"num_labels": 5}),
}


def _bert(kind: str, **kw: Any) -> tf.PreTrainedModel:
    cls, extra = HEADS[kind]
    cfg = tf.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40, type_vocab_size=2, **extra, **kw,
    )  # fmt: skip
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # random (not zero) biases and norms, so a mismatch in any of them shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    mask[2, 3:] = 0
    types = torch.zeros(3, 12, dtype=torch.long)
    types[0, 6:] = 1
    types[1, 4:7] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def _hf_output(model: tf.PreTrainedModel, kind: str, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**x)
    return out.last_hidden_state if kind == "BertModel" else out.logits


def _compare(ours: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    if ours.dim() == 3:  # per token: padding positions are free to differ
        ours, ref = ours[mask.bool()], ref[mask.bool()]
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0), (ours - ref).abs().max()


@pytest.mark.parametrize("kind", list(HEADS))
def test_import_matches_transformers(kind: str, tmp_path: Path) -> None:
    hf = _bert(kind)
    hf.save_pretrained(tmp_path)
    lm = lamina.load(tmp_path)
    x = _inputs()
    with torch.no_grad():
        ours = lm.model(
            x["input_ids"], attention_mask=x["attention_mask"], token_type_ids=x["token_type_ids"]
        )
    _compare(ours, _hf_output(hf, kind, x), x["attention_mask"])


@pytest.mark.parametrize("kind", list(HEADS))
def test_export_loads_in_transformers(kind: str, tmp_path: Path) -> None:
    _bert(kind).save_pretrained(tmp_path / "src")
    lm = lamina.load(tmp_path / "src")
    export_hf(tmp_path / "out", lm.model)
    cls, _ = HEADS[kind]
    back = cls.from_pretrained(tmp_path / "out").eval()
    x = _inputs()
    with torch.no_grad():
        ours = lm.model(
            x["input_ids"], attention_mask=x["attention_mask"], token_type_ids=x["token_type_ids"]
        )
    _compare(ours, _hf_output(back, kind, x), x["attention_mask"])
    again = lamina.load(tmp_path / "out").model  # and lamina reads its own export
    for (name, a), (_, b) in zip(lm.model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_encoder_without_token_types_exports_zero_types(tmp_path: Path) -> None:
    cfg = lamina.ModelConfig.preset(
        "minilm-l6", vocab_size=V, n_layers=1, d_model=32, n_heads=4, max_seq_len=16, type_vocab_size=0
    )
    model = lamina.Transformer(cfg).eval()
    export_hf(tmp_path, model)
    back = tf.BertModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        assert torch.allclose(model(ids), back(ids).last_hidden_state, atol=1e-5)


def test_unexportable_encoder_names_the_problem() -> None:
    cfg = lamina.ModelConfig.preset("minilm-l6", n_layers=1, norm="rmsnorm")
    with pytest.raises(CheckpointError, match="LayerNorm"):
        export_hf("/nonexistent/never-written", lamina.Transformer(cfg))


@pytest.mark.slow
def test_minilm_export_reloads_in_sentence_transformers(
    lamina_minilm: Any, st_minilm: Any, tmp_path: Path
) -> None:
    from sentence_transformers import SentenceTransformer

    texts = ["A man is eating food.", "The weather is lovely today!", "naïve café", "x" * 50]
    out = export_hf(tmp_path / "mini", lamina_minilm.model, lamina_minilm.tokenizer,
                    embedding=EmbeddingConfig(max_seq_len=256))  # fmt: skip
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertModel"]
    st = SentenceTransformer(str(out), device="cpu")
    ref = torch.from_numpy(st_minilm.encode(texts))
    assert torch.nn.functional.cosine_similarity(torch.from_numpy(st.encode(texts)), ref).min() >= 0.9999
    hf = tf.AutoModel.from_pretrained(out).eval()
    tok = tf.AutoTokenizer.from_pretrained(out)
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = hf(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    pooled = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1)
    assert torch.nn.functional.cosine_similarity(pooled, ref).min() >= 0.9999
    ours = lamina.embed(lamina.load(out), texts)
    assert torch.nn.functional.cosine_similarity(ours, ref).min() >= 0.9999
