"""Encoders in the one Transformer: bidirectional attention, padding, token types, heads, presets."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from lamina.config import ModelConfig
from lamina.errors import ConfigError
from lamina.model.transformer import Transformer


def _tiny(**kw: object) -> ModelConfig:
    base = dict(vocab_size=97, n_layers=2, d_model=32, n_heads=4, max_seq_len=32)
    return ModelConfig.preset("bert-base", **{**base, **kw})


def test_encoder_sees_both_directions_decoder_only_the_past() -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 97, (1, 10))
    later = ids.clone()
    later[0, -1] = (later[0, -1] + 1) % 97
    for arch, changes_earlier in (("encoder", True), ("decoder", False)):
        model = Transformer(_tiny(arch=arch, norm_placement="pre", lm_head_transform=False)).eval()
        with torch.no_grad():
            a, b = model.hidden_states(ids), model.hidden_states(later)
        assert (not torch.allclose(a[:, :-1], b[:, :-1])) == changes_earlier, arch


def test_padding_does_not_change_real_tokens() -> None:
    torch.manual_seed(0)
    model = Transformer(_tiny()).eval()
    ids = torch.randint(0, 97, (1, 7))
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 7), torch.zeros(1, 5)], 1).long()
    types = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = model(ids, token_type_ids=types)
        batch = model(padded, attention_mask=mask, token_type_ids=torch.cat([types, types[:, :5]], 1))
        all_pad = model(padded, attention_mask=torch.zeros_like(mask))  # no NaN from an all-pad row
    assert torch.allclose(alone, batch[:, :7], atol=1e-5)
    assert torch.isfinite(all_pad).all()
    with torch.no_grad():  # token types matter
        assert not torch.allclose(alone, model(ids), atol=1e-4)


def test_task_heads_shapes_and_decoder_pools_last_real_token() -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 97, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])  # right and left padding
    assert Transformer(_tiny(head="classify", n_labels=3, pooler=True, lm_head_transform=False))(
        ids
    ).shape == (2, 3)
    assert Transformer(_tiny(head="regress", lm_head_transform=False))(ids).shape == (2, 1)
    assert Transformer(_tiny(head="token_classify", n_labels=5, lm_head_transform=False))(ids).shape == (
        2,
        6,
        5,
    )
    assert Transformer(_tiny(head="none", lm_head_transform=False))(ids).shape == (2, 6, 32)
    dec = Transformer(ModelConfig.preset("tiny", vocab_size=97, head="classify", n_labels=2)).eval()
    with torch.no_grad():
        out = dec(ids, attention_mask=mask)
        h = dec.hidden_states(ids, attention_mask=mask)
        ref = dec.task_head(torch.stack([h[0, 3], h[1, 5]]))
    assert torch.allclose(out, ref, atol=1e-6)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(head="classify"), "n_labels >= 2"),
        (dict(head="token_classify", n_labels=1), "n_labels >= 2"),
        (dict(head="lm", n_labels=3, lm_head_transform=False), "leave n_labels unset"),
        (dict(pooler=True), "pooler=True"),
        (dict(head="none", lm_head_transform=True), "lm_head_transform=True needs head='lm'"),
        (dict(pos_encoding="alibi"), "alibi"),
        (dict(type_vocab_size=-1), "type_vocab_size"),
        (dict(arch="bidirectional"), "arch"),
    ],
)
def test_bad_encoder_configs_name_the_fields(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _tiny(**fields)


def test_presets_count_parameters_as_transformers() -> None:
    bert = tf.BertConfig()  # bert-base-uncased's shape
    mini = tf.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    with torch.device("meta"):
        n_mlm = tf.BertForMaskedLM(bert).num_parameters()
        n_mini = tf.BertModel(mini).num_parameters()
        assert Transformer(ModelConfig.preset("bert-base")).num_params() == n_mlm
    assert ModelConfig.preset("bert-base").n_params == n_mlm
    assert ModelConfig.preset("minilm-l6").n_params == n_mini


def test_encoder_rejects_a_kv_cache() -> None:
    model = Transformer(_tiny())
    with pytest.raises(ValueError, match="no KV cache"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=model.new_cache(1))
