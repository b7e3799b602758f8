"""HF T5 (lamina/checkpoint/hf_t5.py): tiny random T5 v1.0 and v1.1 folders load with ``lamina.load`` and give
``transformers``' encoder output and logits; lamina's T5 exports to folders ``transformers`` reloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, pre_tokenizers, processors, trainers
from tokenizers.models import Unigram

import lamina
from lamina.checkpoint.hf import config_from_hf, export_hf
from lamina.config import ModelConfig
from lamina.errors import CheckpointError
from lamina.model.transformer import Transformer
from lamina.tokenizer import Tokenizer

TEXTS = [
    "translate English to German: the house is wonderful",
    "summarize: studies have shown that owning a dog is good for you",
    "the quick brown fox jumps over the lazy dog",
    "a small model trained on a few sentences of text",
] * 8


def _unigram(folder: Path) -> None:
    """A SentencePiece-style Unigram tokenizer as T5's (<pad> 0, </s> 1, <unk> 2, eos appended)."""
    tok = Backend(Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=90, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(TEXTS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    roles = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **roles})
    )


def _hf_t5(folder: Path, proj: str, tied: bool) -> tf.T5ForConditionalGeneration:
    torch.manual_seed(0)
    cfg = tf.T5Config(
        vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj=proj,
        tie_word_embeddings=tied, dropout_rate=0.0, decoder_start_token_id=0,
    )  # fmt: skip
    model = tf.T5ForConditionalGeneration(cfg).eval()
    if not tied:  # v1.1: a head of its own (transformers unties it when the saved tensors differ)
        model.lm_head.weight = torch.nn.Parameter(torch.randn(96, 32))
    model.save_pretrained(folder)
    if not tied:  # the config.json of the released v1.1 / Flan-T5 checkpoints
        data = json.loads((folder / "config.json").read_text())
        data.pop("scale_decoder_outputs", None)
        data["tie_word_embeddings"] = False
        (folder / "config.json").write_text(json.dumps(data))
    _unigram(folder)
    return tf.T5ForConditionalGeneration.from_pretrained(folder).eval()


@pytest.fixture(scope="module", params=[("relu", True), ("gated-gelu", False)], ids=["v1.0", "v1.1"])
def t5(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    folder = tmp_path_factory.mktemp("t5")
    proj, tied = request.param
    return folder, _hf_t5(folder, proj, tied)


def _inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    src = torch.randint(3, 96, (2, 30), generator=g)
    src_mask = torch.ones(2, 30, dtype=torch.long)
    src_mask[1, 18:] = 0  # right padding, as T5's tokenizer pads
    tgt = torch.randint(3, 96, (2, 25), generator=g)
    tgt[:, 0] = 0  # decoder_start_token_id
    tgt_mask = torch.ones(2, 25, dtype=torch.long)
    tgt_mask[1, 14:] = 0
    return src, src_mask, tgt, tgt_mask


def _compare(net: Transformer, hf: tf.T5ForConditionalGeneration) -> None:
    src, src_mask, tgt, tgt_mask = _inputs()
    with torch.no_grad():
        ref = hf(
            input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt, decoder_attention_mask=tgt_mask
        )
        memory = net.encode(src, src_mask)
        logits = net(src, src_mask, decoder_input_ids=tgt, decoder_attention_mask=tgt_mask)
    real_src, real_tgt = src_mask.bool(), tgt_mask.bool()
    assert (memory - ref.encoder_last_hidden_state)[real_src].abs().max() < 1e-4
    assert (logits - ref.logits)[real_tgt].abs().max() < 1e-4
    assert ref.logits.abs().max() > 0.1


def test_hf_t5_folder_loads_with_its_unigram_tokenizer_and_matches(t5: tuple[Path, object]) -> None:
    folder, hf = t5
    assert isinstance(hf, tf.T5ForConditionalGeneration)
    lm = lamina.load(folder)
    net = lm.model.eval()
    cfg = net.config
    assert cfg.arch == "encoder-decoder" and cfg.decoder_start_token_id == 0
    assert cfg.tie_embeddings == cfg.scale_decoder_outputs == (hf.config.feed_forward_proj == "relu")
    assert net.num_params() == cfg.n_params == hf.num_parameters()
    _compare(net, hf)
    assert lm.tokenizer is not None and lm.generation.eos_token_ids == [1]
    hf_tok = tf.AutoTokenizer.from_pretrained(folder)
    for text in TEXTS[:4]:
        assert lm.tokenizer.encode(text) == hf_tok(text)["input_ids"]
        assert hf_tok(text)["input_ids"][-1] == 1  # </s> appended, as T5's


def test_cached_decoding_equals_transformers_logits(t5: tuple[Path, object]) -> None:
    folder, hf = t5
    assert isinstance(hf, tf.T5ForConditionalGeneration)
    net = lamina.load(folder).model.eval()
    src, src_mask, tgt, _ = _inputs()
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt).logits
        memory = net.encode(src, src_mask)
        cache = net.new_cache(2, 32)
        steps = [net.decode(tgt[:, :1], memory, src_mask, cache=cache)]
        steps += [net.decode(tgt[:, t : t + 1], None, cache=cache) for t in range(1, tgt.shape[1])]
    assert (torch.cat(steps, 1) - ref).abs().max() < 1e-4


@pytest.mark.parametrize("preset", ["t5-tiny", "t5-v1_1-tiny"])
def test_export_reloads_in_transformers_with_the_same_logits(preset: str, tmp_path: Path) -> None:
    overrides = {}
    if preset == "t5-v1_1-tiny":  # T5 v1.1's knobs at test size
        overrides = dict(
            activation="geglu_tanh", tie_embeddings=False, scale_decoder_outputs=False, n_decoder_layers=3
        )
    torch.manual_seed(0)
    net = Transformer(ModelConfig.preset("t5-tiny", **overrides)).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    _unigram(tmp_path)
    tok = Tokenizer.from_file(tmp_path)
    out = export_hf(tmp_path / "export", net, tok)
    hf = tf.T5ForConditionalGeneration.from_pretrained(out).eval()
    assert hf.num_parameters() == net.num_params()
    _compare_sized(net, hf)
    assert tf.AutoTokenizer.from_pretrained(out)("the house")["input_ids"] == tok.encode("the house")
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["decoder_start_token_id"] == 0 and gen["eos_token_id"] == 1
    again = lamina.load(out).model.eval()  # and back
    assert again.config == net.config
    src, src_mask, tgt, _ = _inputs()
    src, tgt = src % 90, tgt % 90
    with torch.no_grad():
        assert torch.allclose(
            again(src, src_mask, decoder_input_ids=tgt), net(src, src_mask, decoder_input_ids=tgt)
        )


def _compare_sized(net: Transformer, hf: tf.T5ForConditionalGeneration) -> None:
    src, src_mask, tgt, tgt_mask = (t % net.config.vocab_size for t in _inputs())
    with torch.no_grad():
        ref = hf(
            input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt, decoder_attention_mask=tgt_mask
        )
        logits = net(src, src_mask, decoder_input_ids=tgt, decoder_attention_mask=tgt_mask)
    assert (logits - ref.logits)[tgt_mask.bool()].abs().max() < 1e-4


def test_what_t5_cannot_hold_is_one_clear_error(tmp_path: Path) -> None:
    net = Transformer(
        ModelConfig.preset("transformer-base", vocab_size=64, n_layers=1, d_model=16, n_heads=2)
    )
    with pytest.raises(CheckpointError, match=r"no Hugging Face equivalent.*T5 needs relative positions"):
        export_hf(tmp_path / "x", net)
    with pytest.raises(CheckpointError, match="feed_forward_proj='gated-relu'"):
        config_from_hf({"model_type": "t5", "feed_forward_proj": "gated-relu"})
    copying = Transformer(ModelConfig.preset("t5-tiny", vocab_size=64, copy_attention=True))
    with pytest.raises(CheckpointError, match=r"T5 has no copy head \(copy_attention\)"):
        export_hf(tmp_path / "y", copying)
