"""ModelConfig: validation messages, dict / YAML I/O, presets, parameter counts and FLOPs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from lamina.config import PRESETS, GenerationConfig, ModelConfig, from_dict, load_yaml, save_yaml, to_dict
from lamina.errors import ConfigError, LaminaError
from lamina.model.transformer import Transformer

SMALL: dict[str, Any] = dict(vocab_size=101, max_seq_len=64, n_layers=2, d_model=32, n_heads=4)


def _meta_model(cfg: ModelConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg)


# -- validation -------------------------------------------------------------------------------------------


INVALID: list[tuple[dict[str, Any], list[str]]] = [
    (dict(d_model=30, n_heads=4), ["d_model", "30", "n_heads", "4", "head_dim"]),
    (dict(d_model=32, n_heads=6, n_kv_heads=4, head_dim=8), ["n_heads=6", "n_kv_heads=4"]),
    (dict(d_model=32, n_heads=4, n_kv_heads=0), ["n_kv_heads=0"]),
    (dict(d_model=32, n_heads=4, head_dim=7, pos_encoding="rope"), ["rope", "head_dim=7"]),
    (dict(d_model=35, n_heads=5, pos_encoding="sinusoidal"), ["sinusoidal", "d_model=35"]),
    (dict(activation="tanh"), ["activation", "'tanh'", "'gelu'", "'swiglu'", "'geglu'", "'relu'"]),
    (dict(norm="batchnorm"), ["norm", "'batchnorm'", "'layernorm'", "'rmsnorm'"]),
    (dict(norm_placement="sandwich"), ["norm_placement", "'pre'", "'post'"]),
    (dict(pos_encoding="xpos"), ["pos_encoding", "'xpos'", "'alibi'", "'rope'"]),
    (dict(initializer="orthogonal"), ["initializer", "'orthogonal'", "'xavier'", "'kaiming'"]),
    (dict(pos_encoding="rope", rope_scaling="yarn"), ["rope_scaling", "'yarn'", "'llama3'", "'dynamic'"]),
    (dict(attn_dropout=1.0), ["attn_dropout", "1.0", "[0, 1)"]),
    (dict(emb_dropout=-0.1), ["emb_dropout", "-0.1"]),
    (dict(resid_dropout=1.5), ["resid_dropout", "1.5"]),
    (dict(rope_scaling="linear", rope_factor=2.0), ["rope_scaling", "'linear'", "pos_encoding", "'learned'"]),
    (
        dict(pos_encoding="rope", rope_scaling="llama3", rope_factor=8.0),
        ["'llama3'", "rope_original_max_seq_len"],
    ),
    (
        dict(pos_encoding="rope", rope_scaling="dynamic", rope_factor=2.0),
        ["'dynamic'", "rope_original_max_seq_len"],
    ),
    (dict(pos_encoding="rope", rope_scaling="linear", rope_factor=0.5), ["rope_factor", "0.5"]),
    (dict(n_layers=0), ["n_layers", "0"]),
    (dict(vocab_size=-3), ["vocab_size", "-3"]),
    (dict(n_layers=True), ["n_layers", "True"]),
    (dict(norm_eps=0.0), ["norm_eps", "0.0"]),
    (dict(init_std=-0.02), ["init_std", "-0.02"]),
    (dict(initializer="t5", init_std=0.5), ["init_std", "initializer normal", "t5"]),
]
# values the checks do not reach yet: each builds a broken model (or fails later, unnamed) if accepted
INVALID_UNCHECKED: list[tuple[dict[str, Any], list[str]]] = [
    (dict(d_model=32, n_heads=4, head_dim=0), ["head_dim", "0"]),  # builds, zero-width attention
    (dict(d_model=32, n_heads=4, head_dim=-8), ["head_dim", "-8"]),  # RuntimeError in nn.Linear
    (dict(pos_encoding="rope", rope_theta=0.0), ["rope_theta", "0.0"]),  # NaN cos/sin
    (dict(n_kv_heads=2.0, n_heads=4, d_model=32), ["n_kv_heads", "2.0"]),  # TypeError in nn.Linear
    (dict(norm_eps="1e-5"), ["norm_eps", "1e-5"]),  # raw TypeError from a comparison
    (dict(tie_embeddings="no"), ["tie_embeddings", "no"]),  # truthy string: silently tied
]


def _id(kw: dict[str, Any]) -> str:
    return "-".join(f"{k}={v}" for k, v in kw.items())


@pytest.mark.parametrize(("kw", "words"), INVALID, ids=[_id(kw) for kw, _ in INVALID])
def test_invalid_config_names_fields_and_values(kw: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        ModelConfig(**kw)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    assert isinstance(info.value, LaminaError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(("kw", "words"), INVALID_UNCHECKED, ids=[_id(kw) for kw, _ in INVALID_UNCHECKED])
def test_bad_dims_and_types_are_config_errors(kw: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        ModelConfig(**kw)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {str(info.value)!r}"


def test_divisibility_error_suggests_divisors() -> None:
    with pytest.raises(ConfigError, match=r"e\.g\. 3, 5"):  # divisors of 30 nearest to 4
        ModelConfig(d_model=30, n_heads=4)


def test_explicit_head_dim_lifts_divisibility() -> None:
    cfg = ModelConfig(d_model=30, n_heads=4, head_dim=8)
    assert (cfg.head_dim, cfg.n_kv_heads) == (8, 4)


def test_derived_defaults() -> None:
    cfg = ModelConfig(d_model=96, n_heads=6)
    assert (cfg.head_dim, cfg.n_kv_heads, cfg.d_ff) == (16, 6, 384)
    gated = ModelConfig(d_model=96, n_heads=6, activation="swiglu")
    assert gated.d_ff == 256  # 8/3 * 96 = 256, already a multiple of 64
    assert ModelConfig(d_model=128, n_heads=4, activation="geglu").d_ff == 384  # 341.3 -> 384


def test_validate_catches_later_mutation() -> None:
    cfg = ModelConfig(**SMALL)
    cfg.activation = "tanh"  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="activation"):
        cfg.validate()
    with pytest.raises(ConfigError, match="activation"):
        Transformer(cfg)


# -- dict / YAML ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "good"), [("n_layer", "n_layers"), ("dmodel", "d_model"), ("n_kv_head", "n_kv_heads")]
)
def test_unknown_key_suggests_nearest(bad: str, good: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(ModelConfig, {bad: 4})
    assert repr(bad) in str(info.value) and repr(good) in str(info.value)


def test_unknown_key_in_preset_overrides() -> None:
    with pytest.raises(ConfigError, match="'n_layers'"):
        ModelConfig.preset("tiny", n_layer=3)


def test_from_dict_rejects_non_mapping() -> None:
    with pytest.raises(ConfigError, match="mapping"):
        from_dict(ModelConfig, [("n_layers", 2)])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("bad", "good"), [("smollm2", "smollm2-135m"), ("gpt-2", "gpt2"), ("llama_tiny", "llama-tiny")]
)
def test_unknown_preset_suggests_near_names(bad: str, good: str) -> None:
    with pytest.raises(ConfigError) as info:
        ModelConfig.preset(bad)
    msg = str(info.value)
    assert repr(bad) in msg and repr(good) in msg
    assert all(name in msg for name in PRESETS)  # and lists them all


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(),
        ModelConfig.preset("smollm2-135m"),
        ModelConfig(
            **SMALL,
            pos_encoding="rope",
            rope_scaling="llama3",
            rope_factor=8.0,
            rope_original_max_seq_len=16,
            rope_low_freq_factor=1.5,
            norm_eps=1e-6,
            attn_dropout=0.1,
            head_dim=12,
            n_kv_heads=2,
            tie_embeddings=False,
            initializer="kaiming",
        ),
    ],
    ids=["default", "smollm2-135m", "rope-llama3"],
)
def test_yaml_round_trip(cfg: ModelConfig, tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    save_yaml(cfg, path)
    back = load_yaml(ModelConfig, path)
    assert back == cfg
    assert to_dict(back) == to_dict(cfg)
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg


def test_generation_config_round_trip(tmp_path: Path) -> None:
    gen = GenerationConfig(max_new_tokens=7, eos_token_ids=[0, 2])
    save_yaml(gen, tmp_path / "generation.yaml")
    assert load_yaml(GenerationConfig, tmp_path / "generation.yaml") == gen
    with pytest.raises(ConfigError, match="max_new_tokens=-1"):
        GenerationConfig(max_new_tokens=-1)


def test_hand_written_yaml_with_exponent_floats(tmp_path: Path) -> None:
    """``norm_eps: 1e-5`` is how people (and HF configs) write it; PyYAML alone reads it as a string."""
    path = tmp_path / "config.yaml"
    path.write_text("n_layers: 2\nd_model: 32\nn_heads: 4\nnorm_eps: 1e-5\ninit_std: 2e-2\n")
    cfg = load_yaml(ModelConfig, path)
    assert cfg.norm_eps == 1e-5 and cfg.init_std == 0.02


def test_load_yaml_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(ModelConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("n_layers: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(ModelConfig, bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("n_layer: 3\n")
    with pytest.raises(ConfigError, match="'n_layers'"):
        load_yaml(ModelConfig, typo)


# -- presets ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds(name: str) -> None:
    cfg = ModelConfig.preset(name)
    model = _meta_model(cfg)
    assert model.num_params() == cfg.n_params
    assert ModelConfig.preset(name, n_layers=1).n_layers == 1


@pytest.mark.parametrize("name", ["tiny", "llama-tiny"])
def test_small_presets_run(name: str) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig.preset(name, n_layers=1)
    logits = Transformer(cfg).eval()(torch.randint(0, cfg.vocab_size, (1, 5)))
    assert logits.shape == (1, 5, cfg.vocab_size) and torch.isfinite(logits).all()


def test_smollm2_135m_matches_published_model() -> None:
    cfg = ModelConfig.preset("smollm2-135m")
    # HuggingFaceTB/SmolLM2-135M config.json
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff) == (576, 30, 9, 3, 1536)
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.rope_theta, cfg.norm_eps) == (49152, 8192, 100000.0, 1e-5)
    assert (cfg.head_dim, cfg.tie_embeddings, cfg.bias) == (64, True, False)
    assert (cfg.activation, cfg.norm, cfg.pos_encoding, cfg.norm_placement) == (
        "swiglu",
        "rmsnorm",
        "rope",
        "pre",
    )
    assert cfg.n_params == 134_515_008
    assert _meta_model(cfg).num_params() == 134_515_008


def test_smollm2_135m_count_agrees_with_transformers() -> None:
    tf = pytest.importorskip("transformers")
    hf_cfg = tf.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        hf = tf.LlamaForCausalLM(hf_cfg)
    assert sum(p.numel() for p in hf.parameters()) == ModelConfig.preset("smollm2-135m").n_params


# -- parameter counts -------------------------------------------------------------------------------------

COUNT_GRID: dict[str, dict[str, Any]] = {
    "default": {},
    "untied": dict(tie_embeddings=False),
    "swiglu-nobias-rope-gqa": dict(activation="swiglu", bias=False, pos_encoding="rope", n_kv_heads=2),
    "geglu-bias-untied": dict(activation="geglu", tie_embeddings=False, d_ff=72),
    "layernorm-nobias": dict(bias=False),
    "rmsnorm-bias": dict(norm="rmsnorm"),
    "emb_norm-post": dict(emb_norm=True, norm_placement="post"),
    "emb_norm-pre-alibi-mqa": dict(emb_norm=True, pos_encoding="alibi", n_kv_heads=1),
    "head_dim-12-sinusoidal": dict(head_dim=12, pos_encoding="sinusoidal", n_kv_heads=2),
    "post-rmsnorm-untied-none": dict(
        norm="rmsnorm", norm_placement="post", tie_embeddings=False, pos_encoding="none"
    ),
}


def _numel(model: Transformer, pred: Any) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if pred(n))


@pytest.mark.parametrize("name", COUNT_GRID)
def test_param_counts_match_built_model(name: str) -> None:
    cfg = ModelConfig(**SMALL, **COUNT_GRID[name])
    model = _meta_model(cfg)
    counts = cfg.param_counts()
    assert cfg.n_params == sum(counts.values()) == sum(p.numel() for p in model.parameters())
    assert counts["embeddings"] == model.tok_emb.weight.numel()
    assert counts["positional"] == (model.pos_emb.weight.numel() if model.pos_emb is not None else 0)
    assert counts["attention"] == _numel(model, lambda n: ".attn." in n)
    assert counts["mlp"] == _numel(model, lambda n: ".mlp." in n)
    assert counts["norms"] == _numel(model, lambda n: "norm" in n)
    assert counts["head"] == (0 if cfg.tie_embeddings else model.lm_head.weight.numel())


@pytest.mark.parametrize(
    "kw",
    [dict(SMALL), dict(SMALL, activation="swiglu", n_kv_heads=2, bias=False), dict(SMALL, head_dim=12)],
    ids=["gpt", "llama-like", "head_dim-12"],
)
def test_flops_per_token(kw: dict[str, Any]) -> None:
    cfg = ModelConfig(**kw)
    model = _meta_model(cfg)
    matmul = (
        _numel(model, lambda n: ".attn." in n or ".mlp." in n) + model.lm_head.weight.numel()
    )  # the head multiplies even when tied
    assert cfg.n_matmul_params == matmul
    L, H, hd, d = cfg.n_layers, cfg.n_heads, cfg.head_dim, cfg.d_model
    assert hd is not None
    for t in (1, 16, 64):
        assert cfg.flops_per_token(t, training=True) == 6 * matmul + 12 * L * H * hd * t
        assert cfg.flops_per_token(t, training=False) == 2 * matmul + 4 * L * H * hd * t
        if H * hd == d:
            assert cfg.flops_per_token(t) == 6 * cfg.n_matmul_params + 12 * L * d * t
    assert cfg.flops_per_token() == cfg.flops_per_token(cfg.max_seq_len)


def test_config_fields_are_documented_defaults() -> None:
    """Every field has a default, so ``ModelConfig()`` and any subset of keys build."""
    for f in dataclasses.fields(ModelConfig):
        assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name
