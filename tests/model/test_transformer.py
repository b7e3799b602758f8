"""The Transformer against a naive reference written from the papers' formulas, over every config choice.

Hugging Face parity for GPT-2 / Llama / BLOOM lives in ``tests/checkpoint/test_hf.py``; this file covers
the combinations no HF family has (post-LN + RoPE, sinusoidal positions, ALiBi with 6 heads, explicit
head_dim, ...), plus the KV cache, padding, dropout, initialisers and gradients.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from lamina.checkpoint.lamina import build_model
from lamina.config import ModelConfig
from lamina.model.transformer import Transformer

V = 101
BASE: dict[str, Any] = dict(vocab_size=V, max_seq_len=64, n_layers=2, d_model=32, n_heads=4, d_ff=48)


def _cfg(**kw: Any) -> ModelConfig:
    return ModelConfig(**{**BASE, **kw})


def _randomise(model: Transformer, seed: int = 0) -> Transformer:
    """Replace every parameter by random values big enough that any formula slip shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and name.endswith("weight"):  # norm gains
                p.copy_(1 + 0.5 * r)
            elif p.ndim == 1:  # biases (linear and norm)
                p.copy_(0.2 * r)
            elif "emb" in name:
                p.copy_(0.5 * r)
            else:  # linear weights (out, in)
                p.copy_(r / math.sqrt(p.shape[1]))
    return model.eval()


def _model(seed: int = 0, **kw: Any) -> Transformer:
    torch.manual_seed(seed)
    return _randomise(Transformer(_cfg(**kw)), seed)


def _ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# -- the naive reference -------------------------------------------------------------------------------


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1 + torch.exp(-x))


REF_ACT = {
    "gelu": _gelu,
    "gelu_tanh": lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    "relu": lambda x: torch.where(x > 0, x, torch.zeros_like(x)),
    "silu": _silu,
    "swiglu": _silu,
    "geglu": _gelu,
}


def _paper_alibi_slopes(n: int) -> list[float]:
    """``get_slopes`` from the ALiBi paper's reference code (Press et al. 2022)."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + _paper_alibi_slopes(2 * closest)[0::2][: n - closest]


def _ref_inv_freq(cfg: ModelConfig, seq_len: int) -> list[float]:
    """RoPE frequencies; llama3 as ``apply_scaling`` in Meta's Llama 3.1 code, dynamic as NTK-aware scaling."""
    hd, base = cfg.head_dim, cfg.rope_theta
    assert hd is not None
    if cfg.rope_scaling == "dynamic" and seq_len > cfg.rope_original_max_seq_len:
        f = cfg.rope_factor
        base = base * (f * seq_len / cfg.rope_original_max_seq_len - (f - 1)) ** (hd / (hd - 2))
    freqs = [1.0 / base ** (2 * i / hd) for i in range(hd // 2)]
    if cfg.rope_scaling == "linear":
        freqs = [f / cfg.rope_factor for f in freqs]
    if cfg.rope_scaling == "llama3":
        old, lo, hi, scale = (
            cfg.rope_original_max_seq_len,
            cfg.rope_low_freq_factor,
            cfg.rope_high_freq_factor,
            cfg.rope_factor,
        )
        new = []
        for freq in freqs:
            wavelen = 2 * math.pi / freq
            if wavelen < old / hi:
                new.append(freq)
            elif wavelen > old / lo:
                new.append(freq / scale)
            else:
                smooth = (old / wavelen - lo) / (hi - lo)
                new.append((1 - smooth) * freq / scale + smooth * freq)
        freqs = new
    return freqs


def ref_logits(model: Transformer, ids: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (T, V) of one unpadded row ``ids`` (T,), in float64, from the state dict and the formulas."""
    cfg = model.config
    W = {k: v.detach().double() for k, v in model.state_dict().items()}
    T, d, H, Hkv, hd = ids.shape[0], cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    assert Hkv is not None and hd is not None
    pos = torch.arange(T) if pos is None else pos

    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        y = x @ W[name + ".weight"].T
        return y + W[name + ".bias"] if name + ".bias" in W else y

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        if cfg.norm == "rmsnorm":
            return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * W[name + ".weight"]
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        y = (x - mu) / torch.sqrt(var + cfg.norm_eps) * W[name + ".weight"]
        return y + W[name + ".bias"] if name + ".bias" in W else y

    def rope(x: torch.Tensor) -> torch.Tensor:  # (T, heads, hd), rotate-half pairs (i, i + hd/2)
        freqs = _ref_inv_freq(cfg, int(pos.max()) + 1)
        out, h = x.clone(), hd // 2
        for i, f in enumerate(freqs):
            c, s = torch.cos(pos.double() * f)[:, None], torch.sin(pos.double() * f)[:, None]
            out[..., i] = x[..., i] * c - x[..., i + h] * s
            out[..., i + h] = x[..., i + h] * c + x[..., i] * s
        return out

    def attention(x: torch.Tensor, p: str) -> torch.Tensor:
        q = lin(x, p + "q_proj").view(T, H, hd)
        k = lin(x, p + "k_proj").view(T, Hkv, hd)
        v = lin(x, p + "v_proj").view(T, Hkv, hd)
        if cfg.pos_encoding == "rope":
            q, k = rope(q), rope(k)
        slopes = _paper_alibi_slopes(H)
        i, j = pos[:, None].double(), pos[None, :].double()  # query, key positions
        out = torch.zeros(T, H, hd, dtype=torch.float64)
        for h in range(H):
            g = h // (H // Hkv)  # the KV head serving query head h
            scores = torch.matmul(q[:, h], k[:, g].T) / math.sqrt(hd)  # (T, T)
            if cfg.pos_encoding == "alibi":
                scores = scores - slopes[h] * (i - j)
            scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
            e = torch.exp(scores - scores.max(-1, keepdim=True).values)
            out[:, h] = torch.matmul(e / e.sum(-1, keepdim=True), v[:, g])
        return lin(out.reshape(T, H * hd), p + "o_proj")

    def mlp(x: torch.Tensor, p: str) -> torch.Tensor:
        act = REF_ACT[cfg.activation]
        if cfg.activation in ("swiglu", "geglu"):
            return lin(act(lin(x, p + "gate_proj")) * lin(x, p + "up_proj"), p + "down_proj")
        return lin(act(lin(x, p + "up_proj")), p + "down_proj")

    x = W["tok_emb.weight"][ids]
    if cfg.scale_embeddings:
        x = x * math.sqrt(d)
    if cfg.pos_encoding == "learned":
        x = x + W["pos_emb.weight"][pos]
    if cfg.pos_encoding == "sinusoidal":  # PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(...)
        pe = torch.zeros(T, d, dtype=torch.float64)
        for i in range(d // 2):
            pe[:, 2 * i] = torch.sin(pos.double() / 10000 ** (2 * i / d))
            pe[:, 2 * i + 1] = torch.cos(pos.double() / 10000 ** (2 * i / d))
        x = x + pe
    if cfg.emb_norm:
        x = norm(x, "emb_norm")
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}."
        if cfg.norm_placement == "pre":
            x = x + attention(norm(x, p + "attn_norm"), p + "attn.")
            x = x + mlp(norm(x, p + "mlp_norm"), p + "mlp.")
        else:
            x = norm(x + attention(x, p + "attn."), p + "attn_norm")
            x = norm(x + mlp(x, p + "mlp."), p + "mlp_norm")
    if cfg.norm_placement == "pre":
        x = norm(x, "final_norm")
    return x @ W["lm_head.weight"].T


def _check_row(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


# -- logits against the reference over the config grid --------------------------------------------------

GRID: dict[str, dict[str, Any]] = {
    "gelu-layernorm-pre-learned": {},
    "gelu_tanh-untied": dict(activation="gelu_tanh", tie_embeddings=False),
    "relu-post-layernorm": dict(activation="relu", norm_placement="post"),
    "silu-rmsnorm-nobias": dict(activation="silu", norm="rmsnorm", bias=False),
    "swiglu-rope-gqa": dict(
        activation="swiglu", norm="rmsnorm", pos_encoding="rope", n_kv_heads=2, bias=False
    ),
    "geglu-rope-mqa-bias": dict(activation="geglu", pos_encoding="rope", n_kv_heads=1),
    "layernorm-nobias": dict(bias=False),
    "post-rmsnorm-rope": dict(norm="rmsnorm", norm_placement="post", pos_encoding="rope"),
    "sinusoidal": dict(pos_encoding="sinusoidal"),
    "sinusoidal-scaled-emb-post": dict(
        pos_encoding="sinusoidal", scale_embeddings=True, norm_placement="post"
    ),
    "rope-linear": dict(pos_encoding="rope", rope_scaling="linear", rope_factor=2.0, rope_theta=100.0),
    "rope-llama3": dict(
        pos_encoding="rope",
        rope_theta=100.0,  # wavelengths 6.3, 20, 63, 199: high, medium, medium and low band of 64 / (4, 1)
        rope_scaling="llama3",
        rope_factor=8.0,
        rope_original_max_seq_len=64,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
    ),
    "rope-dynamic": dict(
        pos_encoding="rope",
        rope_scaling="dynamic",
        rope_factor=2.0,
        rope_original_max_seq_len=8,
        rope_theta=100.0,
    ),
    "rope-head_dim-12": dict(pos_encoding="rope", head_dim=12, activation="swiglu"),
    "alibi-4-heads": dict(pos_encoding="alibi", emb_norm=True),
    "alibi-6-heads-gqa": dict(pos_encoding="alibi", d_model=48, n_heads=6, n_kv_heads=3),
    "alibi-6-heads-post": dict(
        pos_encoding="alibi", d_model=48, n_heads=6, norm_placement="post", bias=False
    ),
    "none": dict(pos_encoding="none"),
    "none-mqa-untied": dict(pos_encoding="none", n_kv_heads=1, tie_embeddings=False),
    "learned-gqa-emb_norm-rmsnorm": dict(n_kv_heads=2, emb_norm=True, norm="rmsnorm"),
    "learned-head_dim-12-scaled": dict(head_dim=12, scale_embeddings=True, n_kv_heads=2, emb_norm=True),
    "sinusoidal-head_dim-6-untied": dict(
        pos_encoding="sinusoidal", head_dim=6, tie_embeddings=False, bias=False
    ),
}


@pytest.mark.parametrize("name", GRID)
def test_logits_match_naive_reference(name: str) -> None:
    model = _model(**GRID[name])
    ids = _ids(2, 16)
    with torch.no_grad():
        got = model(ids)
    assert got.shape == (2, 16, V)
    for b in range(2):
        _check_row(got[b], ref_logits(model, ids[b]))


@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(pos_encoding="sinusoidal"),
        dict(pos_encoding="rope", rope_theta=100.0),
        dict(pos_encoding="rope", rope_scaling="llama3", rope_factor=8.0, rope_original_max_seq_len=16),
        dict(pos_encoding="alibi", d_model=48, n_heads=6),
    ],
    ids=["learned", "sinusoidal", "rope", "rope-llama3", "alibi"],
)
def test_explicit_position_ids_match_reference(kw: dict[str, Any]) -> None:
    model = _model(**kw)
    ids = _ids(1, 10)
    pos = torch.arange(10) + 37
    with torch.no_grad():
        got = model(ids, position_ids=pos[None])
    _check_row(got[0], ref_logits(model, ids[0], pos))


def test_reference_sees_every_choice() -> None:
    """Guard the guard: the reference disagrees with lamina when a config knob is flipped behind its back."""
    model = _model(pos_encoding="alibi", d_model=48, n_heads=6)
    ids = _ids(1, 12)
    with torch.no_grad():
        got = model(ids)[0].double()
    for change in [
        dict(pos_encoding="none"),
        dict(norm="rmsnorm"),
        dict(norm_placement="post"),
        dict(activation="relu"),
        dict(scale_embeddings=True),
    ]:
        flipped = ModelConfig(**{**vars(model.config), **change})
        other = Transformer(flipped).eval()
        other.load_state_dict(model.state_dict(), strict=False)
        assert not torch.allclose(got, ref_logits(other, ids[0]), atol=1e-3), change
    slopes = model.slopes.tolist()
    assert slopes == pytest.approx([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3])  # paper, n = 6
    assert slopes == pytest.approx(_paper_alibi_slopes(6))


def test_last_only_is_the_last_position() -> None:
    model = _model(pos_encoding="rope")
    ids = _ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, last_only=True), model(ids)[:, -1:])


def test_build_model_reproduces_logits() -> None:
    """``build_model`` (meta-device construction + assign) remakes the RoPE / ALiBi buffers correctly."""
    for kw in (
        dict(pos_encoding="rope", rope_scaling="llama3", rope_factor=8.0, rope_original_max_seq_len=16),
        dict(pos_encoding="alibi", d_model=48, n_heads=6, tie_embeddings=False),
    ):
        model = _model(**kw)
        rebuilt = build_model(model.config, model.state_dict())
        ids = _ids(2, 12)
        with torch.no_grad():
            torch.testing.assert_close(rebuilt(ids), model(ids), atol=0, rtol=0)


def test_learned_positions_past_max_seq_len_raise() -> None:
    model = _model(max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model(_ids(1, 9))


# -- KV cache ---------------------------------------------------------------------------------------------
# Dynamic NTK is left out on purpose: its base depends on the longest position of each call, so cached keys
# rotated at a shorter length differ from a full forward once past rope_original_max_seq_len (as in HF).

CACHE_CONFIGS: dict[str, dict[str, Any]] = {
    "learned": dict(n_kv_heads=2),
    "sinusoidal": dict(pos_encoding="sinusoidal", norm_placement="post"),
    "rope-gqa": dict(pos_encoding="rope", n_kv_heads=2, activation="swiglu", norm="rmsnorm", bias=False),
    "rope-llama3-mqa": dict(
        pos_encoding="rope",
        n_kv_heads=1,
        rope_scaling="llama3",
        rope_factor=8.0,
        rope_original_max_seq_len=16,
    ),
    "alibi-6-heads": dict(pos_encoding="alibi", d_model=48, n_heads=6, emb_norm=True),
    "none": dict(pos_encoding="none"),
}


@pytest.mark.parametrize("name", CACHE_CONFIGS)
@pytest.mark.parametrize("chunks", [[1] * 12, [5, 3, 1, 1, 1, 1]], ids=["token-by-token", "chunked-prefill"])
def test_kv_cache_matches_full_forward(name: str, chunks: list[int]) -> None:
    model = _model(**CACHE_CONFIGS[name])
    ids = _ids(2, 12)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 16)
        outs, start = [], 0
        for n in chunks:
            outs.append(model(ids[:, start : start + n], cache=cache))
            start += n
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_overflow_raises() -> None:
    model = _model(pos_encoding="rope")
    cache = model.new_cache(1, 4)
    with torch.no_grad():
        model(_ids(1, 3), cache=cache)
        with pytest.raises(ValueError, match="capacity"):
            model(_ids(1, 2), cache=cache)


# -- padding ----------------------------------------------------------------------------------------------

PAD_CONFIGS: dict[str, dict[str, Any]] = {
    "learned": {},
    "sinusoidal": dict(pos_encoding="sinusoidal"),
    "rope": dict(pos_encoding="rope", n_kv_heads=2),
    "alibi": dict(pos_encoding="alibi", d_model=48, n_heads=6),
    "none": dict(pos_encoding="none", norm_placement="post"),
}
LENGTHS = (10, 6, 8)


def _padded(rows: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), 7)  # a real token id: pads must be masked, not merely zero
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[b, sl], mask[b, sl] = r, 1
    return ids, mask


def _rows(seed: int = 3) -> list[torch.Tensor]:
    return [_ids(1, n, seed + i)[0] for i, n in enumerate(LENGTHS)]


@pytest.mark.parametrize("name", PAD_CONFIGS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_rows_alone(name: str, side: str) -> None:
    model = _model(**PAD_CONFIGS[name])
    rows = _rows()
    ids, mask = _padded(rows, side)
    with torch.no_grad():
        got = model(ids, attention_mask=mask)
        for b, r in enumerate(rows):
            alone = model(r[None])[0]
            torch.testing.assert_close(got[b][mask[b].bool()], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["learned", "rope", "alibi"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_prefill_then_decode_with_cache(name: str, side: str) -> None:
    model = _model(**PAD_CONFIGS[name])
    rows = _rows()
    ids, mask = _padded(rows, side)
    new = _ids(len(rows), 4, seed=9)  # four decode steps, one token per row each
    with torch.no_grad():
        cache = model.new_cache(len(rows), ids.shape[1] + 4)
        prefill = model(ids, attention_mask=mask, cache=cache)
        steps = [model(new[:, t : t + 1], cache=cache) for t in range(4)]
        for b, r in enumerate(rows):
            alone = model(torch.cat([r, new[b]])[None])[0]
            n = len(r)
            torch.testing.assert_close(prefill[b][mask[b].bool()], alone[:n], atol=1e-5, rtol=1e-5)
            for t in range(4):
                torch.testing.assert_close(steps[t][b, 0], alone[n + t], atol=1e-5, rtol=1e-5)


# -- dropout ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["emb_dropout", "attn_dropout", "resid_dropout"])
def test_dropout_active_in_train_only(which: str) -> None:
    model = _model(pos_encoding="rope", **{which: 0.3})
    ids = _ids(2, 12)
    with torch.no_grad():
        ev1, ev2 = model(ids), model(ids)
        model.train()
        tr1, tr2 = model(ids), model(ids)
    torch.testing.assert_close(ev1, ev2, atol=0, rtol=0)
    assert not torch.allclose(tr1, tr2, atol=1e-4)
    assert not torch.allclose(tr1, ev1, atol=1e-4)


def test_zero_dropout_train_equals_eval() -> None:
    model = _model(pos_encoding="alibi", emb_norm=True)
    ids = _ids(2, 12)
    with torch.no_grad():
        ev = model(ids)
        model.train()
        torch.testing.assert_close(model(ids), ev, atol=1e-6, rtol=1e-6)


# -- initialisation ---------------------------------------------------------------------------------------

INIT_BASE = dict(vocab_size=512, max_seq_len=256, n_layers=2, d_model=256, n_heads=4, d_ff=512, emb_norm=True)


def _linear_like(model: Transformer) -> dict[str, torch.Tensor]:
    """Weights of every Linear / Embedding, by module name (a tied head appears as tok_emb)."""
    return {
        n: m.weight.detach()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Embedding)
        and not (n == "lm_head" and model.config.tie_embeddings)
    }


def _check_norms_and_biases(model: Transformer) -> None:
    for name, p in model.named_parameters():
        if p.ndim == 1 and name.endswith("weight"):
            assert torch.all(p == 1), name
        elif p.ndim == 1:
            assert torch.all(p == 0), name


@pytest.mark.parametrize("scaled", [True, False])
def test_normal_init(scaled: bool) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(**INIT_BASE, init_std=0.05, scaled_residual_init=scaled, tie_embeddings=False)
    model = Transformer(cfg)
    for name, w in _linear_like(model).items():
        residual = name.endswith(("attn.o_proj", "mlp.down_proj"))
        want = 0.05 / math.sqrt(2 * 2) if residual and scaled else 0.05
        assert abs(w.mean().item()) < 0.05 * want + 1e-4, name
        assert w.std().item() == pytest.approx(want, rel=0.05), name
    _check_norms_and_biases(model)


def test_xavier_init() -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**INIT_BASE, initializer="xavier", tie_embeddings=False))
    for name, w in _linear_like(model).items():
        fan_out, fan_in = w.shape
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert w.abs().max().item() <= bound, name
        assert w.abs().max().item() > 0.95 * bound, name  # uniform fills the interval
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05), name
    _check_norms_and_biases(model)


def test_kaiming_init() -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**INIT_BASE, initializer="kaiming", tie_embeddings=False))
    for name, w in _linear_like(model).items():
        want = math.sqrt(2 / w.shape[1])  # He et al., fan_in, ReLU gain
        assert abs(w.mean().item()) < 0.05 * want, name
        assert w.std().item() == pytest.approx(want, rel=0.05), name
    _check_norms_and_biases(model)


def test_tied_head_shares_the_embedding() -> None:
    tied, untied = _model(), _model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert not torch.equal(untied.lm_head.weight, untied.tok_emb.weight)


# -- gradients --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(emb_norm=True, tie_embeddings=False),
        dict(pos_encoding="rope", activation="swiglu", norm="rmsnorm", n_kv_heads=2, bias=False),
        dict(pos_encoding="alibi", norm_placement="post", activation="geglu"),
        dict(pos_encoding="sinusoidal", scale_embeddings=True, n_kv_heads=1, head_dim=12),
    ],
    ids=["learned-emb_norm-untied", "llama-like", "alibi-post-geglu", "sinusoidal-mqa-head_dim"],
)
def test_gradients_reach_every_parameter(kw: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = Transformer(_cfg(**kw)).train()  # fresh init: zero biases and unit norms must still get grads
    ids = _ids(2, 16)
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_position_tables_stay_float32_when_the_model_is_cast() -> None:
    """RoPE frequencies / ALiBi slopes are not buffers: ``.to(bfloat16)`` must not round them."""
    for pos in ("rope", "alibi"):
        model = Transformer(ModelConfig.preset("tiny", vocab_size=64, pos_encoding=pos)).to(torch.bfloat16)
        table = model.inv_freq if pos == "rope" else model.slopes
        assert table is not None and table.dtype == torch.float32
        assert model(torch.arange(5)[None]).dtype == torch.bfloat16


FUSE_CONFIGS: dict[str, dict[str, Any]] = {
    "rope-gqa-swiglu-bias": dict(pos_encoding="rope", n_kv_heads=2, activation="swiglu", bias=True),
    "rope-head_dim-12": GRID["rope-head_dim-12"],
    "alibi-6-heads-gqa": GRID["alibi-6-heads-gqa"],
    "none-mqa-untied": GRID["none-mqa-untied"],
    "learned-gelu": dict(n_kv_heads=2),
}


@pytest.mark.parametrize("name", FUSE_CONFIGS)
def test_fused_projections_give_the_same_logits(name: str) -> None:
    """fuse_projections (q/k/v in one linear, gate/up in another) changes no logit, with or without cache."""
    kw = FUSE_CONFIGS[name]
    model = _model(**kw)
    ids = _ids(2, 12)
    with torch.no_grad():
        want = model(ids)
        for block in model.blocks:
            block.attn.fuse_projections()
            block.mlp.fuse_projections()
        assert not any(k.endswith(("q_proj.weight", "gate_proj.weight")) for k in model.state_dict())
        got = model(ids)
        cache = model.new_cache(2, 16)
        steps = torch.cat([model(ids[:, :5], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(5, 12)], 1)  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(steps, want, atol=1e-5, rtol=1e-5)
    assert model.blocks[0].attn.qkv_proj is not None
    assert (model.blocks[0].mlp.gate_up_proj is not None) == (kw.get("activation") == "swiglu")


def test_t5_init_is_transformers_t5_init() -> None:
    """initializer="t5": the std of each kind of weight equals that of a freshly built transformers T5."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = ModelConfig.preset("t5-tiny", d_model=64, n_heads=4, d_ff=256, vocab_size=2048, initializer="t5")
    ours = dict(Transformer(cfg).named_parameters())
    hf = T5ForConditionalGeneration(
        T5Config(vocab_size=2048, d_model=64, d_kv=16, num_heads=4, d_ff=256, num_layers=2,
                 relative_attention_num_buckets=8)
    )  # fmt: skip
    theirs = dict(hf.named_parameters())
    pairs = {
        "tok_emb": "shared", "q_proj": "SelfAttention.q", "k_proj": "SelfAttention.k",
        "v_proj": "SelfAttention.v", "o_proj": "SelfAttention.o", "up_proj": "DenseReluDense.wi",
        "down_proj": "DenseReluDense.wo", "rel_bias": "relative_attention_bias",
    }  # fmt: skip
    for mine, hfs in pairs.items():
        a = torch.cat([p.flatten() for n, p in ours.items() if mine in n and "norm" not in n])
        b = torch.cat([p.flatten() for n, p in theirs.items() if hfs in n and "layer_norm" not in n])
        assert a.std().item() == pytest.approx(b.std().item(), rel=0.15), mine
    assert all(p.min() == p.max() == 1 for n, p in ours.items() if "norm" in n)
