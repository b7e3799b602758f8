"""Hugging Face checkpoints (config.json + safetensors) <-> lamina, for the GPT-2, Llama, BLOOM, BERT and
T5 (``lamina.checkpoint.hf_t5``) families.

A family is two things here: a function from HF ``config.json`` to ``ModelConfig`` and a map from HF
tensor names to lamina's. Export is the inverse of the same maps.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lamina.checkpoint.hf_t5 import t5_config, t5_hf_config, t5_hf_weights, t5_weights
from lamina.checkpoint.lamina import atomic_folder, weights_for_saving
from lamina.checkpoint.sentence_transformers import EmbeddingConfig
from lamina.config import GenerationConfig, ModelConfig
from lamina.errors import CheckpointError
from lamina.model.transformer import Transformer

if TYPE_CHECKING:
    from lamina.tokenizer import Tokenizer

StateDict = dict[str, torch.Tensor]

# -- HF config.json -> ModelConfig ------------------------------------------------------------------------


def _rope_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    """RoPE theta and scaling from either the old (rope_theta, rope_scaling) or new (rope_parameters) keys."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    src = params if params.get("rope_type", "default") != "default" else scaling
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if rope_type == "default":
        return out
    if rope_type not in ("linear", "dynamic", "llama3"):
        raise CheckpointError(
            f"rope scaling type {rope_type!r} is not supported yet; lamina supports linear, dynamic and llama3"
        )
    out["rope_scaling"] = rope_type
    out["rope_factor"] = float(src.get("factor", 1.0))
    if rope_type == "dynamic":  # transformers scales relative to max_position_embeddings
        out["rope_original_max_seq_len"] = int(hf["max_position_embeddings"])
    if rope_type == "llama3":
        out["rope_original_max_seq_len"] = int(src["original_max_position_embeddings"])
        out["rope_low_freq_factor"] = float(src.get("low_freq_factor", 1.0))
        out["rope_high_freq_factor"] = float(src.get("high_freq_factor", 4.0))
    return out


def _gpt2_config(hf: Mapping[str, Any]) -> ModelConfig:
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise CheckpointError(f"GPT-2 option {flag}=true is not supported by lamina")
    if hf.get("scale_attn_weights", True) is False:
        raise CheckpointError("GPT-2 option scale_attn_weights=false is not supported by lamina")
    act = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("n_positions", 1024),
        n_layers=hf["n_layer"],
        d_model=hf["n_embd"],
        n_heads=hf["n_head"],
        d_ff=hf.get("n_inner") or 4 * hf["n_embd"],
        activation=_map(act, hf.get("activation_function", "gelu_new"), "activation_function"),  # type: ignore[arg-type]
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        pos_encoding="learned",
        bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
        init_std=hf.get("initializer_range", 0.02),
        emb_dropout=hf.get("embd_pdrop", 0.0),
        attn_dropout=hf.get("attn_pdrop", 0.0),
        resid_dropout=hf.get("resid_pdrop", 0.0),
    )


def _llama_config(hf: Mapping[str, Any]) -> ModelConfig:
    attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attn_bias != mlp_bias:
        raise CheckpointError(
            f"attention_bias={attn_bias} with mlp_bias={mlp_bias}: lamina has one bias switch for both"
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"Llama hidden_act={act!r} is not supported (lamina's Llama MLP is SwiGLU)")
    if hf.get("sliding_window"):
        raise CheckpointError("sliding-window attention is not supported by lamina yet")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        n_layers=hf["num_hidden_layers"],
        d_model=hf["hidden_size"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        d_ff=hf["intermediate_size"],
        activation="swiglu",
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        pos_encoding="rope",
        bias=attn_bias,
        tie_embeddings=hf.get("tie_word_embeddings", False),
        init_std=hf.get("initializer_range", 0.02),
        attn_dropout=hf.get("attention_dropout", 0.0),
        **_rope_fields(hf),
    )


def _bloom_config(hf: Mapping[str, Any]) -> ModelConfig:
    if hf.get("apply_residual_connection_post_layernorm"):
        raise CheckpointError("BLOOM option apply_residual_connection_post_layernorm=true is not supported")
    d = hf.get("hidden_size") or hf["n_embed"]
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("seq_length", 2048),  # ALiBi has no hard limit; this is the cache default
        n_layers=hf.get("n_layer") or hf["num_hidden_layers"],
        d_model=d,
        n_heads=hf.get("n_head") or hf["num_attention_heads"],
        d_ff=4 * d,
        activation="gelu_tanh",
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        emb_norm=True,
        pos_encoding="alibi",
        bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
        init_std=hf.get("initializer_range", 0.02),
    )


_BERT_HEADS: dict[str, dict[str, Any]] = {  # HF architecture -> lamina head fields
    "BertModel": {"head": "none", "pooler": True},
    "BertForMaskedLM": {"head": "lm", "lm_head_transform": True},
    "BertForSequenceClassification": {"head": "classify", "pooler": True},
    "BertForTokenClassification": {"head": "token_classify"},
}


def _bert_config(hf: Mapping[str, Any]) -> ModelConfig:
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(
            f"BERT position_embedding_type={hf['position_embedding_type']!r} is not supported; "
            "lamina reads 'absolute' (learned) positions"
        )
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise CheckpointError("BERT as a decoder (is_decoder / add_cross_attention) is not supported")
    arch = (hf.get("architectures") or ["BertModel"])[0]
    if arch not in _BERT_HEADS:
        raise CheckpointError(
            f"BERT architecture {arch!r} is not supported; lamina maps {', '.join(_BERT_HEADS)}"
        )
    head = dict(_BERT_HEADS[arch])
    n_labels = len(hf.get("id2label") or {}) or hf.get("num_labels") or 2
    if head["head"] == "classify" and (hf.get("problem_type") == "regression" or n_labels == 1):
        head["head"] = "regress"
    if head["head"] != "none" and head["head"] != "lm":
        head["n_labels"] = n_labels
        id2label = hf.get("id2label") or {}
        names = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n_labels)]
        if names != [f"LABEL_{i}" for i in range(n_labels)]:
            head["labels"] = names
    act = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
    return ModelConfig(
        arch="encoder",
        vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("max_position_embeddings", 512),
        n_layers=hf["num_hidden_layers"],
        d_model=hf["hidden_size"],
        n_heads=hf["num_attention_heads"],
        d_ff=hf["intermediate_size"],
        activation=_map(act, hf.get("hidden_act", "gelu"), "hidden_act"),  # type: ignore[arg-type]
        norm="layernorm",
        norm_placement="post",
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        emb_norm=True,
        pos_encoding="learned",
        bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
        type_vocab_size=hf.get("type_vocab_size", 2),
        init_std=hf.get("initializer_range", 0.02),
        scaled_residual_init=False,
        emb_dropout=hf.get("hidden_dropout_prob", 0.0),
        attn_dropout=hf.get("attention_probs_dropout_prob", 0.0),
        resid_dropout=hf.get("hidden_dropout_prob", 0.0),
        **head,
    )


# -- HF tensor names -> lamina ----------------------------------------------------------------------------

_LAYER = re.compile(r"^(?:model\.|transformer\.)?(?:layers|h)\.(\d+)\.(.+)$")


def _gpt2_weights(sd: StateDict, cfg: ModelConfig) -> StateDict:
    """GPT-2 stores Conv1D weights transposed (in, out) and q, k, v fused in ``c_attn``."""
    out: StateDict = {}
    d = cfg.d_model
    for name, t in sd.items():
        name = name.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of old checkpoints
            continue
        if m := _LAYER.match(name):
            i, rest = m.groups()
            p = f"blocks.{i}."
            if rest.startswith("attn.c_attn."):
                kind = rest.rsplit(".", 1)[1]
                q, k, v = (t.t() if kind == "weight" else t).split(d, dim=0)
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), (q, k, v), strict=True):
                    out[f"{p}attn.{proj}.{kind}"] = part
                continue
            table = {
                "ln_1.": "attn_norm.",
                "ln_2.": "mlp_norm.",
                "attn.c_proj.": "attn.o_proj.",
                "mlp.c_fc.": "mlp.up_proj.",
                "mlp.c_proj.": "mlp.down_proj.",
            }
            for src, dst in table.items():
                if rest.startswith(src):
                    kind = rest[len(src) :]
                    transposed = kind == "weight" and "ln_" not in src
                    out[p + dst + kind] = t.t() if transposed else t
                    break
            else:
                raise CheckpointError(f"unexpected GPT-2 tensor {name!r}")
            continue
        top = {"wte.weight": "tok_emb.weight", "wpe.weight": "pos_emb.weight", "ln_f.weight": "final_norm.weight",
               "ln_f.bias": "final_norm.bias", "lm_head.weight": "lm_head.weight"}  # fmt: skip
        if name not in top:
            raise CheckpointError(f"unexpected GPT-2 tensor {name!r}")
        out[top[name]] = t
    return out


_LLAMA_LAYER = {
    "input_layernorm.": "attn_norm.",
    "post_attention_layernorm.": "mlp_norm.",
    "self_attn.q_proj.": "attn.q_proj.",
    "self_attn.k_proj.": "attn.k_proj.",
    "self_attn.v_proj.": "attn.v_proj.",
    "self_attn.o_proj.": "attn.o_proj.",
    "mlp.gate_proj.": "mlp.gate_proj.",
    "mlp.up_proj.": "mlp.up_proj.",
    "mlp.down_proj.": "mlp.down_proj.",
}
_LLAMA_TOP = {
    "model.embed_tokens.weight": "tok_emb.weight",
    "model.norm.weight": "final_norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def _llama_weights(sd: StateDict, cfg: ModelConfig) -> StateDict:
    out: StateDict = {}
    for name, t in sd.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if m := _LAYER.match(name):
            i, rest = m.groups()
            out[f"blocks.{i}." + _rename(rest, _LLAMA_LAYER, name)] = t
        elif name in _LLAMA_TOP:
            out[_LLAMA_TOP[name]] = t
        else:
            raise CheckpointError(f"unexpected Llama tensor {name!r}")
    return out


def _bloom_weights(sd: StateDict, cfg: ModelConfig) -> StateDict:
    """BLOOM fuses q, k, v per head: rows are (n_heads, 3, head_dim)."""
    out: StateDict = {}
    H, hd = cfg.n_heads, cfg.head_dim
    assert hd is not None
    layer = {
        "input_layernorm.": "attn_norm.",
        "post_attention_layernorm.": "mlp_norm.",
        "self_attention.dense.": "attn.o_proj.",
        "mlp.dense_h_to_4h.": "mlp.up_proj.",
        "mlp.dense_4h_to_h.": "mlp.down_proj.",
    }
    top = {"word_embeddings.weight": "tok_emb.weight", "word_embeddings_layernorm.weight": "emb_norm.weight",
           "word_embeddings_layernorm.bias": "emb_norm.bias", "ln_f.weight": "final_norm.weight",
           "ln_f.bias": "final_norm.bias", "lm_head.weight": "lm_head.weight"}  # fmt: skip
    for name, t in sd.items():
        name = name.removeprefix("transformer.")
        if m := _LAYER.match(name):
            i, rest = m.groups()
            if rest.startswith("self_attention.query_key_value."):
                kind = rest.rsplit(".", 1)[1]
                parts = t.view(H, 3, hd, *t.shape[1:])
                for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                    out[f"blocks.{i}.attn.{proj}.{kind}"] = parts[:, j].reshape(H * hd, *t.shape[1:])
            else:
                out[f"blocks.{i}." + _rename(rest, layer, name)] = t
        elif name in top:
            out[top[name]] = t
        else:
            raise CheckpointError(f"unexpected BLOOM tensor {name!r}")
    return out


_BERT_LAYER = {
    "attention.self.query.": "attn.q_proj.",
    "attention.self.key.": "attn.k_proj.",
    "attention.self.value.": "attn.v_proj.",
    "attention.output.dense.": "attn.o_proj.",
    "attention.output.LayerNorm.": "attn_norm.",
    "intermediate.dense.": "mlp.up_proj.",
    "output.dense.": "mlp.down_proj.",
    "output.LayerNorm.": "mlp_norm.",
}
_BERT_TOP = {
    "embeddings.word_embeddings.weight": "tok_emb.weight",
    "embeddings.position_embeddings.weight": "pos_emb.weight",
    "embeddings.token_type_embeddings.weight": "type_emb.weight",
    "embeddings.LayerNorm.weight": "emb_norm.weight",
    "embeddings.LayerNorm.bias": "emb_norm.bias",
    "pooler.dense.weight": "pooler.dense.weight",
    "pooler.dense.bias": "pooler.dense.bias",
    "cls.predictions.transform.dense.weight": "lm_transform.dense.weight",
    "cls.predictions.transform.dense.bias": "lm_transform.dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "lm_transform.norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "lm_transform.norm.bias",
    "cls.predictions.decoder.weight": "lm_head.weight",
    "cls.predictions.bias": "lm_head.bias",
    "classifier.weight": "task_head.classifier.weight",
    "classifier.bias": "task_head.classifier.bias",
}
_BERT_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")


def _bert_weights(sd: StateDict, cfg: ModelConfig) -> StateDict:
    """BERT keeps q, k, v apart; the MLM decoder's bias appears as ``cls.predictions.bias`` and/or
    ``cls.predictions.decoder.bias`` (the same tensor); parts the config's head does not use (the NSP
    head, a pooler under an MLM head) are dropped, as ``transformers`` drops them."""
    out: StateDict = {}
    for name, t in sd.items():
        name = name.removeprefix("bert.")
        name = "cls.predictions.bias" if name == "cls.predictions.decoder.bias" else name
        if name == "embeddings.position_ids" or name.startswith("cls.seq_relationship."):
            continue
        if m := _BERT_LAYER_RE.match(name):
            i, rest = m.groups()
            out[f"blocks.{i}." + _rename(rest, _BERT_LAYER, name)] = t
        elif name in _BERT_TOP:
            out[_BERT_TOP[name]] = t
        else:
            raise CheckpointError(f"unexpected BERT tensor {name!r}")
    unused = ["pooler."] if not cfg.pooler else []
    unused += ["lm_transform.", "lm_head."] if cfg.head != "lm" else []
    return {k: v for k, v in out.items() if not k.startswith(tuple(unused))}


def _rename(rest: str, table: Mapping[str, str], full: str) -> str:
    for src, dst in table.items():
        if rest.startswith(src):
            return dst + rest[len(src) :]
    raise CheckpointError(f"unexpected tensor {full!r}")


def _map(table: Mapping[str, str], key: str, field: str) -> str:
    if key not in table:
        raise CheckpointError(f"{field}={key!r} is not supported; lamina maps {', '.join(table)}")
    return table[key]


Family = tuple[Callable[[Mapping[str, Any]], ModelConfig], Callable[[StateDict, ModelConfig], StateDict]]
FAMILIES: dict[str, Family] = {
    "gpt2": (_gpt2_config, _gpt2_weights),
    "llama": (_llama_config, _llama_weights),
    "mistral": (_llama_config, _llama_weights),
    "bloom": (_bloom_config, _bloom_weights),
    "bert": (_bert_config, _bert_weights),
    "t5": (t5_config, t5_weights),
}


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """Translate a HF ``config.json`` dict into a ``ModelConfig``."""
    return _family(hf)[0](hf)


def state_dict_from_hf(hf: Mapping[str, Any], sd: StateDict, cfg: ModelConfig) -> StateDict:
    """Rename (and split/transpose where the family needs it) HF tensors into lamina's parameter names."""
    out = _family(hf)[1](sd, cfg)
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def _family(hf: Mapping[str, Any]) -> Family:
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"config.json has model_type={model_type!r}, which lamina cannot map; supported: "
            f"{', '.join(FAMILIES)}"
        )
    try:
        return FAMILIES[model_type]
    except KeyError as e:  # pragma: no cover
        raise CheckpointError(str(e)) from e


# -- reading a HF folder ------------------------------------------------------------------------------------


def read_hf_folder(folder: str | os.PathLike[str]) -> tuple[dict[str, Any], StateDict]:
    """``config.json`` and all safetensors weights of a HF model folder (single file or sharded)."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder} has no config.json: is it a Hugging Face model folder?")
    try:
        hf = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from e
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(
            f"{folder} has no model.safetensors; lamina reads safetensors weights only "
            "(convert .bin checkpoints with `transformers` first: save_pretrained(safe_serialization=True))"
        )
    sd: StateDict = {}
    for f in files:
        try:
            sd.update(load_file(str(folder / f)))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {folder / f} (truncated or corrupt safetensors?): {e}") from e
    return hf, sd


# -- export: lamina -> HF ---------------------------------------------------------------------------------


def hf_config_from_lamina(cfg: ModelConfig) -> dict[str, Any]:
    """The HF ``config.json`` dict of the family this config belongs to (GPT-2 or Llama)."""
    family = hf_family(cfg)
    if family == "t5":
        return t5_hf_config(cfg)
    if family == "bert":
        return _bert_hf_config(cfg)
    if family == "gpt2":
        act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[cfg.activation]
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_positions": cfg.max_seq_len,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_inner": cfg.d_ff,
            "activation_function": act,
            "layer_norm_epsilon": cfg.norm_eps,
            "initializer_range": cfg.init_std,
            "embd_pdrop": cfg.emb_dropout,
            "attn_pdrop": cfg.attn_dropout,
            "resid_pdrop": cfg.resid_dropout,
            "tie_word_embeddings": cfg.tie_embeddings,
            "torch_dtype": "float32",
        }
    rope: dict[str, Any] = {"rope_type": cfg.rope_scaling or "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope["factor"] = cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        rope.update(
            original_max_position_embeddings=cfg.rope_original_max_seq_len,
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
        )
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_scaling is None else rope,
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": cfg.attn_dropout,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "torch_dtype": "float32",
    }


def _bert_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    arch = {v["head"]: k for k, v in _BERT_HEADS.items()} | {"regress": "BertForSequenceClassification"}
    out: dict[str, Any] = {
        "architectures": [arch[cfg.head]],
        "model_type": "bert",
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.d_ff,
        "hidden_act": {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}[cfg.activation],
        "layer_norm_eps": cfg.norm_eps,
        "type_vocab_size": max(cfg.type_vocab_size, 1),
        "position_embedding_type": "absolute",
        "hidden_dropout_prob": cfg.resid_dropout,
        "attention_probs_dropout_prob": cfg.attn_dropout,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": "float32",
    }
    if cfg.head in ("classify", "regress", "token_classify"):
        assert cfg.n_labels is not None
        names = cfg.labels or [f"LABEL_{i}" for i in range(cfg.n_labels)]
        out["id2label"] = {str(i): name for i, name in enumerate(names)}
        out["label2id"] = {name: i for i, name in enumerate(names)}
        if cfg.head == "regress":
            out["problem_type"] = "regression"
    return out


def _bert_exportable(cfg: ModelConfig) -> str | None:
    """None when a BERT architecture holds ``cfg`` exactly, else what stands in the way."""
    if cfg.pos_encoding != "learned" or cfg.norm != "layernorm" or not cfg.bias or not cfg.emb_norm:
        return "BERT needs learned positions, LayerNorm with biases and a norm after the embeddings"
    if (
        cfg.norm_placement != "post"
        or cfg.scale_embeddings
        or cfg.activation not in ("gelu", "gelu_tanh", "relu")
    ):
        return "BERT needs post-LN, unscaled embeddings and GELU/ReLU"
    if cfg.n_kv_heads != cfg.n_heads or cfg.head_dim != cfg.d_model // cfg.n_heads:
        return "BERT needs n_kv_heads = n_heads and head_dim = d_model // n_heads"
    if cfg.head == "lm" and not cfg.lm_head_transform:
        return "BERT's MLM head needs lm_head_transform=True"
    if cfg.head in ("classify", "regress") and not cfg.pooler:
        return "BERT's sequence classifier reads the pooler: needs pooler=True"
    return None


def hf_family(cfg: ModelConfig) -> str:
    """Which HF architecture can hold this config exactly ('gpt2', 'llama', 'bert' or 't5'); an error if none
    can."""
    if cfg.arch == "encoder-decoder":
        t5_hf_config(cfg)  # raises when T5 cannot hold it
        return "t5"
    if cfg.arch == "encoder":
        problem = _bert_exportable(cfg)
        if problem is not None:
            raise CheckpointError(
                f"this encoder has no Hugging Face equivalent lamina can export to: {problem}. "
                "Keep it as a lamina checkpoint instead"
            )
        return "bert"
    if cfg.head != "lm" or cfg.type_vocab_size or cfg.lm_head_transform:
        raise CheckpointError(
            f"a decoder with head={cfg.head!r}, type_vocab_size={cfg.type_vocab_size} or "
            "lm_head_transform=True has no Hugging Face equivalent lamina can export to yet; "
            "keep it as a lamina checkpoint"
        )
    common = not cfg.emb_norm and not cfg.scale_embeddings and cfg.norm_placement == "pre"
    if (
        common
        and cfg.pos_encoding == "learned"
        and cfg.norm == "layernorm"
        and cfg.bias
        and cfg.activation in ("gelu_tanh", "gelu", "relu")
        and cfg.n_kv_heads == cfg.n_heads
        and cfg.head_dim == cfg.d_model // cfg.n_heads
    ):
        return "gpt2"
    if common and cfg.pos_encoding == "rope" and cfg.norm == "rmsnorm" and cfg.activation == "swiglu":
        return "llama"
    raise CheckpointError(
        "this model has no Hugging Face equivalent lamina can export to (GPT-2 needs learned positions, "
        "LayerNorm, biases and GELU/ReLU; Llama needs RoPE, RMSNorm and SwiGLU; both pre-LN); "
        f"got pos_encoding={cfg.pos_encoding!r}, norm={cfg.norm!r}, activation={cfg.activation!r}, "
        f"norm_placement={cfg.norm_placement!r}. Keep it as a lamina checkpoint instead"
    )


def hf_state_dict_from_lamina(sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> StateDict:
    """lamina tensors renamed (and fused/transposed for GPT-2) into the HF family's names."""
    family = hf_family(cfg)
    if family == "t5":
        return t5_hf_weights(sd, cfg)
    out: StateDict = {}
    if family == "bert":
        inv_layer = {v: k for k, v in _BERT_LAYER.items()}
        inv_top = {v: k for k, v in _BERT_TOP.items()}
        prefix = "" if cfg.head == "none" else "bert."  # the task models keep the encoder under "bert."
        for name, t in sd.items():
            if m := re.match(r"^blocks\.(\d+)\.(.+)$", name):
                i, rest = m.groups()
                out[f"{prefix}encoder.layer.{i}." + _rename(rest, inv_layer, name)] = t
            else:
                new = inv_top[name]
                out[new if new.startswith(("cls.", "classifier.")) else prefix + new] = t
        if cfg.type_vocab_size == 0:  # HF BERT always adds a token-type embedding: one of zeros
            out[f"{prefix}embeddings.token_type_embeddings.weight"] = torch.zeros(1, cfg.d_model)
        if cfg.tie_embeddings:
            out.pop("cls.predictions.decoder.weight", None)
        return {k: v.contiguous() for k, v in out.items()}
    if family == "llama":
        inv_layer = {v: k for k, v in _LLAMA_LAYER.items()}
        inv_top = {v: k for k, v in _LLAMA_TOP.items()}
        for name, t in sd.items():
            if m := re.match(r"^blocks\.(\d+)\.(.+)$", name):
                i, rest = m.groups()
                out[f"model.layers.{i}." + _rename(rest, inv_layer, name)] = t
            else:
                out[inv_top[name]] = t
    else:
        inv = {"attn_norm.": "ln_1.", "mlp_norm.": "ln_2.", "attn.o_proj.": "attn.c_proj.",
               "mlp.up_proj.": "mlp.c_fc.", "mlp.down_proj.": "mlp.c_proj."}  # fmt: skip
        top = {"tok_emb.weight": "transformer.wte.weight", "pos_emb.weight": "transformer.wpe.weight",
               "final_norm.weight": "transformer.ln_f.weight", "final_norm.bias": "transformer.ln_f.bias",
               "lm_head.weight": "lm_head.weight"}  # fmt: skip
        for i in range(cfg.n_layers):
            p = f"blocks.{i}.attn."
            out[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat(
                [sd[p + f"{x}_proj.weight"] for x in "qkv"], dim=0
            ).t()
            out[f"transformer.h.{i}.attn.c_attn.bias"] = torch.cat([sd[p + f"{x}_proj.bias"] for x in "qkv"])
        for name, t in sd.items():
            if m := re.match(r"^blocks\.(\d+)\.(.+)$", name):
                i, rest = m.groups()
                if rest.startswith(("attn.q_proj", "attn.k_proj", "attn.v_proj")):
                    continue
                new = _rename(rest, inv, name)
                is_linear_weight = new.endswith("weight") and not new.startswith("ln_")
                out[f"transformer.h.{i}." + new] = t.t() if is_linear_weight else t
            else:
                out[top[name]] = t
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return {k: v.contiguous() for k, v in out.items()}


def write_hf_weights(sd: StateDict, path: Path) -> None:
    """Save tensors as safetensors with the ``format: pt`` metadata ``transformers`` expects."""
    save_file(sd, str(path), metadata={"format": "pt"})


def export_hf(
    folder: str | os.PathLike[str],
    model: Transformer,
    tokenizer: Tokenizer | None = None,
    generation: GenerationConfig | None = None,
    embedding: EmbeddingConfig | None = None,
) -> Path:
    """Write ``model`` as a Hugging Face folder that ``transformers`` loads, atomically.

    config.json and model.safetensors always; tokenizer.json + tokenizer_config.json (with the chat
    template) and generation_config.json (eos/bos/pad ids) so an exported chat model still chats.
    An encoder without a head (``head="none"``) also gets the sentence-transformers files (modules.json,
    pooling, max length) of ``embedding`` (default: mean pooling, unit length), so
    ``SentenceTransformer(folder)`` embeds as lamina does.
    """
    cfg = model.config
    hf_cfg = hf_config_from_lamina(cfg)
    weights = hf_state_dict_from_lamina(weights_for_saving(model), cfg)
    special = _special_token_ids(cfg, tokenizer, generation)
    hf_cfg.update(special)

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        write_hf_weights(weights, tmp / "model.safetensors")
        gen = {k: v for k, v in special.items() if v is not None}
        if cfg.arch == "encoder-decoder":
            gen["decoder_start_token_id"] = cfg.decoder_start_token_id
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
        if cfg.arch == "encoder" and cfg.head == "none":
            (embedding or EmbeddingConfig(max_seq_len=cfg.max_seq_len)).write(tmp, cfg.d_model)

    return atomic_folder(folder, write)


def _special_token_ids(
    cfg: ModelConfig, tokenizer: Tokenizer | None, generation: GenerationConfig | None
) -> dict[str, Any]:
    """config.json's bos/eos/pad ids: ids the vocabulary holds, else null.

    bos and eos are always written, null when unknown: transformers would otherwise fill in its class
    defaults (GPT-2: 50256, Llama: 1 and 2), ids a small vocabulary may not have. eos is every id of
    ``generation.eos_token_ids`` (else the tokenizer's eos): one as an int, several as a list. pad is
    written only when known (BERT's default, 0, exists in every vocabulary).
    """

    def known(i: int | None) -> int | None:
        return i if i is not None and 0 <= i < cfg.vocab_size else None

    eos = list(generation.eos_token_ids) if generation is not None else []
    if not eos and tokenizer is not None:
        eos = tokenizer.eos_token_ids
    eos = [i for i in eos if known(i) is not None]
    out: dict[str, Any] = {
        "bos_token_id": known(tokenizer.bos_token_id) if tokenizer is not None else None,
        "eos_token_id": (eos[0] if len(eos) == 1 else eos) if eos else None,
    }
    pad = known(tokenizer.pad_token_id) if tokenizer is not None else None
    if pad is not None:
        out["pad_token_id"] = pad
    return out
