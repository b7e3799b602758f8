"""lamina/model/heads.py's CopyHead, the pointer-generator of an encoder-decoder with ``copy_attention``
(See et al. 2017): the model returns the mixture's log-probabilities, copy mass lands on the source's real
tokens only, cached decoding equals a full forward, the seq2seq loss reads the output as log-probs, and
the knob survives a lamina checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lamina
from lamina.checkpoint.lamina import save_checkpoint
from lamina.config import ModelConfig
from lamina.errors import ConfigError
from lamina.model.transformer import Transformer
from lamina.train.objectives import token_cross_entropy

V = 61


@pytest.fixture(scope="module")
def net() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("t5-tiny", vocab_size=V, copy_attention=True)).eval()


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    src = torch.randint(3, 40, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # right padding, holding a token id found nowhere else
    src[1, 6:] = 59
    tgt = torch.randint(3, V, (2, 7), generator=g)
    return src, mask, tgt


def test_the_output_is_a_normalized_log_distribution(net: Transformer) -> None:
    src, mask, tgt = _batch()
    with torch.no_grad():
        out = net(src, mask, decoder_input_ids=tgt)
        last = net.decode(tgt, net.encode(src, mask), mask, last_only=True, source_ids=src)
    assert out.shape == (2, 7, V) and out.dtype == torch.float32
    assert torch.allclose(out.exp().sum(-1), torch.ones(2, 7), atol=1e-5)
    assert torch.allclose(last, out[:, -1:], atol=1e-5)
    assert net.config.n_params == net.num_params()


def test_copy_mass_lands_on_the_real_source_tokens_only(net: Transformer) -> None:
    src, mask, _ = _batch()
    head = net.copy_head
    assert head is not None
    memory = net.encode(src, mask)
    h = torch.randn(2, 7, net.config.d_model)
    logits = torch.randn(2, 7, V)
    keys, valid = head.k_proj(memory), mask.bool()
    with torch.no_grad():
        bias = head.p_gen.bias.clone()  # restored below: the module-scoped model is shared
        head.p_gen.bias.fill_(-100.0)  # p_gen ~ 0: the copy distribution alone
        copy = head(h, logits, keys, memory, src, valid).exp()
        head.p_gen.bias.fill_(100.0)  # p_gen ~ 1: the vocabulary distribution alone
        gen = head(h, logits, keys, memory, src, valid)
        head.p_gen.bias.copy_(bias)
    for b in range(2):
        present = torch.zeros(V, dtype=torch.bool)
        present[src[b][mask[b].bool()]] = True
        assert torch.allclose(copy[b].sum(-1), torch.ones(7), atol=1e-5)
        assert copy[b][:, ~present].max() < 1e-20 and copy[b][:, present].min() > 0
    assert not present[59]  # the padding's id got nothing
    assert torch.allclose(gen, F.log_softmax(logits, -1), atol=1e-5)


def test_cached_decoding_equals_a_full_forward(net: Transformer) -> None:
    src, mask, tgt = _batch()
    with torch.no_grad():
        full = net(src, mask, decoder_input_ids=tgt)
        cache = net.new_cache(2, 16)
        steps = [net.decode(tgt[:, :3], net.encode(src, mask), mask, cache=cache, source_ids=src)]
        steps += [net.decode(tgt[:, t : t + 1], None, cache=cache) for t in range(3, 6)]
        assert torch.allclose(torch.cat(steps, 1), full[:, :6], atol=1e-5)
        assert len(cache.cross_k) == net.config.n_decoder_layers + 1  # the blocks' and the copy head's
        cache.keep(torch.tensor([1]))  # a row leaves: its source ids follow (trimmed to its length)
        assert cache.memory_ids is not None and torch.equal(cache.memory_ids, src[1:, :6])
        row = net.decode(tgt[1:, 6:], None, cache=cache)
    assert torch.allclose(row, full[1:, 6:], atol=1e-5)
    with pytest.raises(ConfigError, match="needs source_ids"):
        net.decode(tgt, net.encode(src, mask), mask)
    fresh = net.new_cache(2, 16)
    with pytest.raises(ConfigError, match="needs source_ids"):
        net.decode(tgt[:, :3], net.encode(src, mask), mask, cache=fresh)
    assert len(fresh.cross_k) == 0 and fresh.memory_ids is None  # a failed call leaves the cache as it was


def test_the_label_smoothed_loss_reads_log_probabilities(net: Transformer) -> None:
    src, mask, tgt = _batch()
    out = net(src, mask, decoder_input_ids=tgt)
    loss, n = token_cross_entropy(out, tgt, label_smoothing=0.1)
    nll = -out.gather(-1, tgt[..., None]).mean()
    assert n == tgt.numel() and torch.allclose(loss, 0.9 * nll - 0.1 * out.mean(-1).mean(), atol=1e-5)
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads) and net.copy_head.p_gen.weight.grad.abs().sum() > 0
    net.zero_grad(set_to_none=True)  # the module-scoped model is shared


def test_checkpoint_round_trip_and_misuse(net: Transformer, tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "ck", net)
    again = lamina.load(tmp_path / "ck").model
    src, mask, tgt = _batch()
    assert again.config.copy_attention and again.copy_head is not None
    with torch.no_grad():
        a, b = again(src, mask, decoder_input_ids=tgt), net(src, mask, decoder_input_ids=tgt)
    assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ConfigError, match=r"copy_attention .* needs arch='encoder-decoder'"):
        ModelConfig.preset("tiny", copy_attention=True)
