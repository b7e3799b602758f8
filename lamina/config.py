"""Configs: the single source of truth for every hyperparameter.

``ModelConfig`` describes one transformer of lamina's config-driven family; ``GenerationConfig`` the
default decoding controls stored with a checkpoint. Both are plain dataclasses that round-trip through
YAML (``save_yaml`` / ``load_yaml``) and dicts (``to_dict`` / ``from_dict``); an unknown key is an error
that names the nearest valid keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, get_args, get_type_hints

import yaml

from lamina.errors import ConfigError
from lamina.fields import build, parse_yaml

Activation = Literal["gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu", "geglu_tanh"]
NormType = Literal["layernorm", "rmsnorm"]
NormPlacement = Literal["pre", "post"]
PosEncoding = Literal["learned", "sinusoidal", "rope", "alibi", "relative", "none"]
RopeScaling = Literal["linear", "dynamic", "llama3"]
Initializer = Literal["normal", "xavier", "kaiming", "t5"]
Arch = Literal["decoder", "encoder", "encoder-decoder"]
Head = Literal["lm", "none", "classify", "regress", "token_classify"]

GATED_ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh")


@dataclass
class ModelConfig:
    """Every architecture knob of one transformer.

    Defaults describe a small pre-LN GPT; presets (``ModelConfig.preset("smollm2-135m")``) fill in known
    architectures. Derived values (``head_dim``, ``n_kv_heads``, ``d_ff``) may be left ``None``.
    """

    # decoder: causal attention; encoder: bidirectional (BERT); encoder-decoder: an encoder stack of n_layers
    # and a decoder stack that also attends to the encoder's output (T5, the original Transformer)
    arch: Arch = "decoder"
    vocab_size: int = 50304  # token ids the embedding table holds, >= the tokenizer's vocabulary size
    max_seq_len: int = 1024  # context window in tokens
    n_layers: int = 6  # transformer blocks (encoder-decoder: of the encoder)
    n_decoder_layers: int | None = None  # encoder-decoder: decoder blocks (None: = n_layers)
    d_model: int = 384  # embedding size
    n_heads: int = 6  # attention (query) heads; must divide d_model unless head_dim is set
    n_kv_heads: int | None = None  # key/value heads (None: = n_heads, MHA; 1: MQA; a divisor in between: GQA)
    head_dim: int | None = None  # width of each head (None: d_model // n_heads)
    d_ff: int | None = None  # MLP hidden size (None: 4 * d_model; 8/3 * d_model rounded up to 64 if gated)
    # MLP activation: gelu (exact), gelu_tanh (GPT-2's tanh approximation), relu, silu, or the gated
    # swiglu (Llama), geglu and geglu_tanh (T5 v1.1 / Flan-T5 "gated-gelu")
    activation: Activation = "gelu"
    norm: NormType = "layernorm"  # layernorm (GPT-2, BERT) or rmsnorm (Llama: no mean, no bias)
    # pre: norm at the start of each residual branch, plus a final norm (GPT-2, Llama); post: norm after
    # each residual add (BERT, the original Transformer)
    norm_placement: NormPlacement = "pre"
    norm_eps: float = 1e-5  # epsilon added to the variance in every norm, > 0
    emb_norm: bool = False  # a norm right after the embeddings (BLOOM, BERT)
    # positions: learned embeddings (GPT-2, BERT), sinusoidal, rope (Llama), alibi (BLOOM; decoders only),
    # relative (T5's bucketed bias, one table per stack) or none
    pos_encoding: PosEncoding = "learned"
    relative_attention_num_buckets: int = 32  # pos_encoding=relative: buckets of relative distance (T5: 32)
    relative_attention_max_distance: int = 128  # pos_encoding=relative: distances past this share a bucket
    rope_theta: float = 10000.0  # RoPE base of the rotation frequencies, > 0 (pos_encoding=rope)
    # RoPE context extension (HF semantics): linear (positions / rope_factor), dynamic (NTK base growth
    # past rope_original_max_seq_len) or llama3; None: off
    rope_scaling: RopeScaling | None = None
    rope_factor: float = 1.0  # rope_scaling's factor, >= 1: how many times the context is stretched
    rope_original_max_seq_len: int | None = None  # dynamic / llama3 scaling: the pretraining context
    # llama3 scaling (HF low_freq_factor): wavelengths above rope_original_max_seq_len / this get rope_factor
    rope_low_freq_factor: float = 1.0
    # llama3 scaling (HF high_freq_factor): wavelengths below rope_original_max_seq_len / this stay unscaled
    rope_high_freq_factor: float = 4.0
    emb_dropout: float = 0.0  # dropout on the embeddings' sum, in [0, 1)
    attn_dropout: float = 0.0  # dropout on the attention probabilities, in [0, 1)
    resid_dropout: float = 0.0  # dropout on each residual branch's output and before task heads, in [0, 1)
    bias: bool = True  # biases in linear layers and LayerNorms
    tie_embeddings: bool = True  # the lm head reuses the token embedding matrix (one weight, counted once)
    scale_embeddings: bool = False  # multiply token embeddings by sqrt(d_model) (original Transformer)
    scale_attention: bool = True  # scores q.k / sqrt(head_dim); False: unscaled q.k (T5)
    scale_decoder_outputs: bool = False  # final hidden states x d_model ** -0.5 before the lm head (T5 v1.0)
    decoder_start_token_id: int = 0  # encoder-decoder: the first decoder input of every target (T5: 0, pad)
    # encoder-decoder: a pointer-generator copy head (See et al. 2017) mixes copying source tokens into the output
    copy_attention: bool = False
    initializer: Initializer = "normal"  # normal(0, init_std), xavier (uniform), kaiming or t5 (HF T5's)
    init_std: float = 0.02  # std of initializer normal (the others set their own), > 0 (GPT-2: 0.02)
    scaled_residual_init: bool = True  # std / sqrt(2 * n_layers) on residual output projections
    type_vocab_size: int = 0  # > 0: token-type (segment) embeddings added to the input (BERT: 2)
    head: Head = "lm"  # the output: lm logits, none (hidden states), or a task head (see lamina.model.heads)
    lm_head_transform: bool = False  # dense + activation + norm and a bias in the lm head (BERT's MLM head)
    pooler: bool = False  # dense + tanh on the first token, fed to sequence heads (BERT's pooler)
    n_labels: int | None = None  # classes of classify / token_classify, outputs of regress (None: 1 there)
    labels: list[str] | None = None  # names of the task head's outputs (HF id2label), n_labels of them

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and self.n_heads > 0 and self.d_model % self.n_heads == 0:
            self.head_dim = self.d_model // self.n_heads
        if self.d_ff is None:
            if self.activation in GATED_ACTIVATIONS:
                self.d_ff = 64 * math.ceil(8 * self.d_model / 3 / 64)
            else:
                self.d_ff = 4 * self.d_model
        if self.n_labels is None and self.head == "regress":
            self.n_labels = 1
        if self.n_decoder_layers is None and self.arch == "encoder-decoder":
            self.n_decoder_layers = self.n_layers
        self.validate()

    # -- validation -------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ConfigError`` naming the fields and values of any invalid setting or combination."""
        _check_types(self)
        for name in ("vocab_size", "max_seq_len", "n_layers", "d_model", "n_heads", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        assert self.n_kv_heads is not None and self.d_ff is not None
        if self.head_dim is not None and self.head_dim <= 0:
            raise ConfigError(
                f"head_dim={self.head_dim} must be a positive integer (or None for d_model // n_heads)"
            )
        if self.head_dim is None:
            raise ConfigError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}: choose n_heads that "
                f"divides d_model (e.g. {_divisors_near(self.d_model, self.n_heads)}) or set head_dim explicitly"
            )
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads != 0:
            raise ConfigError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} "
                "(n_kv_heads = n_heads for MHA, 1 for MQA, a divisor in between for GQA)"
            )
        if self.pos_encoding == "rope" and self.rope_theta <= 0:
            raise ConfigError(f"rope_theta={self.rope_theta} must be positive (10000 is the usual base)")
        if self.pos_encoding == "rope" and self.head_dim % 2 != 0:
            raise ConfigError(f"pos_encoding='rope' needs an even head_dim, got head_dim={self.head_dim}")
        if self.pos_encoding == "sinusoidal" and self.d_model % 2 != 0:
            raise ConfigError(f"pos_encoding='sinusoidal' needs an even d_model, got d_model={self.d_model}")
        for name in ("emb_dropout", "attn_dropout", "resid_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ConfigError(f"{name}={p} must be in [0, 1)")
        if self.norm_eps <= 0:
            raise ConfigError(f"norm_eps={self.norm_eps} must be positive")
        if self.init_std <= 0:
            raise ConfigError(f"init_std={self.init_std} must be positive")
        if (
            self.initializer != "normal"
            and self.init_std != ModelConfig.__dataclass_fields__["init_std"].default
        ):
            raise ConfigError(
                f"init_std={self.init_std} is used by initializer normal only (this config: initializer "
                f"{self.initializer}, which sets its own scales): set initializer normal to use it, or drop init_std"
            )
        if self.rope_scaling is not None:
            if self.pos_encoding != "rope":
                raise ConfigError(
                    f"rope_scaling={self.rope_scaling!r} needs pos_encoding='rope', got {self.pos_encoding!r}"
                )
            if self.rope_factor < 1.0:
                raise ConfigError(f"rope_factor={self.rope_factor} must be >= 1 when rope_scaling is set")
            if self.rope_scaling in ("dynamic", "llama3") and self.rope_original_max_seq_len is None:
                raise ConfigError(
                    f"rope_scaling={self.rope_scaling!r} needs rope_original_max_seq_len "
                    "(the context length the model was pretrained with)"
                )
        self._validate_encoder()
        self._validate_encoder_decoder()

    def _validate_encoder_decoder(self) -> None:
        """The fields of encoder-decoder models and of T5's relative positions."""
        if self.pos_encoding == "relative":
            if self.relative_attention_num_buckets < 4:
                raise ConfigError(
                    f"relative_attention_num_buckets={self.relative_attention_num_buckets} must be >= 4 (T5: 32)"
                )
            if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 2:
                raise ConfigError(
                    f"relative_attention_max_distance={self.relative_attention_max_distance} must be larger "
                    f"than relative_attention_num_buckets // 2 = {self.relative_attention_num_buckets // 2} "
                    "(T5: 128 with 32 buckets)"
                )
        if self.arch != "encoder-decoder":
            if self.copy_attention:
                raise ConfigError(
                    f"copy_attention copies source tokens: it needs arch='encoder-decoder', got arch={self.arch!r}"
                )
            if self.n_decoder_layers is not None:
                raise ConfigError(
                    f"n_decoder_layers={self.n_decoder_layers} is for arch='encoder-decoder', got "
                    f"arch={self.arch!r}: leave it unset (n_layers counts the blocks)"
                )
            return
        if self.n_decoder_layers is None or self.n_decoder_layers <= 0:
            raise ConfigError(f"n_decoder_layers={self.n_decoder_layers} must be a positive integer")
        if self.pos_encoding in ("learned", "alibi"):
            raise ConfigError(
                f"arch='encoder-decoder' with pos_encoding={self.pos_encoding!r} is not supported; use relative "
                "(T5), sinusoidal (the original Transformer), rope or none"
            )
        if (
            self.head != "lm"
            or self.type_vocab_size
            or self.lm_head_transform
            or self.pooler
            or self.emb_norm
        ):
            raise ConfigError(
                f"arch='encoder-decoder' needs head='lm' without token types, lm_head_transform, pooler or "
                f"emb_norm; got head={self.head!r}, type_vocab_size={self.type_vocab_size}, "
                f"lm_head_transform={self.lm_head_transform}, pooler={self.pooler}, emb_norm={self.emb_norm}"
            )
        if not 0 <= self.decoder_start_token_id < self.vocab_size:
            raise ConfigError(
                f"decoder_start_token_id={self.decoder_start_token_id} is not a token id of the vocabulary "
                f"(0 .. {self.vocab_size - 1})"
            )

    def _validate_encoder(self) -> None:
        """The fields of encoders and task heads, alone and together."""
        if self.type_vocab_size < 0:
            raise ConfigError(f"type_vocab_size={self.type_vocab_size} must be >= 0 (0 = no token types)")
        if self.head in ("classify", "token_classify") and (self.n_labels is None or self.n_labels < 2):
            raise ConfigError(
                f"head={self.head!r} needs n_labels >= 2 (the number of classes), got n_labels={self.n_labels}"
            )
        if self.head == "regress" and (self.n_labels is None or self.n_labels < 1):
            raise ConfigError(f"head='regress' needs n_labels >= 1 (outputs), got n_labels={self.n_labels}")
        if self.head in ("lm", "token_classify") and self.pooler:
            raise ConfigError(
                f"pooler=True feeds sequence heads (head='classify' or 'regress', or 'none' to keep it), "
                f"got head={self.head!r}; set pooler=False"
            )
        if self.head in ("lm", "none") and self.n_labels is not None:
            raise ConfigError(
                f"n_labels={self.n_labels} is for task heads; head={self.head!r} has none: leave n_labels unset"
            )
        if self.labels is not None and len(self.labels) != self.n_labels:
            raise ConfigError(
                f"labels has {len(self.labels)} names but n_labels={self.n_labels}: give one name per output"
            )
        if self.lm_head_transform and self.head != "lm":
            raise ConfigError(f"lm_head_transform=True needs head='lm', got head={self.head!r}")
        if self.arch == "encoder" and self.pos_encoding == "alibi":
            raise ConfigError(
                "arch='encoder' with pos_encoding='alibi' is not supported (lamina's ALiBi is causal); "
                "use learned, sinusoidal or rope positions"
            )

    # -- derived numbers ---------------------------------------------------------------------------------
    @property
    def n_params(self) -> int:
        """Total number of parameters (tied embeddings counted once)."""
        return sum(self.param_counts().values())

    def param_counts(self) -> dict[str, int]:
        """Parameters by part: embeddings, positional, attention, mlp, norms, head.

        An encoder-decoder counts both stacks: its decoder blocks hold a cross-attention (in "attention")
        and a third norm; ``relative`` positions hold one bias table per stack.
        """
        assert self.head_dim is not None and self.n_kv_heads is not None and self.d_ff is not None
        d, b = self.d_model, int(self.bias)
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attn = d * q + 2 * d * kv + q * d + b * (q + 2 * kv + d)
        n_in = 2 if self.activation in GATED_ACTIVATIONS else 1
        mlp = n_in * (d * self.d_ff + b * self.d_ff) + self.d_ff * d + b * d
        norm = d * (2 if self.norm == "layernorm" and self.bias else 1)
        pre = int(self.norm_placement == "pre")
        n_norms = 2 * self.n_layers + pre + int(self.emb_norm)
        n_stacks, n_attn, n_mlp = 1, self.n_layers, self.n_layers
        if self.arch == "encoder-decoder":
            assert self.n_decoder_layers is not None
            n_dec = self.n_decoder_layers
            n_stacks, n_attn, n_mlp = 2, self.n_layers + 2 * n_dec, self.n_layers + n_dec
            n_norms += 3 * n_dec + pre
        if self.head == "lm":
            head = (0 if self.tie_embeddings else self.vocab_size * d) + int(self.lm_head_transform) * (
                d * d + d + norm + self.vocab_size
            )
            head += int(self.copy_attention) * (2 * d * d + 2 * d + 1)  # copy query/key, p_gen
        elif self.head == "none":
            head = int(self.pooler) * (d * d + d)
        else:
            assert self.n_labels is not None
            head = int(self.pooler) * (d * d + d) + d * self.n_labels + self.n_labels
        positional = {
            "learned": self.max_seq_len * d,
            "relative": self.relative_attention_num_buckets * self.n_heads,
        }
        return {
            "embeddings": (self.vocab_size + self.type_vocab_size) * d,
            "positional": n_stacks * positional.get(self.pos_encoding, 0),
            "attention": n_attn * attn,
            "mlp": n_mlp * mlp,
            "norms": n_norms * norm,
            "head": head,
        }

    @property
    def n_matmul_params(self) -> int:
        """Parameters that take part in matrix multiplies per token (attention, MLP and the output head)."""
        c = self.param_counts()
        if self.head != "lm":
            return c["attention"] + c["mlp"] + c["head"]
        return (
            c["attention"]
            + c["mlp"]
            + self.vocab_size * self.d_model
            + int(self.lm_head_transform) * (self.d_model * self.d_model)
        )

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> int:
        """Model FLOPs per token at context ``seq_len`` (PaLM appendix B / nanoGPT ``estimate_mfu``).

        Forward is 2 x matmul parameters + 2 x 2 x n_layers x seq_len x (n_heads x head_dim) for
        attention scores and values; training (forward + backward) is three times that. An
        encoder-decoder's "token" is one source plus one target token (both sequences ``seq_len`` long):
        all its matmul parameters, and the encoder's, decoder's and cross attention over ``seq_len`` keys.
        """
        assert self.head_dim is not None
        t = self.max_seq_len if seq_len is None else seq_len
        n_attn = self.n_layers + 2 * (self.n_decoder_layers or 0)
        forward = 2 * self.n_matmul_params + 4 * n_attn * t * self.n_heads * self.head_dim
        return 3 * forward if training else forward

    # -- presets and I/O ---------------------------------------------------------------------------------
    EXTRA_KEYS: ClassVar[tuple[str, ...]] = ("preset",)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named architecture (``gpt2``, ``smollm2-135m``, ``tiny``, ...) with optional field overrides."""
        return from_dict(cls, {"preset": name, **overrides})

    @staticmethod
    def preset_names() -> list[str]:
        """The names ``preset`` accepts."""
        return list(PRESETS)

    @staticmethod
    def resolve_dict(data: dict[str, Any]) -> dict[str, Any]:
        """The rule between fields of a mapping: ``preset: NAME`` fills the preset's fields, then the
        mapping's own fields override them (``{preset: tiny, n_layers: 4}``)."""
        return _with_preset(data, PRESETS, "model")


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layers=2, d_model=128, n_heads=4, max_seq_len=256, vocab_size=8192),
    "small": dict(n_layers=6, d_model=384, n_heads=6, max_seq_len=256, vocab_size=8192),
    "gpt2": dict(
        vocab_size=50257, max_seq_len=1024, n_layers=12, d_model=768, n_heads=12, activation="gelu_tanh"
    ),
    "gpt2-medium": dict(
        vocab_size=50257, max_seq_len=1024, n_layers=24, d_model=1024, n_heads=16, activation="gelu_tanh"
    ),
    "llama-tiny": dict(
        n_layers=2, d_model=128, n_heads=4, n_kv_heads=2, max_seq_len=256, vocab_size=8192,
        activation="swiglu", norm="rmsnorm", pos_encoding="rope", bias=False,
    ),
    "smollm2-135m": dict(
        vocab_size=49152, max_seq_len=8192, n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, d_ff=1536,
        activation="swiglu", norm="rmsnorm", norm_eps=1e-5, pos_encoding="rope", rope_theta=100000.0,
        bias=False, tie_embeddings=True, init_std=0.041666666666666664,
    ),
    "bert-base": dict(
        arch="encoder", vocab_size=30522, max_seq_len=512, n_layers=12, d_model=768, n_heads=12,
        d_ff=3072, activation="gelu", norm_placement="post", norm_eps=1e-12, emb_norm=True,
        type_vocab_size=2, lm_head_transform=True, scaled_residual_init=False,
    ),
    "minilm-l6": dict(
        arch="encoder", vocab_size=30522, max_seq_len=512, n_layers=6, d_model=384, n_heads=12,
        d_ff=1536, activation="gelu", norm_placement="post", norm_eps=1e-12, emb_norm=True,
        type_vocab_size=2, head="none", pooler=True, scaled_residual_init=False,
    ),
    "smollm2-360m": dict(
        vocab_size=49152, max_seq_len=8192, n_layers=32, d_model=960, n_heads=15, n_kv_heads=5, d_ff=2560,
        activation="swiglu", norm="rmsnorm", norm_eps=1e-5, pos_encoding="rope", rope_theta=100000.0,
        bias=False, tie_embeddings=True,
    ),
    # encoder-decoder: T5 (Raffel et al. 2020), T5 v1.1 / Flan-T5, "Attention Is All You Need" (2017)
    "t5-small": dict(
        arch="encoder-decoder", vocab_size=32128, max_seq_len=512, n_layers=6, d_model=512, n_heads=8,
        d_ff=2048, activation="relu", norm="rmsnorm", norm_eps=1e-6, pos_encoding="relative", bias=False,
        scale_attention=False, tie_embeddings=True, scale_decoder_outputs=True, emb_dropout=0.1,
        resid_dropout=0.1, attn_dropout=0.1, scaled_residual_init=False, initializer="t5",
    ),
    "t5-v1_1-small": dict(
        arch="encoder-decoder", vocab_size=32128, max_seq_len=512, n_layers=8, d_model=512, n_heads=6,
        head_dim=64, d_ff=1024, activation="geglu_tanh", norm="rmsnorm", norm_eps=1e-6,
        pos_encoding="relative", bias=False, scale_attention=False, tie_embeddings=False,
        emb_dropout=0.1, resid_dropout=0.1, attn_dropout=0.1, scaled_residual_init=False, initializer="t5",
    ),
    "transformer-base": dict(
        arch="encoder-decoder", vocab_size=37000, max_seq_len=512, n_layers=6, d_model=512, n_heads=8,
        d_ff=2048, activation="relu", norm_placement="post", pos_encoding="sinusoidal",
        scale_embeddings=True, tie_embeddings=True, emb_dropout=0.1, resid_dropout=0.1,
        initializer="xavier", scaled_residual_init=False,
    ),
    "t5-tiny": dict(
        arch="encoder-decoder", vocab_size=512, max_seq_len=128, n_layers=2, d_model=64, n_heads=4,
        d_ff=128, activation="relu", norm="rmsnorm", norm_eps=1e-6, pos_encoding="relative",
        relative_attention_num_buckets=8, relative_attention_max_distance=16, bias=False,
        scale_attention=False, tie_embeddings=True, scale_decoder_outputs=True, scaled_residual_init=False, initializer="t5",
    ),
}  # fmt: skip


# -- generic dataclass <-> dict / YAML --------------------------------------------------------------------
T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as a plain dict (YAML/JSON-ready)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: Mapping[str, Any], where: str | None = None) -> T:
    """Build config ``cls`` from ``data`` (``lamina.fields.build``: the one path of YAML, flags and
    keywords); an unknown key raises ``ConfigError`` naming the nearest keys."""
    return build(cls, data, where)


def _with_preset(data: dict[str, Any], presets: Mapping[str, Mapping[str, Any]], what: str) -> dict[str, Any]:
    """``data`` with ``preset: NAME`` replaced by that preset's fields (``data``'s own fields win)."""
    data = dict(data)
    name = data.pop("preset", None)
    if name is None:
        return data
    if name not in presets:
        raise ConfigError(
            f"unknown {what} preset {name!r}{_did_you_mean(name, presets)}; presets: {', '.join(sorted(presets))}"
        )
    return {**presets[name], **data}


def save_yaml(cfg: Any, path: str | os.PathLike[str]) -> None:
    """Write a config dataclass to a YAML file."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_yaml(cls: type[T], path: str | os.PathLike[str]) -> T:
    """Read config ``cls`` from a YAML file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = parse_yaml(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {e}") from e
    return from_dict(cls, data)


def _did_you_mean(key: str, choices: Any) -> str:
    close = difflib.get_close_matches(key, list(choices), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def _divisors_near(n: int, k: int) -> str:
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return ", ".join(str(d) for d in sorted(divs, key=lambda d: abs(d - k))[:3])


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """``get_type_hints(cls)``, once per class (it evaluates every annotation: ~4 ms, per config made,
    e.g. per generated sequence)."""
    return get_type_hints(cls)


def _check_types(cfg: Any) -> None:
    """Check every field against its annotation: Literal choices, int, float (ints accepted), bool, lists.

    Floats given as ints are converted (``norm_eps: 1`` -> 1.0); anything else of the wrong type is a
    ``ConfigError`` naming the field, the value and the expected type.
    """
    hints = _type_hints(cfg.__class__)
    for f in dataclasses.fields(cfg):
        tp, value = hints[f.name], getattr(cfg, f.name)
        allowed = _literal_values(tp)
        if allowed is not None:
            if value not in allowed:
                options = ", ".join(repr(a) for a in allowed)
                raise ConfigError(f"{f.name}={value!r} is not one of {options}")
            continue
        args = get_args(tp)
        if value is None and type(None) in args:
            continue
        core = next((a for a in args if a is not type(None)), tp) if args and type(None) in args else tp
        origin = getattr(core, "__origin__", None)
        ok = True
        if core is bool:
            ok = isinstance(value, bool)
        elif core is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif core is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if ok:
                setattr(cfg, f.name, float(value))
        elif core is str:
            ok = isinstance(value, str)
        elif origin is list:
            (item,) = get_args(core) or (object,)
            ok = isinstance(value, list) and all(_is_instance(v, item) for v in value)
        elif origin is dict:
            ok = isinstance(value, dict)
            if ok:  # JSON keys are strings ("50256": -100) and YAML/JSON floats may be ints: convert
                key_tp, val_tp = get_args(core)
                converted = {_as(k, key_tp): _as(v, val_tp) for k, v in value.items()}
                ok = all(_is_instance(k, key_tp) and _is_instance(v, val_tp) for k, v in converted.items())
                if ok:
                    setattr(cfg, f.name, converted)
        if not ok:
            expected = str(core) if get_args(core) else getattr(core, "__name__", str(core))
            raise ConfigError(
                f"{f.name}={value!r} ({type(value).__name__}) must be of type {expected}"
                + (" or None" if type(None) in args else "")
            )


def _is_instance(value: Any, tp: Any) -> bool:
    """``isinstance`` for annotations: bools are not ints, and ``list[X]`` checks every item."""
    if tp is object:
        return True
    if getattr(tp, "__origin__", None) is list:
        (item,) = get_args(tp) or (object,)
        return isinstance(value, list) and all(_is_instance(v, item) for v in value)
    return isinstance(value, tp) and not isinstance(value, bool)


def _as(value: Any, tp: Any) -> Any:
    """``value`` converted where the conversion is lossless: "12" -> 12 for int keys, 1 -> 1.0 for floats."""
    if tp is int and isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _literal_values(tp: Any) -> tuple[Any, ...] | None:
    args = get_args(tp)
    if getattr(tp, "__origin__", None) is Literal:
        return args
    # Optional[Literal[...]]: allow None as well
    lits = [a for a in args if getattr(a, "__origin__", None) is Literal]
    if lits and type(None) in args:
        return (*get_args(lits[0]), None)
    return None


Stage = Literal["first", "penalty", "truncation", "temperature"]


@dataclass(frozen=True)
class LogitsProcessor:
    """One entry of ``LOGITS_PROCESSORS``: a step that changes the logits before a token is picked.

    ``name`` is its ``samplers`` entry (chain stages); ``fields`` are the ``GenerationConfig`` fields it
    reads; ``on(cfg)`` says whether a config switches it on (off, it leaves the logits unchanged);
    ``stage`` says when it runs: "first" (always, before the chain, greedy decoding included: biases and
    bans), "penalty" (in the chain, greedy included), "truncation" (in the chain, only when sampling;
    mirostat replaces them), "temperature" (in the chain, only when sampling, mirostat included);
    ``apply`` names the function of ``lamina.generate.sampling`` that runs it, ``(logits (B, V), cfg,
    context) -> logits``.
    """

    name: str
    fields: tuple[str, ...]
    on: Callable[[Any], bool]
    stage: Stage
    apply: str


LOGITS_PROCESSORS: tuple[LogitsProcessor, ...] = (
    LogitsProcessor("logit_bias", ("logit_bias",), lambda c: bool(c.logit_bias), "first", "_step_logit_bias"),
    LogitsProcessor("bad_words_ids", ("bad_words_ids",), lambda c: bool(c.bad_words_ids), "first",
                    "_step_bad_words"),
    LogitsProcessor("allowed_token_ids", ("allowed_token_ids",), lambda c: c.allowed_token_ids is not None,
                    "first", "_step_allowed_tokens"),
    LogitsProcessor("no_repeat_ngram_size", ("no_repeat_ngram_size",), lambda c: c.no_repeat_ngram_size > 0,
                    "first", "_step_no_repeat_ngram"),
    LogitsProcessor("min_new_tokens", ("min_new_tokens", "eos_token_ids", "ignore_eos", "stop_token_ids"),
                    lambda c: c.min_new_tokens > 0, "first", "_step_min_new_tokens"),
    # the chain, in llama.cpp's default order (``SAMPLER_NAMES``)
    LogitsProcessor("penalties", ("repetition_penalty", "repetition_penalty_last_n", "frequency_penalty",
                                  "presence_penalty"),
                    lambda c: c.repetition_penalty != 1 or c.frequency_penalty != 0 or c.presence_penalty != 0,
                    "penalty", "_step_penalties"),
    LogitsProcessor("dry", ("dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n",
                            "dry_sequence_breakers"), lambda c: c.dry_multiplier > 0, "penalty", "_step_dry"),
    LogitsProcessor("top_n_sigma", ("top_n_sigma",), lambda c: c.top_n_sigma is not None and c.top_n_sigma > 0,
                    "truncation", "_step_top_n_sigma"),
    LogitsProcessor("top_k", ("top_k",), lambda c: c.top_k > 0, "truncation", "_step_top_k"),
    LogitsProcessor("typical_p", ("typical_p",), lambda c: c.typical_p < 1, "truncation", "_step_typical_p"),
    LogitsProcessor("top_p", ("top_p",), lambda c: c.top_p < 1, "truncation", "_step_top_p"),
    LogitsProcessor("min_p", ("min_p",), lambda c: c.min_p > 0, "truncation", "_step_min_p"),
    LogitsProcessor("xtc", ("xtc_probability", "xtc_threshold"), lambda c: c.xtc_probability > 0, "truncation",
                    "_step_xtc"),
    LogitsProcessor("temperature", ("temperature", "dynatemp_range", "dynatemp_exponent"),
                    lambda c: c.temperature not in (0, 1) or c.dynatemp_range > 0, "temperature",
                    "_step_temperature"),
)  # fmt: skip
"""Everything that changes logits, in the order it runs by default: adding a sampler is one entry here
(with its fields on ``GenerationConfig`` and its step function in ``lamina.generate.sampling``). The
sampler names, the config's checks that a switched-on sampler is in ``samplers``, the greedy fast path
and the fields the sampler never reads are all derived from it."""

PICK_FIELDS = ("do_sample", "mirostat", "mirostat_tau", "mirostat_eta", "samplers")
"""Fields that decide how the token is picked from the processed logits (with ``temperature``): greedy
or a draw, mirostat, the chain's order."""

SAMPLER_NAMES = tuple(p.name for p in LOGITS_PROCESSORS if p.stage != "first")
"""Every name ``GenerationConfig.samplers`` accepts; also the default order (llama.cpp's)."""

_SAMPLER_ALIASES = {  # llama.cpp / HF spellings -> lamina's names, for "did you mean" hints
    "typ_p": "typical_p", "typical": "typical_p", "typ": "typical_p", "temp": "temperature",
    "top-k": "top_k", "top-p": "top_p", "min-p": "min_p", "top-n-sigma": "top_n_sigma",
    "top_n": "top_n_sigma", "repetition_penalty": "penalties", "penalty": "penalties",
}  # fmt: skip

DEFAULT_DRY_SEQUENCE_BREAKERS = ["\n", ":", '"', "*"]  # llama.cpp's defaults
TOKEN_IDS = {"token_ids": True}  # metadata of GenerationConfig fields that hold token ids


def parse_json_schema(text: str) -> dict[str, Any]:
    """``json_schema`` from text: JSON (an object; YAML flow style also reads), or the path of a file
    holding it. Raises ``ValueError`` for anything else."""
    source = text.strip()
    if not source.startswith("{"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ValueError("must be a JSON object or the path of a .json file holding one (no such file)")
        source = path.read_text(encoding="utf-8")
    try:
        value = json.loads(source)
    except json.JSONDecodeError as e:
        try:  # YAML's flow style (a run file's ``json_schema: {type: object}``) is a superset of JSON
            value = yaml.safe_load(source)
        except yaml.YAMLError:
            raise ValueError(f"is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError("must be a JSON object")
    return {str(k): v for k, v in value.items()}


def parse_text_or_file(text: str) -> str:
    """Text as given, or the contents of the file it names (a grammar file)."""
    path = Path(text.strip()).expanduser()
    if "\n" not in text and len(text) < 4096 and path.is_file():
        return path.read_text(encoding="utf-8")
    return text


def parse_logprobs(text: str | int) -> bool:
    """``logprobs`` from text: true or false. A number raises ``ValueError``, as ambiguous: OpenAI's two
    APIs read it two ways (chat: a bool; legacy completions: a count of alternatives per token)."""
    word = str(text).strip().lower()
    if isinstance(text, int) or re.fullmatch(r"[+-]?\d+", word):
        raise ValueError(
            "ambiguous: logprobs is a bool (true: each generated token's log-probability, as OpenAI's chat "
            f"API); a count of alternatives per token (the legacy completions API's logprobs={word}) is "
            f"logprobs=true with top_logprobs={word}"
        )
    if word in ("true", "yes", "on", "y"):
        return True
    if word in ("false", "no", "off", "n"):
        return False
    raise ValueError("must be true or false")


@dataclass
class GenerationConfig:
    """Decoding controls of one request; stored with a checkpoint as ``generation.yaml``.

    The union of what ``transformers`` (``GenerationConfig``), vLLM (``SamplingParams``) and llama.cpp
    offer, under the names users know and with their semantics. Every value is checked here, so the
    sampler (``lamina.generate.sampling``) trusts its inputs.

    **Greedy or sampling.** ``do_sample=None`` (the default) samples iff ``temperature > 0`` and
    ``num_beams == 1``; ``temperature=0`` or ``do_sample=False`` is greedy (argmax). Greedy decoding still
    applies the *logit processors* (logit_bias, bad_words_ids, allowed_token_ids, no_repeat_ngram_size,
    min_new_tokens, and the "penalties" and "dry" samplers) but none of the truncation samplers.

    **Order** in which logits are changed, for each sequence:

    1. always, first: ``logit_bias``; ``bad_words_ids``; ``allowed_token_ids``; ``no_repeat_ngram_size``;
       ``min_new_tokens`` (these only add biases or ban tokens, so their mutual order does not matter);
    2. the chain ``samplers``, in its order (llama.cpp style; default
       ``["penalties", "dry", "top_n_sigma", "top_k", "typical_p", "top_p", "min_p", "xtc",
       "temperature"]``: temperature last, so truncation sees the unscaled distribution). A sampler
       left out of the list is not applied (setting its field then is an error). HF's order is
       ``["penalties", "temperature", "top_k", "top_p", "min_p", "typical_p"]``;
    3. the token is drawn from the softmax of what is left, or by mirostat: with ``mirostat`` 1 or 2 the
       truncation samplers (top_n_sigma, top_k, typical_p, top_p, min_p, xtc) are skipped and only
       "penalties", "dry" and "temperature" run before mirostat picks the token (as llama.cpp, which
       replaces the truncation chain by temperature + mirostat; lamina keeps the penalties).

    Fields (defaults in brackets):

    - ``max_new_tokens`` [128] / ``min_new_tokens`` [0]: at most / at least this many generated tokens;
      before ``min_new_tokens`` the eos and ``stop_token_ids`` tokens are banned (vLLM ``min_tokens``).
    - ``eos_token_ids`` [[]]: the model's end-of-sequence ids; generating one ends the sequence (it is
      not part of the output). ``ignore_eos`` [False]: keep going past eos (benchmarks; vLLM semantics:
      eos is not banned, it just does not stop).
    - ``stop`` [[]]: strings that end the output when they appear in the decoded text; the stop string
      is cut off unless ``include_stop_str_in_output`` [False]. ``stop_token_ids`` [[]]: extra token ids
      that end the sequence (like eos).
    - ``do_sample`` [None]: see above. ``temperature`` [1.0]: logits are divided by it (0 = greedy).
      ``dynatemp_range`` [0.0] / ``dynatemp_exponent`` [1.0] (llama.cpp dynamic temperature): with a
      range r > 0 the temperature becomes ``max(0, t - r) + 2r * (H / log(n))**exponent`` where H is the
      entropy of the candidates' distribution and n their number.
    - ``top_k`` [0 = off]: keep the k most likely tokens (ties with the k-th are kept, as HF).
    - ``top_p`` [1.0 = off]: nucleus; keep the most likely tokens whose probability mass reaches p.
    - ``min_p`` [0.0 = off]: keep tokens with probability >= min_p * (probability of the top token).
    - ``typical_p`` [1.0 = off]: locally typical sampling (Meister et al.), HF semantics.
    - ``top_n_sigma`` [None = off; -1 also off]: keep tokens whose logit is >= max - n * std of the
      candidates' logits (Tang et al., llama.cpp semantics).
    - ``repetition_penalty`` [1.0 = off]: HF/CTRL multiplicative penalty on every token in the last
      ``repetition_penalty_last_n`` [-1 = whole context, 0 = off] tokens of prompt + output: a positive
      logit is divided by it, a negative one multiplied.
    - ``frequency_penalty`` / ``presence_penalty`` [0.0, in [-2, 2]]: OpenAI additive penalties,
      ``logit -= frequency_penalty * count + presence_penalty * (count > 0)`` where count is how often the
      token was *generated* so far (the prompt does not count).
    - ``dry_multiplier`` [0.0 = off], ``dry_base`` [1.75], ``dry_allowed_length`` [2],
      ``dry_penalty_last_n`` [-1 = whole context], ``dry_sequence_breakers`` [llama.cpp's
      ``["\\n", ":", "\\"", "*"]``]: DRY ("don't repeat yourself", llama.cpp semantics): a token that would
      extend a repetition of length L >= allowed_length of an earlier part of the last
      ``dry_penalty_last_n`` tokens loses ``multiplier * base ** (L - allowed_length)`` from its logit;
      repetitions do not reach across a sequence breaker.
    - ``xtc_probability`` [0.0 = off] / ``xtc_threshold`` [0.1]: XTC ("exclude top choices", llama.cpp):
      with probability ``xtc_probability`` per token, remove every candidate whose probability is >=
      threshold except the least likely of them. A threshold above 0.5 never removes anything.
    - ``mirostat`` [0 = off, 1, 2], ``mirostat_tau`` [5.0] (target surprise in bits), ``mirostat_eta``
      [0.1] (learning rate): Mirostat v1 / v2 (llama.cpp semantics); each sequence keeps its running
      ``mu`` (starting at 2 * tau).
    - ``logit_bias`` [{}]: token id -> value added to its logit (-inf bans it). String keys (as JSON
      gives) are read as ids.
    - ``bad_words_ids`` [[]]: token-id sequences that must never be generated (the last token of a
      sequence is banned when the output ends with the rest of it; HF ``NoBadWordsLogitsProcessor``).
    - ``allowed_token_ids`` [None = all]: only these tokens may be generated (vLLM).
    - ``no_repeat_ngram_size`` [0 = off]: no n-gram of this size occurs twice in prompt + output (HF).
    - ``n`` [1]: sequences returned per prompt (``num_return_sequences``); each sampled sequence gets
      its own random stream; greedy decoding gives n identical ones (as OpenAI and vLLM do).
      ``num_beams`` [1], ``length_penalty`` [1.0], ``early_stopping`` [False]: beam search, HF semantics
      (score = sum of logprobs / length ** length_penalty).
    - ``seed`` [None]: seeds this request's own random generator, so a seeded request gives the same
      tokens whatever else runs in the batch; None draws a seed from torch's global generator.
    - ``logprobs`` [False]: return the log-probability of each generated token; ``top_logprobs`` [0]:
      and of the this many most likely alternatives; ``prompt_logprobs`` [None]: also for each prompt
      token, with this many alternatives. Log-probabilities are of the *raw* model distribution (the
      softmax of the model's logits before any processing), as OpenAI and vLLM report them.
    - ``response_format`` ["text"]: "json_object" constrains the output to one valid JSON value
      (nesting at most ``json_max_depth`` [16] deep), whatever the prompt says, by masking every token
      that cannot continue valid JSON (OpenAI ``response_format={"type": "json_object"}``).
      ``choices`` [[]]: the output is exactly one of these strings (vLLM ``guided_choice``).
      ``json_schema`` [None], ``regex`` [""], ``grammar`` [""] (Lark or GBNF): the output validates under
      the schema, matches the regex in full, parses under the grammar (``lamina.generate.grammar``,
      llguidance); the output is complete within ``max_new_tokens``. At most one constraint per request.
    - ``samplers`` [``SAMPLER_NAMES``]: the chain order, see above.
    """

    max_new_tokens: int = 128  # at most this many generated tokens (the prompt not counted), >= 0
    min_new_tokens: int = 0  # at least this many: eos and stop tokens are banned until then (vLLM min_tokens)
    eos_token_ids: list[int] = field(default_factory=list, metadata=TOKEN_IDS)  # stop when any is generated
    ignore_eos: bool = False  # keep going past eos (benchmarks; vLLM semantics: eos is not banned)
    # strings that end the output when the decoded text holds one (the stop string is cut off)
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False  # keep the stop string that ended the output (vLLM)
    # extra token ids that end the sequence, like eos
    stop_token_ids: list[int] = field(default_factory=list, metadata=TOKEN_IDS)
    # -- greedy / sampling
    # True: sample; False: greedy (or beam search); None: sample iff temperature > 0 and num_beams == 1
    do_sample: bool | None = None
    temperature: float = 1.0  # logits are divided by it, >= 0 (0: greedy)
    # dynamic temperature (llama.cpp semantics), >= 0 (0 = off): with range r the temperature is
    # max(0, t - r) + 2r * (H / log n) ** dynatemp_exponent, H the entropy of the n candidates
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0  # dynamic temperature's exponent on the normalized entropy, > 0
    # -- truncation
    top_k: int = 0  # keep the k most likely tokens, >= 0 (0 = off; ties with the k-th are kept, as HF)
    top_p: float = 1.0  # nucleus: keep the most likely tokens whose mass reaches p, in (0, 1] (1 = off)
    min_p: float = 0.0  # keep tokens with probability >= min_p x the top token's, in [0, 1] (0 = off)
    typical_p: float = 1.0  # locally typical sampling (Meister et al.), HF semantics, in (0, 1] (1 = off)
    # keep tokens whose logit is >= max - n x std of the candidates' logits (Tang et al., llama.cpp
    # semantics); > 0, None or -1 = off
    top_n_sigma: float | None = None
    # -- penalties
    # HF/CTRL multiplicative penalty, > 0 (1 = off), on every token of the last repetition_penalty_last_n
    # tokens of prompt + output: a positive logit is divided by it, a negative one multiplied
    repetition_penalty: float = 1.0
    repetition_penalty_last_n: int = -1  # repetition_penalty's window in tokens (-1 = whole context, 0 = off)
    # OpenAI additive penalty in [-2, 2] (0 = off): logit -= frequency_penalty x how often the token was
    # generated so far (the prompt does not count)
    frequency_penalty: float = 0.0
    # OpenAI additive penalty in [-2, 2] (0 = off): logit -= presence_penalty once the token was
    # generated (the prompt does not count)
    presence_penalty: float = 0.0
    # DRY ("don't repeat yourself", llama.cpp semantics), >= 0 (0 = off): a token that extends a repetition
    # of length L >= dry_allowed_length loses dry_multiplier * dry_base ** (L - dry_allowed_length)
    dry_multiplier: float = 0.0
    dry_base: float = 1.75  # DRY: growth of the penalty per repeated token, >= 1
    dry_allowed_length: int = 2  # DRY: repetitions shorter than this go unpenalized, >= 1
    dry_penalty_last_n: int = -1  # DRY's window in tokens (-1 = whole context, 0 = off)
    # DRY: strings a repetition does not reach across (llama.cpp's defaults)
    dry_sequence_breakers: list[str] = field(default_factory=lambda: list(DEFAULT_DRY_SEQUENCE_BREAKERS))
    # XTC ("exclude top choices", llama.cpp semantics), in [0, 1] (0 = off): with this probability per
    # token, remove every candidate with probability >= xtc_threshold except the least likely of them
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1  # XTC: probability of a top choice, in [0, 1] (above 0.5 nothing is removed)
    # Mirostat (llama.cpp semantics): 0 = off, 1 = v1, 2 = v2; replaces the truncation samplers
    # (penalties, dry and temperature still run first)
    mirostat: int = 0
    mirostat_tau: float = 5.0  # Mirostat's target surprise in bits, > 0 (mu starts at 2 x tau)
    mirostat_eta: float = 0.1  # Mirostat's learning rate for mu, > 0
    # -- constraints
    # token id -> value added to its logit, a finite number or -inf to ban it (e.g. '{12: -100}')
    logit_bias: dict[int, float] = field(default_factory=dict, metadata=TOKEN_IDS)
    # token-id sequences never generated, e.g. [[12], [7, 9]] (HF NoBadWordsLogitsProcessor)
    bad_words_ids: list[list[int]] = field(default_factory=list, metadata=TOKEN_IDS)
    # only these token ids may be generated (vLLM); None: all
    allowed_token_ids: list[int] | None = field(default=None, metadata=TOKEN_IDS)
    no_repeat_ngram_size: int = 0  # no n-gram of this size occurs twice in prompt + output (0 = off; HF)
    # -- several sequences / beam search
    n: int = 1  # sequences returned per prompt, >= 1 (num_return_sequences); greedy gives n identical ones
    num_beams: int = 1  # beam search with this many beams, >= 1 (1 = off; HF semantics); needs n <= num_beams
    length_penalty: float = 1.0  # beam search: score = sum of logprobs / length ** length_penalty (HF)
    # beam search: a prompt is done once it has num_beams finished hypotheses (False: once no running
    # beam can beat the worst finished one; HF semantics)
    early_stopping: bool = False
    # seeds this request's own random generator (the same tokens whatever else runs in the batch), >= 0;
    # None: a seed drawn from torch's global generator
    seed: int | None = None
    # -- log-probabilities
    # return each generated token's log-probability (of the raw model distribution, as OpenAI and vLLM):
    # true or false, as OpenAI's chat API; a number is refused as ambiguous: for N alternatives per token
    # (the legacy completions API's logprobs=N) give logprobs=true and top_logprobs=N
    logprobs: bool = field(default=False, metadata={"parse": parse_logprobs})
    top_logprobs: int = 0  # also this many most likely alternatives per token, >= 0 (needs logprobs)
    prompt_logprobs: int | None = None  # also log-probabilities of the prompt, with this many alternatives
    # -- constrained output
    response_format: str = "text"  # "text", or "json_object": the output is one valid JSON value (OpenAI)
    json_max_depth: int = 16  # response_format="json_object": deepest nesting allowed, >= 1
    # the output is exactly one of these strings (vLLM guided_choice); not with json_object
    choices: list[str] = field(default_factory=list)
    # the output is JSON valid under this JSON Schema (a dict, JSON text or a .json file; OpenAI json_schema)
    json_schema: dict[str, object] | None = field(default=None, metadata={"parse": parse_json_schema})
    regex: str = ""  # the output matches this regular expression in full (vLLM guided_regex)
    # the output parses under this Lark or GBNF grammar (text or a file; vLLM guided_grammar)
    grammar: str = field(default="", metadata={"parse": parse_text_or_file})
    # the sampler chain in order (llama.cpp style); a sampler left out is not applied
    samplers: list[str] = field(default_factory=lambda: list(SAMPLER_NAMES))

    def __post_init__(self) -> None:
        if isinstance(self.logprobs, int) and not isinstance(self.logprobs, bool):
            try:  # a count: refused with the way to ask for it
                parse_logprobs(self.logprobs)
            except ValueError as e:
                raise ConfigError(f"logprobs={self.logprobs!r}: {e}") from None
        _check_types(self)
        self.validate()

    def constraint_fields(self) -> dict[str, bool]:
        """Each way to constrain the output and whether this config asks for it (at most one may)."""
        return {
            "response_format": self.response_format != "text",
            "choices": bool(self.choices),
            "json_schema": self.json_schema is not None,
            "regex": bool(self.regex),
            "grammar": bool(self.grammar),
        }

    @property
    def constrained(self) -> bool:
        """Whether the output is constrained (json_object, choices, json_schema, regex or grammar)."""
        return any(self.constraint_fields().values())

    @property
    def sampling(self) -> bool:
        """Whether tokens are sampled (True) or picked greedily / by beam search (False)."""
        if self.do_sample is not None:
            return self.do_sample
        return self.temperature > 0 and self.num_beams == 1

    def ignored(self, names: Collection[str]) -> str | None:
        """One line naming those of the fields ``names`` (the controls a caller gave) that switch on a
        sampler this decoding never runs, and why; None when every one has its effect.

        Truncation and temperature samplers run only when sampling: greedy decoding and beam search skip
        them; mirostat replaces the truncation samplers. transformers warns of the same
        (``do_sample=False`` with ``temperature`` set); ``generation_config`` warns with this line. A
        field is not an error here, since a model's or a verb's own defaults (top_p=0.9) stay set
        under ``temperature=0``.
        """
        if not self.sampling:
            skipped: tuple[str, ...] = ("truncation", "temperature")
            why = (
                f"num_beams={self.num_beams} is beam search, which does not sample; num_beams=1 samples"
                if self.num_beams > 1
                else "do_sample=False decodes greedily; do_sample=True samples"
                if self.do_sample is False
                else f"temperature={self.temperature} decodes greedily; temperature > 0 samples"
            )
        elif self.mirostat:
            skipped = ("truncation",)
            why = f"mirostat={self.mirostat} replaces the truncation samplers; mirostat=0 runs them"
        else:
            return None
        found = [f for p in LOGITS_PROCESSORS if p.stage in skipped and p.on(self) for f in p.fields
                 if f in names]  # fmt: skip
        if not found:
            return None
        shown = ", ".join(f"{f}={getattr(self, f)!r}" for f in found)
        verb = "has" if len(found) == 1 else "have"
        return f"{shown} {verb} no effect: {why} (or leave {' and '.join(found)} unset)"

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the field, its value and the allowed range of any invalid setting."""

        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r} {rule}")

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float):
                need(math.isfinite(value), f.name, "must be a finite number")
        for name in ("max_new_tokens", "min_new_tokens", "top_k", "no_repeat_ngram_size", "top_logprobs"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("n", "num_beams", "dry_allowed_length"):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("repetition_penalty_last_n", "dry_penalty_last_n"):
            need(getattr(self, name) >= -1, name, "must be >= -1 (-1 = the whole context, 0 = off)")
        need(
            self.min_new_tokens <= self.max_new_tokens,
            "min_new_tokens",
            f"must be <= max_new_tokens={self.max_new_tokens}",
        )
        need(self.temperature >= 0, "temperature", "must be >= 0 (0 = greedy)")
        need(self.dynatemp_range >= 0, "dynatemp_range", "must be >= 0 (0 = off)")
        need(self.dynatemp_exponent > 0, "dynatemp_exponent", "must be > 0")
        need(0 < self.top_p <= 1, "top_p", "must be in (0, 1] (1 = off)")
        need(0 <= self.min_p <= 1, "min_p", "must be in [0, 1] (0 = off)")
        need(0 < self.typical_p <= 1, "typical_p", "must be in (0, 1] (1 = off)")
        need(
            self.top_n_sigma is None or self.top_n_sigma == -1 or self.top_n_sigma > 0,
            "top_n_sigma",
            "must be > 0 (or -1 / None = off)",
        )
        need(self.repetition_penalty > 0, "repetition_penalty", "must be > 0 (1 = off)")
        for name in ("frequency_penalty", "presence_penalty"):
            need(-2 <= getattr(self, name) <= 2, name, "must be in [-2, 2] (0 = off)")
        need(self.dry_multiplier >= 0, "dry_multiplier", "must be >= 0 (0 = off)")
        need(self.dry_base >= 1, "dry_base", "must be >= 1")
        need(
            all(s for s in self.dry_sequence_breakers), "dry_sequence_breakers", "must not hold empty strings"
        )
        need(0 <= self.xtc_probability <= 1, "xtc_probability", "must be in [0, 1] (0 = off)")
        need(0 <= self.xtc_threshold <= 1, "xtc_threshold", "must be in [0, 1]")
        need(self.mirostat in (0, 1, 2), "mirostat", "must be 0 (off), 1 (Mirostat v1) or 2 (Mirostat v2)")
        need(self.mirostat_tau > 0, "mirostat_tau", "must be > 0")
        need(self.mirostat_eta > 0, "mirostat_eta", "must be > 0")
        for name in ("eos_token_ids", "stop_token_ids"):
            need(all(t >= 0 for t in getattr(self, name)), name, "must hold token ids >= 0")
        need(all(t >= 0 for t in self.logit_bias), "logit_bias", "must map token ids >= 0 to biases")
        need(
            all(not math.isnan(b) and b != math.inf for b in self.logit_bias.values()),
            "logit_bias",
            "values must be finite numbers or -inf (to ban a token)",
        )
        need(
            all(seq and all(t >= 0 for t in seq) for seq in self.bad_words_ids),
            "bad_words_ids",
            "must be a list of non-empty token-id sequences (ids >= 0), e.g. [[12], [7, 9]]",
        )
        if self.allowed_token_ids is not None:
            need(
                len(self.allowed_token_ids) > 0 and all(t >= 0 for t in self.allowed_token_ids),
                "allowed_token_ids",
                "must be a non-empty list of token ids >= 0 (or None = all tokens)",
            )
        need(all(s for s in self.stop), "stop", "must not hold empty strings")
        need(
            self.response_format in ("text", "json_object"),
            "response_format",
            'must be "text" or "json_object"',
        )
        need(self.json_max_depth >= 1, "json_max_depth", "must be >= 1")
        need(all(c for c in self.choices), "choices", "must not hold empty strings")
        given = [n for n, on in self.constraint_fields().items() if on]
        need(
            len(given) <= 1,
            given[-1] if given else "choices",
            f"cannot be combined with {given[0] if given else ''}: give one constraint",
        )
        need(
            self.json_schema is None or isinstance(self.json_schema, dict),
            "json_schema",
            "must be a JSON object (a dict)",
        )
        need(math.isfinite(self.length_penalty), "length_penalty", "must be a finite number")
        need(self.seed is None or self.seed >= 0, "seed", "must be >= 0 (or None)")
        need(
            self.prompt_logprobs is None or self.prompt_logprobs >= 0,
            "prompt_logprobs",
            "must be >= 0 (or None)",
        )
        for name in self.samplers:
            if name not in SAMPLER_NAMES:
                hint = _SAMPLER_ALIASES.get(name)
                hint_text = f" (did you mean {hint!r}?)" if hint else _did_you_mean(name, SAMPLER_NAMES)
                raise ConfigError(
                    f"samplers={self.samplers!r}: unknown sampler {name!r}{hint_text}; "
                    f"known samplers: {', '.join(SAMPLER_NAMES)}"
                )
        dupes = sorted({s for s in self.samplers if self.samplers.count(s) > 1})
        need(not dupes, "samplers", f"lists {', '.join(dupes)} more than once")
        self._validate_combinations()

    def check_token_ids(self, vocab_size: int) -> None:
        """Raise ``ConfigError`` when a token-id field (``logit_bias`` keys, ``stop_token_ids``,
        ``bad_words_ids``, ``allowed_token_ids``, ``eos_token_ids``: the fields marked ``TOKEN_IDS``) names an
        id outside a vocabulary of ``vocab_size`` tokens; the message names the field, the id and the size.

        ``validate`` cannot know the model; the engine calls this at submit time, so the library, the CLI
        and the server refuse the same requests with the same words.
        """
        for f in dataclasses.fields(self):
            if not f.metadata.get("token_ids"):
                continue
            value = getattr(self, f.name)
            ids = value if isinstance(value, dict) else value or []
            flat = [t for x in ids for t in (x if isinstance(x, list) else [x])]
            bad = sorted({t for t in flat if not 0 <= t < vocab_size})
            if bad:
                shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
                raise ConfigError(
                    f"{f.name} names token id{'s' if len(bad) > 1 else ''} {shown} outside the model's "
                    f"vocabulary of {vocab_size} tokens (ids 0..{vocab_size - 1})"
                )

    def _validate_combinations(self) -> None:
        if self.do_sample and self.temperature == 0:
            raise ConfigError(
                "do_sample=True with temperature=0: sampling needs temperature > 0 "
                "(or set do_sample=False / temperature=0 alone for greedy decoding)"
            )
        if self.num_beams > 1:
            if self.do_sample:
                raise ConfigError(
                    f"num_beams={self.num_beams} with do_sample=True: beam sampling is not supported; "
                    "use num_beams=1 to sample or do_sample=False for beam search"
                )
            if self.n > self.num_beams:
                raise ConfigError(
                    f"n={self.n} must be <= num_beams={self.num_beams} (beam search returns the n best beams)"
                )
        if self.mirostat and not self.sampling:
            raise ConfigError(
                f"mirostat={self.mirostat} samples tokens, but decoding is greedy or beam search "
                f"(temperature={self.temperature}, do_sample={self.do_sample}, num_beams={self.num_beams})"
            )
        if self.top_logprobs > 0 and not self.logprobs:
            raise ConfigError(
                f"top_logprobs={self.top_logprobs} needs logprobs=True (the alternatives come with the "
                "log-probability of the chosen token)"
            )
        for p in LOGITS_PROCESSORS:
            if p.stage != "first" and p.on(self) and p.name not in self.samplers:
                fields = " / ".join(p.fields)
                raise ConfigError(
                    f"samplers={self.samplers!r} leaves out {p.name!r}, so {fields} would have no effect: "
                    f"add {p.name!r} to samplers or leave {fields} at the default"
                )


Optimizer = Literal["adamw", "sgd", "rmsprop", "lion", "adafactor"]
Schedule = Literal["constant", "linear", "cosine", "step", "wsd"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Parallel = Literal["auto", "none", "ddp", "fsdp"]
TrainObjective = Literal["causal_lm", "masked_lm", "span_corruption"]


@dataclass
class TrainConfig:
    """Every training hyperparameter. ``batch_size`` is per process and per micro-step: one optimizer
    step sees ``batch_size x grad_accum_steps x world_size`` sequences of ``seq_len`` tokens."""

    out_dir: str = "runs/lamina"  # the run's folder: run.yaml, metrics.jsonl, checkpoints/, best/, last/
    optimizer: Optimizer = "adamw"  # adamw, sgd (Nesterov when momentum > 0), rmsprop, lion or adafactor
    lr: float = 3e-4  # peak learning rate, >= 0 (reached after warmup_steps; 0 trains nothing: a control run)
    min_lr_ratio: float = 0.1  # linear/cosine/wsd decay to lr x min_lr_ratio
    schedule: Schedule = "cosine"  # the lr after warmup: constant, linear, cosine, step or wsd (stable-decay)
    warmup_steps: int = 100  # optimizer steps of linear warmup to lr, >= 0
    lr_step_every: int = 1000  # schedule="step": optimizer steps between lr drops
    lr_step_gamma: float = 0.1  # schedule="step": the lr is multiplied by this at each drop
    wsd_decay_fraction: float = 0.2  # schedule="wsd": the final fraction of steps that decays
    weight_decay: float = 0.1  # decay of the weight matrices, >= 0 (AdamW: decoupled)
    decay_embeddings: bool = False  # weight-decay the embeddings too (norms and biases are never decayed)
    beta1: float = 0.9  # adamw / lion beta1 (AdamW: decay of the gradient's running mean)
    beta2: float = 0.95  # adamw / lion beta2 (AdamW: decay of the squared gradient's running mean)
    eps: float = 1e-8  # adamw / rmsprop: added to the denominator for numerical stability
    momentum: float = 0.9  # sgd / rmsprop momentum (sgd: Nesterov when > 0)
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    batch_size: int = 8  # sequences per process and micro-step, > 0
    grad_accum_steps: int = 1  # micro-steps per optimizer step, > 0 (each scored token weighs the same)
    seq_len: int | None = None  # tokens per training sequence (None: the model's max_seq_len)
    max_steps: int | None = 1000  # optimizer steps; setting it clears epochs
    # passes over the training data (fractions allowed) instead of max_steps; setting it clears max_steps
    epochs: float | None = None
    # of the cross-entropy of causal LM, SFT and seq2seq, in [0, 1) (not masked LM)
    label_smoothing: float = 0.0
    dropout: float | None = None  # override every dropout of the model
    precision: Precision = "auto"  # auto (bf16 where native, else fp32), fp32, or bf16 / fp16 autocast
    activation_checkpointing: bool = False  # recompute blocks in the backward pass: less memory, more time
    compile: bool = False  # torch.compile the model: slow first steps, then faster ones
    threads: int | None = None  # CPU threads torch uses (None: its default, one per core)
    seed: int = 1337  # seeds weight init, data order, masking and finetune's validation split
    eval_every: int = 100  # optimizer steps between validation evaluations (finetune: once per epoch)
    eval_batches: int = 20  # validation batches per evaluation (finetune: the whole validation set)
    save_every: int = 500  # optimizer steps between checkpoints (the last step is always saved)
    keep_last: int = 2  # periodic checkpoints kept (best and last are always kept)
    early_stopping_patience: int = 0  # evaluations without improvement before stopping; 0 = off
    early_stopping_min_delta: float = 0.0  # a validation loss counts as better when lower by more than this
    log_every: int = 10  # optimizer steps between metrics lines (metrics.jsonl, progress bar)
    device: str = "auto"  # cpu, cuda, cuda:1, ... (auto: cuda if available, else cpu)
    parallel: Parallel = "auto"  # none, ddp or fsdp (auto: ddp under torchrun, else none); LoRA: not fsdp
    progress: bool = True  # show a progress bar (main process only)
    # None: masked_lm for encoders, span_corruption for encoder-decoders, causal_lm for decoders
    objective: TrainObjective | None = None
    mlm_probability: float = 0.15  # masked_lm: share of tokens hidden (80% mask, 10% random, 10% kept)
    whole_word_masking: bool = False  # masked_lm: hide all tokens of a chosen word together
    # parameters not trained: block indices ("0", "0-3") or parameter name globs ("tok_emb.*")
    freeze: list[str] = field(default_factory=list)

    EXTRA_KEYS: ClassVar[tuple[str, ...]] = ("preset",)
    EXCLUSIVE: ClassVar[tuple[tuple[str, str], ...]] = (
        ("epochs", "max_steps"),
    )  # setting one clears the other

    @staticmethod
    def preset_names() -> list[str]:
        """The names ``preset`` accepts."""
        return list(TRAIN_PRESETS)

    @staticmethod
    def resolve_dict(data: dict[str, Any]) -> dict[str, Any]:
        """The rules between fields of a mapping (YAML, flags, keywords): ``preset: NAME`` fills a named
        set of defaults (``TRAIN_PRESETS``: ``finetune``), and setting one of ``epochs`` / ``max_steps``
        clears the other, so ``--train.epochs 2`` needs no ``--train.max_steps null``."""
        given = dict(data)
        data = _with_preset(data, TRAIN_PRESETS, "train")
        for name, other in (("epochs", "max_steps"), ("max_steps", "epochs")):
            if given.get(name) is not None and other not in given:
                data[other] = None
        return data

    def __post_init__(self) -> None:
        _check_types(self)
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(f"mlm_probability={self.mlm_probability} must be in (0, 1) (BERT uses 0.15)")
        if not (math.isfinite(self.lr) and self.lr >= 0):  # not nan / inf; 0 is a control run (no change)
            raise ConfigError(f"lr={self.lr} must be finite and >= 0")
        positive = (
            "batch_size",
            "grad_accum_steps",
            "eval_every",
            "eval_batches",
            "save_every",
            "log_every",
        )
        for name in positive:
            if not getattr(self, name) > 0:  # also catches nan
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")
        if self.threads is not None and self.threads <= 0:
            raise ConfigError(f"threads={self.threads} must be positive (or null: torch's default)")
        for name in ("warmup_steps", "weight_decay", "grad_clip", "keep_last", "early_stopping_patience"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing={self.label_smoothing} must be in [0, 1)")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1)")
        if (self.max_steps is None) == (self.epochs is None):
            raise ConfigError(
                f"set exactly one of max_steps={self.max_steps} and epochs={self.epochs} (the other to null)"
            )
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"max_steps={self.max_steps} must be positive")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"epochs={self.epochs} must be positive")
        if self.seq_len is not None and self.seq_len <= 0:
            raise ConfigError(f"seq_len={self.seq_len} must be positive")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")


TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # fine-tuning a pretrained model: a few epochs at a small learning rate, no warmup, light decay
    "finetune": dict(epochs=3, max_steps=None, lr=5e-5, warmup_steps=0, weight_decay=0.01, out_dir="runs/finetune"),
}  # fmt: skip
