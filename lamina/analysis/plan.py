"""``lamina plan``: how big a model and how many tokens a compute budget buys, and what that model costs.

    report = plan(PlanConfig(flops=5.76e23))    # or hours=24 (with flops_per_second, or measured here)
    print(report.text())
    plan(PlanConfig(params=135e6)).text()       # the reverse: the budget for which 135M is optimal

For the budget, every law of :mod:`lamina.analysis.scaling` gives its compute-optimal parameters and
tokens, with the loss that ``law``'s parametric fit predicts for each; then a lamina ``ModelConfig`` near
``law``'s optimum (:func:`suggest_config`: Llama-style blocks, head size 64, the width/depth ratio closest
to ``aspect_ratio``) and its inference memory (weights per lamina weight format, KV cache per token and per
batch at the context length), and its training memory for weights, gradients and optimizer states.
A budget in device-hours becomes FLOPs through a sustained throughput: ``flops_per_second`` if given,
else this machine's measured matmul peak (:func:`measure_matmul_flops`) times ``mfu``.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Literal

from lamina.analysis.scaling import LAWS, Optimum, ParametricLaw
from lamina.config import ModelConfig
from lamina.errors import ConfigError


def parse_count(text: str) -> float:
    """``"70B"`` -> 7e10: a count with an optional K, M, B (or G) or T suffix, powers of 1000. Raises
    ``ValueError`` for anything else."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)\s*([KMBGT])?\s*", text, re.IGNORECASE)
    if m is None:
        raise ValueError("is not a count: use a number, optionally with K, M, B or T (e.g. 135M, 7B)")
    unit = (m.group(2) or "").upper().replace("G", "B")
    return float(m.group(1)) * 1000.0 ** ("KMBT".index(unit) + 1 if unit else 0)


COUNT = {"parse": parse_count}

FORMATS = ("fp32", "bf16", "int8", "int4")


def weight_bytes(cfg: ModelConfig, fmt: str) -> float:
    """Bytes of a model's weights in lamina weight format ``fmt`` (lamina.model.quant's rules): fp32 4
    and bf16 2 per parameter; int8 1 per weight of the linear layers, int4 half a byte plus a bf16 scale
    and offset per 32; in both the output head int8 (a copy when it is tied to the embeddings) and
    embeddings and norms bf16. Per-channel scales left out (under 1%)."""
    if fmt == "fp32":
        return 4.0 * cfg.n_params
    if fmt == "bf16":
        return 2.0 * cfg.n_params
    c = cfg.param_counts()
    linear = c["attention"] + c["mlp"]
    head = cfg.vocab_size * cfg.d_model if cfg.head == "lm" else c["head"]
    other = cfg.n_params - linear - (0 if cfg.head == "lm" and cfg.tie_embeddings else head)
    per_weight = {"int8": 1.0, "int4": 0.5 + 4 / 32}[fmt]
    return linear * per_weight + head * 1.0 + other * 2.0


# optimizer state bytes per parameter (fp32 states): AdamW keeps two moments, SGD one momentum buffer
OPTIMIZER_BYTES = {"adamw": 8.0, "sgd": 4.0, "lion": 4.0, "none": 0.0}


@dataclass
class PlanConfig:
    """What ``lamina plan`` is asked (the ``--flops/--hours/--params/...`` flags)."""

    flops: float | None = None  # training budget in FLOPs (e.g. 5.76e23)
    hours: float | None = None  # training budget in device-hours (needs a throughput: see flops_per_second)
    devices: int = 1  # devices the hours are spent on
    # sustained training FLOP/s per device; None with --hours: this machine's measured matmul peak x mfu
    flops_per_second: float | None = None
    mfu: float = 0.4  # share of the matmul peak a training run sustains (model FLOPs utilization)
    params: float | None = field(default=None, metadata=COUNT)  # reverse: the budget at which N is optimal
    # the law the suggested config and the predicted losses come from
    law: Literal["chinchilla-1", "chinchilla-2", "chinchilla-3", "besiroglu", "kaplan"] = "besiroglu"
    vocab_size: int = 49152  # the suggested config's vocabulary
    max_seq_len: int = 2048  # the suggested config's context (KV cache figures use it too)
    batch_size: int = 8  # sequences per step in the KV cache and training memory figures
    aspect_ratio: float = 64.0  # the suggested config's d_model / n_layers target
    optimizer: Literal["adamw", "sgd", "lion", "none"] = "adamw"  # states counted in training memory
    activation_checkpointing: bool = False  # training memory with blocks recomputed in backward

    def __post_init__(self) -> None:
        if self.law not in LAWS:
            raise ConfigError(f"law={self.law!r} is unknown; known: {', '.join(LAWS)}")
        for name in ("flops", "hours", "params", "flops_per_second"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name}={value} must be > 0")
        if not 0 < self.mfu <= 1:
            raise ConfigError(f"mfu={self.mfu} must be in (0, 1]")


def measure_matmul_flops(dtype: str = "float32", seconds: float = 0.5, size: int = 1024) -> float:
    """FLOP/s of square ``size`` matmuls in ``dtype`` on this machine's CPU (all its threads), timed for
    about ``seconds``: the peak a training step's matmuls can approach."""
    import torch

    a = torch.randn(size, size, dtype=getattr(torch, dtype))
    b = torch.randn(size, size, dtype=a.dtype)
    a @ b  # warm-up
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or n < 2:
        a @ b
        n += 1
    return 2 * size**3 * n / elapsed


def suggest_config(params: float, vocab_size: int, max_seq_len: int, aspect_ratio: float) -> ModelConfig:
    """A Llama-style ``ModelConfig`` (RMSNorm, SwiGLU, RoPE, tied embeddings, head size 64, a quarter as
    many KV heads as query heads where that divides) with about ``params`` parameters: among the
    (n_layers, d_model: a multiple of 64, of 256 from 1024 up) pairs within 10% of it, the one nearest (on log scales) to
    ``params`` and to d_model / n_layers = ``aspect_ratio``. Raises ``ConfigError`` when no pair is within
    10% (e.g. the embeddings alone are larger)."""
    best: tuple[float, int, int] | None = None
    for n_layers in range(1, 257):
        for d_model in [*range(64, 1024, 64), *range(1024, 65537, 256)]:  # wide ones: heads in fours
            n = _llama_params(n_layers, d_model, vocab_size)
            if n > 1.1 * params:
                break
            if n >= 0.9 * params:
                score = abs(math.log(d_model / n_layers / aspect_ratio)) + abs(math.log(n / params))
                if best is None or score < best[0]:
                    best = (score, n_layers, d_model)
    if best is None:
        raise ConfigError(f"no Llama-style config has {_count(params)} parameters within 10% at "
                          f"vocab_size={vocab_size} (its embeddings alone are {_count(vocab_size * 64)}+)")  # fmt: skip
    _, n_layers, d_model = best
    return ModelConfig.preset(
        "llama-tiny", **_llama_shape(n_layers, d_model, vocab_size), max_seq_len=max_seq_len
    )


def _llama_shape(n_layers: int, d_model: int, vocab_size: int) -> dict[str, int | bool]:
    n_heads = d_model // 64
    n_kv_heads = n_heads // 4 if n_heads % 4 == 0 else n_heads
    return dict(n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads,
                vocab_size=vocab_size, tie_embeddings=True)  # fmt: skip


def _llama_params(n_layers: int, d_model: int, vocab_size: int) -> int:
    """``ModelConfig(**_llama_shape(...)).n_params`` without building the config (a test checks both agree)."""
    kv = 64 * (d_model // 64 // 4 if (d_model // 64) % 4 == 0 else d_model // 64)
    d_ff = 64 * math.ceil(8 * d_model / 3 / 64)
    block = 2 * d_model * d_model + 2 * d_model * kv + 3 * d_model * d_ff + 2 * d_model
    return vocab_size * d_model + n_layers * block + d_model


@dataclass
class Plan:
    """The answer: the budget, each law's optimum, the chosen law's suggested config and its memory."""

    config: PlanConfig
    flops: float
    throughput: float | None  # FLOP/s used to turn hours into FLOPs (all devices), if any
    optima: dict[str, Optimum]
    losses: dict[str, float]  # the chosen law's predicted loss at each optimum (parametric laws only)
    suggested: ModelConfig | str  # or why there is none

    def text(self) -> str:
        """The report ``lamina plan`` prints."""
        cfg, law = self.config, LAWS[self.config.law]
        lines = []
        if cfg.params is not None:
            lines.append(f"model size {_count(cfg.params)} parameters: the budget at which each law finds it "
                         "optimal")  # fmt: skip
        else:
            lines.append(f"budget {self.flops:.3g} FLOPs" + (
                f" ({cfg.hours:g} h x {cfg.devices} device(s) at {self.throughput / cfg.devices:.3g} FLOP/s each)"
                if self.throughput else ""))  # fmt: skip
        lines.append(
            f"{'law':<14}{'params':>9}{'tokens':>9}{'tok/param':>10}{'FLOPs':>11}{'loss':>7}  source"
        )
        for name, o in self.optima.items():
            loss = self.losses.get(name)
            lines.append(f"{name:<14}{_count(o.params):>9}{_count(o.tokens):>9}{o.tokens_per_param:>10.1f}"
                         f"{o.flops:>11.3g}{'' if loss is None else f'{loss:.3f}':>7}  {LAWS[name].source}")  # fmt: skip
        if isinstance(law, ParametricLaw):
            lines.append(f"loss: L(N, D) of {law.name} in nats/token on the paper's data (MassiveText): a "
                         "guide to the trend, not a promise for your corpus")  # fmt: skip
        m = self.suggested
        o = self.optima[law.name]
        if isinstance(m, str):
            return "\n".join([*lines, f"suggested lamina config: none ({m})"])
        lines.append(f"suggested lamina config for {law.name}'s optimum ({_count(o.params)} params, "
                     f"{_count(o.tokens)} tokens):")  # fmt: skip
        lines.append(f"  --model.preset llama-tiny --model.n_layers {m.n_layers} --model.d_model {m.d_model} "
                     f"--model.n_heads {m.n_heads} --model.n_kv_heads {m.n_kv_heads} "
                     f"--model.vocab_size {m.vocab_size} --model.max_seq_len {m.max_seq_len}")  # fmt: skip
        n = m.n_params
        lines.append(f"  {_count(n)} parameters, {m.d_ff} MLP width, "
                     f"{m.flops_per_token(training=True) / 1e9:.3g} GFLOPs/token training at full context")  # fmt: skip
        lines += memory_lines(m, cfg.batch_size, cfg.optimizer, cfg.activation_checkpointing)
        return "\n".join(lines)


@dataclass
class TrainingMemory:
    """Bytes of one fp32 training step's peak and its parts (see :func:`training_memory`)."""

    params: float
    grads: float
    optimizer: float
    activations: float  # kept for backward at the end of the forward pass
    temporaries: float  # the logits' gradient buffers at the start of backward
    peak: float


def training_memory(
    cfg: ModelConfig,
    batch_size: int,
    seq_len: int,
    optimizer: str = "adamw",
    activation_checkpointing: bool = False,
) -> TrainingMemory:
    """Peak memory of one fp32 training step of a decoder on ``batch_size`` x ``seq_len`` tokens, counted
    from what lamina's blocks keep for backward (checked against torch's MemTracker within 15% for
    Llama-style configs, with and without activation checkpointing, AdamW and SGD; other families are
    the same count with their MLP and norm, untested).

    Per token and layer a pre-LN block keeps 8 d_model + 2 kv_dim + n_heads + 2 floats (norm inputs and
    outputs, q, k, v, the attention output and its log-sum-exp, the output projection's input) and 4 d_ff
    for a gated MLP (gate, up, SiLU(gate), their product; 2 d_ff otherwise); outside the blocks about
    vocab_size + 3.5 d_model (the logits, the final norm, the head's input, the token ids). With
    activation checkpointing a block keeps only its input (d_model) and recomputes the rest in backward.
    The logits' gradient takes two more logits-sized buffers at the start of backward. The peak is the
    larger of that moment and the optimizer step (weights + gradients + states, AdamW's foreach
    temporaries about half the weights' size)."""
    from lamina.config import GATED_ACTIVATIONS

    assert cfg.n_kv_heads is not None and cfg.head_dim is not None and cfg.d_ff is not None
    tokens = batch_size * seq_len
    d, f = cfg.d_model, cfg.d_ff
    per_layer = 8 * d + 2 * cfg.n_kv_heads * cfg.head_dim + cfg.n_heads + 2
    per_layer += (4 if cfg.activation in GATED_ACTIVATIONS else 2) * f
    kept = d if activation_checkpointing else per_layer
    n_layers = cfg.n_layers + (cfg.n_decoder_layers or 0)
    activations = 4.0 * tokens * (n_layers * kept + cfg.vocab_size + 3.5 * d)
    temporaries = 2 * 4.0 * tokens * cfg.vocab_size
    p = 4.0 * cfg.n_params
    states = OPTIMIZER_BYTES[optimizer] / 4 * p
    step_extra = 0.5 * p if optimizer == "adamw" else 0.0
    peak = max(p + states + activations + temporaries, 2 * p + states + step_extra)
    return TrainingMemory(p, p, states, activations, temporaries, peak)


def memory_lines(
    model_config: ModelConfig, batch_size: int, optimizer: str, activation_checkpointing: bool = False
) -> list[str]:
    """Inference memory (weights per format, KV cache) and the training step's peak of a config, at
    ``batch_size`` sequences of its ``max_seq_len``."""
    m = model_config
    assert m.n_kv_heads is not None and m.head_dim is not None
    kv_per_token = 2 * (m.n_layers + (m.n_decoder_layers or 0)) * m.n_kv_heads * m.head_dim
    t = m.max_seq_len
    weights = ", ".join(f"{fmt} {_bytes(weight_bytes(m, fmt))}" for fmt in FORMATS)
    lines = [
        f"  inference weights: {weights}",
        f"  KV cache: {_bytes(kv_per_token * 4)}/token fp32 ({_bytes(kv_per_token * 2)} bf16); "
        f"{_bytes(kv_per_token * 4 * t * batch_size)} fp32 for {batch_size} x {t} tokens",
    ]
    if m.arch == "decoder":
        tm = training_memory(m, batch_size, t, optimizer, activation_checkpointing)
        ckpt = "with" if activation_checkpointing else "without"
        lines.append(f"  training step, fp32, {batch_size} x {t} tokens, {optimizer}, {ckpt} activation checkpointing: "
                     f"peak {_bytes(tm.peak)} per process (weights {_bytes(tm.params)}, gradients {_bytes(tm.grads)}, "
                     f"optimizer {_bytes(tm.optimizer)}, activations {_bytes(tm.activations)})")  # fmt: skip
    return lines


def plan(config: PlanConfig) -> Plan:
    """Answer ``config`` (see the module doc): ``ConfigError`` unless exactly one of flops, hours and
    params is given; a budget too small for any config of ``vocab_size`` gets
    the laws' figures and the reason instead of a config."""
    given = [name for name in ("flops", "hours", "params") if getattr(config, name) is not None]
    if len(given) != 1:
        raise ConfigError(
            "give exactly one of --flops (a FLOP budget), --hours (device-hours) or --params (a model "
            f"size, for the reverse), not {' and '.join(given) or 'none'}"
        )
    throughput = None
    if config.params is not None:
        optima = {name: law.compute_for(config.params) for name, law in LAWS.items()}
        flops = optima[config.law].flops
    else:
        if config.hours is not None:
            per_device = config.flops_per_second or measure_matmul_flops() * config.mfu
            throughput = per_device * config.devices
            flops = config.hours * 3600 * throughput
        else:
            assert config.flops is not None
            flops = config.flops
        optima = {name: law.optimum(flops) for name, law in LAWS.items()}
    law = LAWS[config.law]
    losses = (
        {name: law.loss(o.params, o.tokens) for name, o in optima.items()}
        if isinstance(law, ParametricLaw)
        else {}
    )
    target = config.params if config.params is not None else optima[config.law].params
    try:
        suggested: ModelConfig | str = suggest_config(target, config.vocab_size, config.max_seq_len,
                                                      config.aspect_ratio)  # fmt: skip
    except ConfigError as e:
        suggested = f"{e}; a smaller --vocab-size or a larger budget"
    return Plan(config, flops, throughput, optima, losses, suggested)


def _count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _bytes(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"
