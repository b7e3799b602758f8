"""lamina/generate/seq2seq.py (over the engine): greedy ids and beams equal transformers' generate on a tiny
random T5; sampling is seeded per sequence; what it cannot do is refused."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from lamina.checkpoint.hf import config_from_hf, state_dict_from_hf
from lamina.checkpoint.lamina import build_model
from lamina.config import GenerationConfig, ModelConfig
from lamina.errors import ConfigError
from lamina.generate.seq2seq import generate_seq2seq
from lamina.model.transformer import Transformer

SOURCES = [[5, 9, 13, 40, 41, 7, 1], [22, 3, 1], [60, 61, 62, 63, 64, 1]]  # different lengths


@pytest.fixture(scope="module", params=["relu", "gated-gelu"], ids=["v1.0", "v1.1"])
def pair(request: pytest.FixtureRequest) -> tuple[tf.T5ForConditionalGeneration, Transformer]:
    torch.manual_seed(0)
    hc = tf.T5Config(
        vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj=request.param,
        dropout_rate=0.0, decoder_start_token_id=0,
    )  # fmt: skip
    hf = tf.T5ForConditionalGeneration(hc).eval()
    data = hc.to_dict()
    cfg = config_from_hf(data)
    return hf, build_model(cfg, state_dict_from_hf(data, hf.state_dict(), cfg)).eval()


def _hf_greedy(hf: tf.T5ForConditionalGeneration, n: int, eos: int, **controls: float) -> list[list[int]]:
    S = max(len(s) for s in SOURCES)
    ids = torch.tensor([s + [0] * (S - len(s)) for s in SOURCES])
    mask = torch.tensor([[1] * len(s) + [0] * (S - len(s)) for s in SOURCES])
    out = hf.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, num_beams=1,
        eos_token_id=eos, pad_token_id=0, decoder_start_token_id=0, **controls,
    )  # fmt: skip
    rows = []
    for row in out[:, 1:].tolist():  # without the decoder start
        rows.append(row[: row.index(eos)] if eos in row else row)
    return rows


@pytest.mark.parametrize("controls", [{}, {"repetition_penalty": 1.5, "no_repeat_ngram_size": 2}])
def test_greedy_ids_equal_transformers_generate(pair: tuple, controls: dict) -> None:
    hf, net = pair
    free = _hf_greedy(hf, 12, eos=95, **controls)  # an eos that (almost surely) never comes
    eos = free[0][4]  # now one that ends the first target after 4 tokens
    expected = _hf_greedy(hf, 12, eos=eos, **controls)
    cfg = GenerationConfig(max_new_tokens=12, temperature=0, eos_token_ids=[eos], **controls)
    got = generate_seq2seq(net, SOURCES, cfg)
    assert [r[0].token_ids for r in got] == expected
    assert got[0][0].finish_reason == "stop" and len(got[0][0].token_ids) == free[0].index(eos)
    assert {r[0].finish_reason for r in got[1:]} <= {"stop", "length"}


def _hf_beams(
    hf: tf.T5ForConditionalGeneration, eos: int, early_stopping: bool
) -> tuple[list[list[int]], torch.Tensor]:
    S = max(len(s) for s in SOURCES)
    out = hf.generate(
        input_ids=torch.tensor([s + [0] * (S - len(s)) for s in SOURCES]),
        attention_mask=torch.tensor([[1] * len(s) + [0] * (S - len(s)) for s in SOURCES]),
        max_new_tokens=10, do_sample=False, num_beams=4, num_return_sequences=2, length_penalty=0.7,
        early_stopping=early_stopping, eos_token_id=eos, pad_token_id=0, decoder_start_token_id=0,
        return_dict_in_generate=True, output_scores=True,
    )  # fmt: skip
    rows = [row[: row.index(eos)] if eos in row else row for row in out.sequences[:, 1:].tolist()]
    return rows, out.sequences_scores


@pytest.mark.parametrize("early_stopping", [False, True])
def test_beam_search_equals_transformers(pair: tuple, early_stopping: bool) -> None:
    hf, net = pair
    eos = _hf_beams(hf, 95, early_stopping)[0][0][3]  # an eos the beams meet
    expected, scores = _hf_beams(hf, eos, early_stopping)
    cfg = GenerationConfig(
        max_new_tokens=10, temperature=0, num_beams=4, n=2, length_penalty=0.7, early_stopping=early_stopping,
        eos_token_ids=[eos],
    )  # fmt: skip
    got = [s for r in generate_seq2seq(net, SOURCES, cfg) for s in r]
    assert [s.token_ids for s in got] == expected
    assert torch.allclose(torch.tensor([s.score for s in got]), scores, atol=1e-4)
    assert any(s.finish_reason == "stop" for s in got)


def test_sampling_is_seeded_per_sequence(pair: tuple) -> None:
    _, net = pair
    cfg = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=20, n=3, seed=7)
    a = generate_seq2seq(net, SOURCES[:2], cfg)
    b = generate_seq2seq(net, SOURCES[:2], cfg)
    alone = generate_seq2seq(net, SOURCES[1:2], cfg)
    assert [[s.token_ids for s in r] for r in a] == [[s.token_ids for s in r] for r in b]
    assert [s.token_ids for s in a[1]] == [s.token_ids for s in alone[0]]  # not changed by its batch
    assert len({tuple(s.token_ids) for s in a[0]}) > 1  # the n sequences differ
    assert all(len(s.token_ids) == 8 and s.finish_reason == "length" for r in a for s in r)


def test_what_it_cannot_do_is_one_clear_error() -> None:
    decoder = Transformer(ModelConfig.preset("tiny", vocab_size=64, n_layers=1, d_model=32, n_heads=2))
    with pytest.raises(ConfigError, match="arch='encoder-decoder'"):
        generate_seq2seq(decoder, [[1, 2]])
    net = Transformer(ModelConfig.preset("t5-tiny"))
    with pytest.raises(ConfigError, match="stop"):
        generate_seq2seq(net, [[1, 2]], GenerationConfig(stop=["x"]))
    with pytest.raises(ConfigError, match="at least one token"):
        generate_seq2seq(net, [[]])


def test_min_new_tokens_bans_eos_as_transformers_does(pair: tuple) -> None:
    """Plain greedy with min_new_tokens (the benchmark's setting) takes the batched argmax path."""
    hf, net = pair
    eos = _hf_greedy(hf, 12, eos=95)[0][2]  # an eos the first target meets early
    expected = _hf_greedy(hf, 12, eos=eos, min_new_tokens=6)
    got = generate_seq2seq(
        net,
        SOURCES,
        GenerationConfig(max_new_tokens=12, min_new_tokens=6, temperature=0, eos_token_ids=[eos]),
    )
    assert [r[0].token_ids for r in got] == expected
    assert all(len(r[0].token_ids) >= 6 for r in got)


def test_the_transposed_head_follows_in_place_weight_updates() -> None:
    """A decoding step's head (the Transformer's cached copy, under no_grad on CPU) gives the logits
    of the plain head, and is remade after an in-place update."""
    torch.manual_seed(0)
    net = Transformer(ModelConfig.preset("t5-tiny")).eval()
    memory = net.encode(torch.tensor([[5, 6, 7, 1]]))
    for _ in range(2):
        with torch.no_grad():
            a = net.decode(torch.tensor([[0]]), memory, cache=net.new_cache(1, 4))[:, -1]
        # the head's decoding copy: prepacked (a small head, layers.inference_linear) or transposed
        assert {"_head_t", "_head_packed"} & set(net.__dict__.get("_inference_copies", {}))
        b = net.decode(torch.tensor([[0]]), memory, cache=net.new_cache(1, 4))[:, -1]  # autograd: plain
        assert torch.allclose(a, b, atol=1e-5)
        with torch.no_grad():
            net.lm_head.weight.mul_(2.0)  # an optimizer step is in place too


def test_a_copy_head_decodes_as_its_full_forward_in_a_batch() -> None:
    """copy_attention: the engine keeps each row's source ids with its cross keys (rows of different
    source lengths, beams reordering rows), so greedy ids equal argmaxes of full forwards, and beams
    batched equal beams alone."""
    torch.manual_seed(0)
    net = Transformer(ModelConfig.preset("t5-tiny", vocab_size=96, copy_attention=True)).eval()
    greedy = generate_seq2seq(net, SOURCES, GenerationConfig(max_new_tokens=6, temperature=0))
    for source, got in zip(SOURCES, greedy, strict=True):
        ids = [0]
        with torch.no_grad():
            for _ in range(6):
                ids.append(
                    int(net(torch.tensor([source]), decoder_input_ids=torch.tensor([ids]))[0, -1].argmax())
                )
        assert got[0].token_ids == ids[1:]
    copied = {t for r in greedy for t in r[0].token_ids} & {t for s in SOURCES for t in s}
    assert copied  # the copy head acted: source tokens in the outputs
    beams = GenerationConfig(max_new_tokens=5, temperature=0, num_beams=3, n=2)
    batched = generate_seq2seq(net, SOURCES, beams)
    alone = [generate_seq2seq(net, [s], beams)[0] for s in SOURCES]
    assert [[s.token_ids for s in r] for r in batched] == [[s.token_ids for s in r] for r in alone]


def test_relative_positions_take_sources_past_max_seq_len(
    pair: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    # T5's relative bias has no length limit (transformers encodes any length): nor has the engine
    hf, net = pair
    monkeypatch.setattr(net.config, "max_seq_len", 6)
    long = [[*range(10, 21), 1], [*range(30, 38), 1]]  # 12 and 9 tokens: past max_seq_len
    monkeypatch.setattr(f"{__name__}.SOURCES", long)
    cfg = GenerationConfig(max_new_tokens=5, temperature=0, eos_token_ids=[95])
    assert [r[0].token_ids for r in generate_seq2seq(net, long, cfg)] == _hf_greedy(hf, 5, eos=95)
