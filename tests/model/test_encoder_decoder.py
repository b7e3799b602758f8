"""The encoder-decoder of lamina/model/transformer.py (T5, the 2017 Transformer) and packed sequences.

Parity with ``transformers`` T5 lives in tests/checkpoint/test_hf_t5.py; here the 2017 Transformer is
checked against a naive float64 reference written from the paper, and T5 / decoder models against
themselves (cached decoding, packing)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lamina
from lamina.checkpoint.lamina import save_checkpoint
from lamina.config import ModelConfig, from_dict
from lamina.errors import ConfigError
from lamina.model.transformer import Transformer

TINY_BASE = dict(  # transformer-base's knobs at test size
    preset="transformer-base", vocab_size=101, max_seq_len=64, n_layers=2, n_decoder_layers=3, d_model=32,
    n_heads=4, d_ff=64, emb_dropout=0.0, resid_dropout=0.0,
)  # fmt: skip


def _model(**fields: object) -> Transformer:
    torch.manual_seed(0)
    net = Transformer(from_dict(ModelConfig, fields)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so the reference checks that they are applied
        for name, p in net.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return net


def _batch(vocab: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    src = torch.randint(3, vocab, (2, 11), generator=g)
    src_mask = torch.ones(2, 11, dtype=torch.long)
    src_mask[1, 7:] = 0  # right padding
    tgt = torch.randint(3, vocab, (2, 9), generator=g)
    tgt_mask = torch.ones(2, 9, dtype=torch.long)
    tgt_mask[1, 6:] = 0
    return src, src_mask, tgt, tgt_mask


def _reference_2017(
    net: Transformer, src: torch.Tensor, src_mask: torch.Tensor, tgt: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vaswani et al. 2017 in float64, straight from the paper: (memory, logits); right padding only."""
    cfg = net.config
    sd = {k: v.double() for k, v in net.state_dict().items()}
    d, H = cfg.d_model, cfg.n_heads
    hd = d // H

    def lin(x: torch.Tensor, p: str) -> torch.Tensor:
        return x @ sd[p + ".weight"].T + sd[p + ".bias"]

    def norm(x: torch.Tensor, p: str) -> torch.Tensor:
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + cfg.norm_eps) * sd[p + ".weight"] + sd[p + ".bias"]

    def attention(xq: torch.Tensor, xkv: torch.Tensor, p: str, allowed: torch.Tensor) -> torch.Tensor:
        B, Tq, Tk = xq.shape[0], xq.shape[1], xkv.shape[1]
        q = lin(xq, p + ".q_proj").view(B, Tq, H, hd).transpose(1, 2)
        k = lin(xkv, p + ".k_proj").view(B, Tk, H, hd).transpose(1, 2)
        v = lin(xkv, p + ".v_proj").view(B, Tk, H, hd).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        weights = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
        return lin((weights @ v).transpose(1, 2).reshape(B, Tq, d), p + ".o_proj")

    def embed(ids: torch.Tensor) -> torch.Tensor:
        pe = torch.zeros(ids.shape[1], d, dtype=torch.float64)
        for pos in range(ids.shape[1]):
            for i in range(0, d, 2):
                pe[pos, i] = math.sin(pos / 10000 ** (i / d))
                pe[pos, i + 1] = math.cos(pos / 10000 ** (i / d))
        return sd["tok_emb.weight"][ids] * math.sqrt(d) + pe

    def ffn(x: torch.Tensor, p: str) -> torch.Tensor:
        return lin(torch.relu(lin(x, p + ".up_proj")), p + ".down_proj")

    keys = src_mask.bool()[:, None, :].expand(-1, src.shape[1], -1)
    x = embed(src)
    for i in range(cfg.n_layers):
        p = f"encoder_blocks.{i}"
        x = norm(x + attention(x, x, p + ".attn", keys), p + ".attn_norm")
        x = norm(x + ffn(x, p + ".mlp"), p + ".mlp_norm")
    T = tgt.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None].expand(tgt.shape[0], -1, -1)
    cross = src_mask.bool()[:, None, :].expand(-1, T, -1)
    y = embed(tgt)
    for i in range(cfg.n_decoder_layers or 0):
        p = f"blocks.{i}"
        y = norm(y + attention(y, y, p + ".attn", causal), p + ".attn_norm")
        y = norm(y + attention(y, x, p + ".cross_attn", cross), p + ".cross_norm")
        y = norm(y + ffn(y, p + ".mlp"), p + ".mlp_norm")
    return x, y @ sd["tok_emb.weight"].T


def test_transformer_base_matches_a_float64_reference_with_padding() -> None:
    net = _model(**TINY_BASE)
    src, src_mask, tgt, tgt_mask = _batch(net.config.vocab_size)
    with torch.no_grad():
        memory = net.encode(src, src_mask)
        logits = net(src, src_mask, decoder_input_ids=tgt, decoder_attention_mask=tgt_mask)
    ref_memory, ref_logits = _reference_2017(net, src, src_mask, tgt)
    real_src, real_tgt = src_mask.bool(), tgt_mask.bool()
    assert (memory.double() - ref_memory)[real_src].abs().max() < 1e-4
    assert (logits.double() - ref_logits)[real_tgt].abs().max() < 1e-4
    assert ref_logits.abs().max() > 1  # the comparison is not of near-zero numbers


@pytest.mark.parametrize("preset", ["t5-tiny", "transformer-base"])
def test_cached_decoding_equals_a_full_forward(preset: str) -> None:
    net = _model(**(TINY_BASE if preset == "transformer-base" else {"preset": preset}))
    src, src_mask, tgt, _ = _batch(net.config.vocab_size)
    with torch.no_grad():
        full = net(src, src_mask, decoder_input_ids=tgt)
        memory = net.encode(src, src_mask)
        cache = net.new_cache(2, 32)
        steps = [net.decode(tgt[:, :4], memory, src_mask, cache=cache)]  # a prompt, then one at a time
        steps += [net.decode(tgt[:, t : t + 1], None, cache=cache) for t in range(4, tgt.shape[1])]
        again = net(src, src_mask, decoder_input_ids=tgt[:, :1], cache=net.new_cache(2, 8))
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    assert len(cache.cross_k) == net.config.n_decoder_layers  # computed once, per layer
    assert torch.allclose(again, full[:, :1], atol=1e-5)  # forward encodes on the first cached call
    cache.keep(torch.tensor([1]))  # rows leave: the cross keys follow
    with torch.no_grad():
        row = net.decode(tgt[1:, -1:], None, cache=cache)
    assert cache.cross_k[0].shape[0] == 1 and row.shape == (1, 1, net.config.vocab_size)


def test_source_padding_does_not_change_the_logits() -> None:
    net = _model(preset="t5-tiny")
    src, _, tgt, _ = _batch(net.config.vocab_size)
    short = src[:1, :7]
    padded = torch.cat([short, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * 7 + [0] * 4])
    with torch.no_grad():
        a = net(short, decoder_input_ids=tgt[:1])
        b = net(padded, mask, decoder_input_ids=tgt[:1])
    assert torch.allclose(a, b, atol=1e-5)


def test_t5_output_rescaling_and_unscaled_attention_are_knobs() -> None:
    net = _model(preset="t5-tiny")
    src, src_mask, tgt, _ = _batch(net.config.vocab_size)
    with torch.no_grad():
        base = net(src, src_mask, decoder_input_ids=tgt)
        net.config.scale_decoder_outputs = False
        unscaled = net(src, src_mask, decoder_input_ids=tgt)
    assert torch.allclose(unscaled * net.config.d_model**-0.5, base, atol=1e-5)
    assert net.blocks[0].attn.scale == 1.0 and net.blocks[0].cross_attn.scale == 1.0


@pytest.mark.parametrize(
    ("preset", "hf_params"),  # HF num_parameters of t5-small and google/t5-v1_1-small
    [("t5-small", 60_506_624), ("t5-v1_1-small", 76_961_152), ("transformer-base", None), ("t5-tiny", None)],
)
def test_parameter_counts(preset: str, hf_params: int | None) -> None:
    cfg = ModelConfig.preset(preset)
    with torch.device("meta"):
        net = Transformer(cfg)
    assert cfg.n_params == net.num_params()
    if hf_params is not None:
        assert cfg.n_params == hf_params


def test_flops_count_both_stacks_and_cross_attention() -> None:
    cfg = ModelConfig.preset("t5-small")
    hd, H, t = 64, 8, 128
    n_attn = cfg.n_layers + 2 * (cfg.n_decoder_layers or 0)
    forward = 2 * cfg.n_matmul_params + 4 * n_attn * t * H * hd
    assert cfg.flops_per_token(t, training=False) == forward
    assert cfg.flops_per_token(t) == 3 * forward


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    net = _model(preset="t5-tiny")
    src, src_mask, tgt, tgt_mask = _batch(net.config.vocab_size)
    net.train()
    grads = []
    for ckpt in (False, True):
        net.zero_grad()
        net.activation_checkpointing = ckpt
        logits = net(src, src_mask, decoder_input_ids=tgt, decoder_attention_mask=tgt_mask)
        F.cross_entropy(logits.flatten(0, 1), tgt.roll(-1, 1).flatten()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_misuse_is_one_clear_error() -> None:
    net = _model(preset="t5-tiny")
    src = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="decoder_input_ids"):
        net(src)
    with pytest.raises(ValueError, match="needs memory"):
        net.decode(src, None)
    with pytest.raises(ValueError, match="encoder-decoder"):
        _model(preset="tiny").encode(src)
    with pytest.raises(ConfigError, match="pos_encoding='learned'"):
        ModelConfig(arch="encoder-decoder")
    with pytest.raises(ConfigError, match="n_decoder_layers"):
        ModelConfig(n_decoder_layers=2)
    with pytest.raises(ConfigError, match="decoder_start_token_id"):
        ModelConfig.preset("t5-tiny", decoder_start_token_id=512)
    with pytest.raises(ConfigError, match="relative_attention_max_distance"):
        ModelConfig.preset("t5-tiny", relative_attention_max_distance=4)


# -- packed sequences (segment_ids) ------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_a_packed_row_equals_its_sequences_apart(preset: str) -> None:
    net = _model(preset=preset, vocab_size=97)
    g = torch.Generator().manual_seed(2)
    parts = [torch.randint(0, 97, (1, n), generator=g) for n in (5, 3, 7)]
    packed = torch.cat(parts, 1)  # (1, 15)
    segments = torch.cat([torch.full((1, p.shape[1]), i) for i, p in enumerate(parts)], 1)
    positions = torch.cat([torch.arange(p.shape[1])[None] for p in parts], 1)
    with torch.no_grad():
        apart = torch.cat([net(p) for p in parts], 1)
        given = net(packed, position_ids=positions, segment_ids=segments)
        default = net(packed, segment_ids=segments)  # positions restart at each segment
        unpacked = net(packed)
    assert torch.allclose(given, apart, atol=1e-5)
    assert torch.allclose(default, apart, atol=1e-5)
    assert not torch.allclose(unpacked[:, 5:], apart[:, 5:], atol=1e-3)  # the mask matters
    with pytest.raises(ValueError, match="segment_ids"):
        net(packed, segment_ids=segments, cache=net.new_cache(1, 32))


@pytest.mark.parametrize("arch", ["decoder", "encoder"])
def test_relative_positions_serve_one_stack_models_too(arch: str) -> None:
    net = _model(preset="tiny", arch=arch, pos_encoding="relative", vocab_size=64)
    x = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        full = net(x, mask)
        assert torch.allclose(net(x[1:, :6]), full[1:, :6], atol=1e-5)  # padding changes nothing
        if arch == "decoder":
            cache = net.new_cache(2, 16)
            steps = torch.cat(
                [net(x[:, :4], mask[:, :4], cache=cache), net(x[:, 4:], mask[:, 4:], cache=cache)], 1
            )
            assert torch.allclose(steps[mask.bool()], full[mask.bool()], atol=1e-5)
    assert net.rel_bias is not None and net.config.n_params == net.num_params()


def test_lamina_checkpoint_round_trip(tmp_path: Path) -> None:
    net = _model(preset="t5-tiny", tie_embeddings=False, n_decoder_layers=3)
    save_checkpoint(tmp_path / "ck", net)
    again = lamina.load(tmp_path / "ck").model
    src, src_mask, tgt, _ = _batch(net.config.vocab_size)
    assert again.config == net.config
    with torch.no_grad():
        assert torch.equal(
            again(src, src_mask, decoder_input_ids=tgt), net(src, src_mask, decoder_input_ids=tgt)
        )


@pytest.mark.parametrize("preset", ["t5-tiny", "transformer-base"])
def test_batched_decoding_steps_use_the_prepacked_head(preset: str) -> None:
    """2-16 rows of decoder states (a batched step) through the oneDNN-prepacked head copy give the plain
    head's logits within 1e-5 (T5's output rescaling and the biased head applied), one row and autograd do
    not use it, and an in-place write to the head makes the copy again."""
    from lamina.model.layers import onednn_available

    net = _model(preset=preset, vocab_size=101) if preset == "t5-tiny" else _model(**TINY_BASE)
    if preset == "transformer-base":
        net.lm_head.bias = torch.nn.Parameter(torch.randn(101))  # type: ignore[union-attr]
    h = torch.randn(8, 1, net.config.d_model)
    with torch.no_grad():
        assert net._rows_logits(h[:1]) is None
        rows = net._rows_logits(h)
        if not onednn_available():
            assert rows is None
            return
        assert rows is not None
        torch.testing.assert_close(rows, net._lm_logits(h), atol=1e-5, rtol=0)
        net.lm_head.weight.mul_(2.0)  # type: ignore[union-attr]
        torch.testing.assert_close(net._rows_logits(h), net._lm_logits(h), atol=2e-5, rtol=0)
    assert net._rows_logits(h) is None  # autograd on
