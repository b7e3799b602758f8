"""Configs: the single source of truth for every hyperparameter.

``ModelConfig`` describes one transformer of lamina's config-driven family; ``GenerationConfig`` the
default decoding controls stored with a checkpoint. Both are plain dataclasses that round-trip through
YAML (``save_yaml`` / ``load_yaml``) and dicts (``to_dict`` / ``from_dict``); an unknown key is an error
that names the nearest valid keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_type_hints

import yaml

from lamina.errors import ConfigError

Activation = Literal["gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu"]
NormType = Literal["layernorm", "rmsnorm"]
NormPlacement = Literal["pre", "post"]
PosEncoding = Literal["learned", "sinusoidal", "rope", "alibi", "none"]
RopeScaling = Literal["linear", "dynamic", "llama3"]
Initializer = Literal["normal", "xavier", "kaiming"]
Arch = Literal["decoder"]  # "encoder" and "encoder-decoder" join the family in later steps

GATED_ACTIVATIONS = ("swiglu", "geglu")


@dataclass
class ModelConfig:
    """Every architecture knob of one transformer.

    Defaults describe a small pre-LN GPT; presets (``ModelConfig.preset("smollm2-135m")``) fill in known
    architectures. Derived values (``head_dim``, ``n_kv_heads``, ``d_ff``) may be left ``None``.
    """

    arch: Arch = "decoder"
    vocab_size: int = 50304
    max_seq_len: int = 1024  # context window
    n_layers: int = 6
    d_model: int = 384  # embedding size
    n_heads: int = 6
    n_kv_heads: int | None = None  # None: = n_heads (MHA); 1: MQA; in between: GQA
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int | None = None  # None: 4 * d_model (8/3 * d_model rounded to 64 for gated MLPs)
    activation: Activation = "gelu"
    norm: NormType = "layernorm"
    norm_placement: NormPlacement = "pre"
    norm_eps: float = 1e-5
    emb_norm: bool = False  # a norm right after the embeddings (BLOOM, BERT)
    pos_encoding: PosEncoding = "learned"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_factor: float = 1.0
    rope_original_max_seq_len: int | None = None  # dynamic / llama3 scaling: the pretraining context
    rope_low_freq_factor: float = 1.0  # llama3 scaling
    rope_high_freq_factor: float = 4.0  # llama3 scaling
    emb_dropout: float = 0.0
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    bias: bool = True  # biases in linear layers and LayerNorms
    tie_embeddings: bool = True
    scale_embeddings: bool = False  # multiply token embeddings by sqrt(d_model) (original Transformer)
    initializer: Initializer = "normal"
    init_std: float = 0.02
    scaled_residual_init: bool = True  # std / sqrt(2 * n_layers) on residual output projections

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

    # -- derived numbers ---------------------------------------------------------------------------------
    @property
    def n_params(self) -> int:
        """Total number of parameters (tied embeddings counted once)."""
        return sum(self.param_counts().values())

    def param_counts(self) -> dict[str, int]:
        """Parameters by part: embeddings, positional, attention, mlp, norms, head."""
        assert self.head_dim is not None and self.n_kv_heads is not None and self.d_ff is not None
        d, b = self.d_model, int(self.bias)
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attn = d * q + 2 * d * kv + q * d + b * (q + 2 * kv + d)
        n_in = 2 if self.activation in GATED_ACTIVATIONS else 1
        mlp = n_in * (d * self.d_ff + b * self.d_ff) + self.d_ff * d + b * d
        norm = d * (2 if self.norm == "layernorm" and self.bias else 1)
        n_norms = 2 * self.n_layers + int(self.norm_placement == "pre") + int(self.emb_norm)
        return {
            "embeddings": self.vocab_size * d,
            "positional": self.max_seq_len * d if self.pos_encoding == "learned" else 0,
            "attention": self.n_layers * attn,
            "mlp": self.n_layers * mlp,
            "norms": n_norms * norm,
            "head": 0 if self.tie_embeddings else self.vocab_size * d,
        }

    @property
    def n_matmul_params(self) -> int:
        """Parameters that take part in matrix multiplies per token (attention, MLP and the output head)."""
        c = self.param_counts()
        return c["attention"] + c["mlp"] + self.vocab_size * self.d_model

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> int:
        """Model FLOPs per token at context ``seq_len`` (PaLM appendix B / nanoGPT ``estimate_mfu``).

        Forward is 2 x matmul parameters + 2 x 2 x n_layers x seq_len x (n_heads x head_dim) for
        attention scores and values; training (forward + backward) is three times that.
        """
        assert self.head_dim is not None
        t = self.max_seq_len if seq_len is None else seq_len
        forward = 2 * self.n_matmul_params + 4 * self.n_layers * t * self.n_heads * self.head_dim
        return 3 * forward if training else forward

    # -- presets and I/O ---------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named architecture (``gpt2``, ``smollm2-135m``, ``tiny``, ...) with optional field overrides."""
        if name not in PRESETS:
            raise ConfigError(
                f"unknown preset {name!r}{_did_you_mean(name, PRESETS)}; presets: {', '.join(sorted(PRESETS))}"
            )
        return from_dict(cls, {**PRESETS[name], **overrides})


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
    "smollm2-360m": dict(
        vocab_size=49152, max_seq_len=8192, n_layers=32, d_model=960, n_heads=15, n_kv_heads=5, d_ff=2560,
        activation="swiglu", norm="rmsnorm", norm_eps=1e-5, pos_encoding="rope", rope_theta=100000.0,
        bias=False, tie_embeddings=True,
    ),
}  # fmt: skip


# -- generic dataclass <-> dict / YAML --------------------------------------------------------------------
T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as a plain dict (YAML/JSON-ready)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build config ``cls`` from ``data``; an unknown key raises ``ConfigError`` naming the nearest keys."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{cls.__name__} must be a mapping of field: value, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown {cls.__name__} field {key!r}{_did_you_mean(key, names)}")
    try:
        return cls(**data)
    except TypeError as e:  # pragma: no cover - defensive: dataclass signature mismatch
        raise ConfigError(f"cannot build {cls.__name__}: {e}") from e


class _YAMLLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` as a float (YAML 1.1 wants ``1.0e-5``), as people write it."""


_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """Parse YAML text safely (no Python objects), reading ``1e-5`` as a float."""
    return yaml.load(text, Loader=_YAMLLoader)


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


def _check_types(cfg: Any) -> None:
    """Check every field against its annotation: Literal choices, int, float (ints accepted), bool, lists.

    Floats given as ints are converted (``norm_eps: 1`` -> 1.0); anything else of the wrong type is a
    ``ConfigError`` naming the field, the value and the expected type.
    """
    hints = get_type_hints(type(cfg))
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
            ok = isinstance(value, list) and (
                item is object or all(isinstance(v, item) and not isinstance(v, bool) for v in value)
            )
        if not ok:
            expected = getattr(core, "__name__", str(core))
            raise ConfigError(
                f"{f.name}={value!r} ({type(value).__name__}) must be of type {expected}"
                + (" or None" if type(None) in args else "")
            )


def _literal_values(tp: Any) -> tuple[Any, ...] | None:
    args = get_args(tp)
    if getattr(tp, "__origin__", None) is Literal:
        return args
    # Optional[Literal[...]]: allow None as well
    lits = [a for a in args if getattr(a, "__origin__", None) is Literal]
    if lits and type(None) in args:
        return (*get_args(lits[0]), None)
    return None


@dataclass
class GenerationConfig:
    """Default decoding controls; stored with a checkpoint as ``generation.yaml``.

    Only greedy decoding and stopping are implemented at this stage; sampling controls arrive with the
    generation engine.
    """

    max_new_tokens: int = 128
    eos_token_ids: list[int] = field(default_factory=list)  # stop when any of these is generated

    def __post_init__(self) -> None:
        _check_types(self)
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} must be >= 0")
