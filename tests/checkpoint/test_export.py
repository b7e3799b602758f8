"""lamina -> HF export loads in `transformers` with the same logits; lamina folders round-trip exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf

from lamina.checkpoint.hf import export_hf, hf_family
from lamina.checkpoint.lamina import load_checkpoint, save_checkpoint
from lamina.config import GenerationConfig, ModelConfig
from lamina.errors import CheckpointError
from lamina.model.transformer import Transformer

CONFIGS = {
    "gpt2-like": ModelConfig.preset("tiny", vocab_size=101, max_seq_len=64, activation="gelu_tanh"),
    "gpt2-untied-relu": ModelConfig.preset(
        "tiny", vocab_size=101, max_seq_len=64, activation="relu", tie_embeddings=False
    ),
    "llama-gqa": ModelConfig.preset("llama-tiny", vocab_size=101, max_seq_len=64),
    "llama-untied-bias-llama3": ModelConfig.preset(
        "llama-tiny",
        vocab_size=101,
        max_seq_len=64,
        bias=True,
        tie_embeddings=False,
        rope_scaling="llama3",
        rope_factor=4.0,
        rope_original_max_seq_len=16,
    ),
}


def _random_model(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # norms and biases away from 1 and 0, so a mapping bug in them shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_exported_folder_loads_in_transformers_with_same_logits(name: str, tmp_path: Path) -> None:
    model = _random_model(CONFIGS[name])
    export_hf(tmp_path / "hf", model, generation=GenerationConfig(eos_token_ids=[3]))
    ref = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 101, (2, 17), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ref(x).logits, model(x), atol=1e-5, rtol=0)
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 3


def test_chat_model_export_keeps_template_and_eos(lamina_smollm2: Any, tmp_path: Path) -> None:
    tok = lamina_smollm2.tokenizer
    export_hf(tmp_path / "hf", lamina_smollm2.model, tok, lamina_smollm2.generation)
    hf_tok = tf.AutoTokenizer.from_pretrained(tmp_path / "hf")
    msgs = [{"role": "user", "content": "Hi there"}]
    assert hf_tok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True
    ) == tok.apply_chat_template(msgs, add_generation_prompt=True)
    gen = tf.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert gen.eos_token_id == lamina_smollm2.generation.eos_token_ids[0]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@torch.no_grad()
def test_export_without_tokenizer_writes_only_ids_the_vocabulary_has(family: str, tmp_path: Path) -> None:
    """transformers fills unset bos/eos with its class defaults (GPT-2: 50256) past a 300-token vocab."""
    preset = {"gpt2": "tiny", "llama": "llama-tiny"}[family]
    model = _random_model(ModelConfig.preset(preset, vocab_size=300, max_seq_len=64))
    export_hf(tmp_path / "hf", model)
    ref = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert ref.config.bos_token_id is None and ref.config.eos_token_id is None
    for cfg in (ref.config, ref.generation_config):
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(cfg, name)
            assert value is None or all(0 <= i < 300 for i in ([value] if isinstance(value, int) else value))
    x = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(0))
    out = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9) and int(out.max()) < 300

    # eos ids past the vocabulary are dropped, the rest kept as a list
    export_hf(tmp_path / "hf2", model, generation=GenerationConfig(eos_token_ids=[7, 50256, 9]))
    config = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert config["eos_token_id"] == [7, 9] and config["bos_token_id"] is None


@torch.no_grad()
def test_lamina_checkpoint_round_trip_is_exact(tmp_path: Path) -> None:
    cfg = ModelConfig.preset(
        "tiny", vocab_size=101, pos_encoding="alibi", norm_placement="post", tie_embeddings=False
    )
    model = _random_model(cfg)
    save_checkpoint(
        tmp_path / "ckpt", model, generation=GenerationConfig(max_new_tokens=7, eos_token_ids=[1, 2])
    )
    loaded, gen = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == cfg and gen.max_new_tokens == 7 and gen.eos_token_ids == [1, 2]
    for (n1, a), (n2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(a, b)
    assert sorted(p.name for p in (tmp_path).iterdir()) == ["ckpt"]  # no temp folders left behind


def test_save_is_atomic_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure mid-write leaves the previous checkpoint intact and no partial folder."""
    model = _random_model(ModelConfig.preset("tiny", vocab_size=101))
    save_checkpoint(tmp_path / "ckpt", model)
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()

    def boom(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("lamina.checkpoint.lamina.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(
            tmp_path / "ckpt", _random_model(ModelConfig.preset("tiny", vocab_size=101, n_layers=3))
        )
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_unexportable_config_is_a_clear_error() -> None:
    with pytest.raises(CheckpointError, match=r"no Hugging Face equivalent.*pos_encoding='alibi'"):
        hf_family(ModelConfig.preset("tiny", pos_encoding="alibi"))
