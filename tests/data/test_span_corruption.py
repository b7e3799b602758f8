"""T5 span corruption: the reference algorithm's masks, statistics and layout, over a prepared corpus."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lamina.data.span_corruption import (
    SpanCorruptionBatches,
    SpanCorruptionConfig,
    corrupt_spans,
    input_and_target_lengths,
    random_spans_noise_mask,
    sentinel_ids,
    with_sentinel_tokens,
)
from lamina.errors import ConfigError, DataError


# -- the reference, transcribed from transformers' examples/flax/language-modeling/run_t5_mlm_flax.py ------
def _reference_mask(length: int, noise_density: float, mean_noise_span_length: float) -> np.ndarray:
    orig_length = length
    num_noise_tokens = int(np.round(length * noise_density))
    num_noise_tokens = min(max(num_noise_tokens, 1), length - 1)
    num_noise_spans = int(np.round(num_noise_tokens / mean_noise_span_length))
    num_noise_spans = max(num_noise_spans, 1)
    num_nonnoise_tokens = length - num_noise_tokens

    def _random_segmentation(num_items: int, num_segments: int) -> np.ndarray:
        mask_indices = np.arange(num_items - 1) < (num_segments - 1)
        np.random.shuffle(mask_indices)
        first_in_segment = np.pad(mask_indices, [[1, 0]])
        segment_id = np.cumsum(first_in_segment)
        _, segment_length = np.unique(segment_id, return_counts=True)
        return segment_length

    noise_span_lengths = _random_segmentation(num_noise_tokens, num_noise_spans)
    nonnoise_span_lengths = _random_segmentation(num_nonnoise_tokens, num_noise_spans)
    interleaved_span_lengths = np.reshape(
        np.stack([nonnoise_span_lengths, noise_span_lengths], axis=1), [num_noise_spans * 2]
    )
    span_starts = np.cumsum(interleaved_span_lengths)[:-1]
    span_start_indicator = np.zeros((length,), dtype=np.int8)
    span_start_indicator[span_starts] = True
    span_num = np.cumsum(span_start_indicator)
    is_noise = np.equal(span_num % 2, 1)
    return is_noise[:orig_length]


def _reference_filter(input_ids: np.ndarray, mask: np.ndarray, vocab_len: int, eos: int) -> np.ndarray:
    """create_sentinel_ids + filter_input_ids (sentinel k = len(tokenizer) - k, k = 1, 2, ...)."""
    mask = mask.astype(np.int8)
    start_indices = mask - np.roll(mask, 1, axis=-1) * mask
    start_indices[:, 0] = mask[:, 0]
    sentinel = np.where(start_indices != 0, np.cumsum(start_indices, axis=-1), start_indices)
    sentinel = np.where(sentinel != 0, (vocab_len - sentinel), 0)
    sentinel -= mask - start_indices
    full = np.where(sentinel != 0, sentinel, input_ids)
    out = full[full >= 0].reshape((input_ids.shape[0], -1))
    return np.concatenate([out, np.full((input_ids.shape[0], 1), eos)], axis=-1)


@pytest.mark.parametrize(
    ("length", "density", "mean"), [(568, 0.15, 3.0), (114, 0.15, 3.0), (50, 0.3, 2.0), (9, 0.5, 1.5)]
)
def test_masks_equal_the_reference_draw_for_draw(length: int, density: float, mean: float) -> None:
    for seed in range(5):
        np.random.seed(seed)
        want = _reference_mask(length, density, mean)
        got = random_spans_noise_mask(length, density, mean, np.random.RandomState(seed))
        assert np.array_equal(got, want)


def test_mask_statistics() -> None:
    rng = np.random.default_rng(0)
    masks = np.stack([random_spans_noise_mask(568, 0.15, 3.0, rng) for _ in range(400)])
    assert (masks.sum(1) == 85).all()  # round(568 * 0.15): every window hides exactly that many
    starts = masks & ~np.roll(masks, 1, axis=1)
    assert (starts.sum(1) == 28).all()  # round(85 / 3) spans in every window
    assert not masks[:, 0].any()  # spans alternate starting with non-noise
    lengths = np.diff(np.flatnonzero(np.diff(np.pad(masks[0].astype(int), 1))))[::2]
    assert lengths.sum() == 85 and len(lengths) == 28 and lengths.min() >= 1
    # uniform over positions: after the first few tokens, every position is noise ~15% of the time
    assert 0.12 < masks[:, 50:].mean() < 0.18
    assert masks[:, 10:].mean(0).std() < 0.05
    assert not np.array_equal(masks[0], masks[1])


def test_lengths_follow_t5s_helper() -> None:
    assert input_and_target_lengths(512) == (568, 114)  # the numbers of T5 and run_t5_mlm_flax.py
    assert input_and_target_lengths(512, 0.5, 3.0)[0] > 512


def test_exact_layout_on_a_fixed_example() -> None:
    tokens = np.arange(10, 20)[None]
    mask = np.array([[0, 0, 1, 1, 0, 0, 0, 0, 1, 1]], dtype=bool)  # the reference's masks end with noise
    inputs, targets = corrupt_spans(tokens, mask, sentinels=[99, 98], eos_token_id=1)
    assert inputs.tolist() == [[10, 11, 99, 14, 15, 16, 17, 98, 1]]
    assert targets.tolist() == [[99, 12, 13, 98, 18, 19, 1]]
    # the reference's layout with sentinels len(tokenizer) - 1, - 2, ... (len 100: 99, 98)
    assert np.array_equal(inputs, _reference_filter(tokens, mask, 100, 1))
    assert np.array_equal(targets, _reference_filter(tokens, ~mask, 100, 1))


def test_reference_layout_on_random_masks() -> None:
    tokens = np.random.default_rng(1).integers(2, 500, size=(4, 568))
    rng = np.random.default_rng(2)
    mask = np.stack([random_spans_noise_mask(568, rng=rng) for _ in range(4)])
    inputs, targets = corrupt_spans(tokens, mask, sentinels=[1000 - 1 - k for k in range(28)], eos_token_id=1)
    assert inputs.shape == (4, 512) and targets.shape == (4, 114)
    assert np.array_equal(inputs, _reference_filter(tokens, mask, 1000, 1))
    assert np.array_equal(targets, _reference_filter(tokens, ~mask, 1000, 1))


def test_sentinels_from_the_tokenizer_or_the_last_ids() -> None:
    from tiny_chat import tiny_tokenizer

    tok = tiny_tokenizer()
    V = len(tok)
    assert sentinel_ids(tok, 3) == [V - 1, V - 2, V - 3]
    assert sentinel_ids(tok, 2, vocab_size=64) == [63, 62]
    t5 = with_sentinel_tokens(tok, n=5)
    assert (
        len(t5) == V + 5 and t5.token_to_id("<extra_id_0>") == V + 4 and t5.token_to_id("<extra_id_4>") == V
    )
    assert sentinel_ids(t5, 2) == [V + 4, V + 3]
    assert with_sentinel_tokens(t5) is t5
    with pytest.raises(DataError, match=r"has 5 sentinel tokens .* need 6"):
        sentinel_ids(t5, 6)
    assert t5.decode([V + 4]) == "<extra_id_0>"


def test_config_validates_itself() -> None:
    with pytest.raises(ConfigError, match="noise_density"):
        SpanCorruptionConfig(noise_density=0.0)
    with pytest.raises(ConfigError, match="mean_noise_span_length"):
        SpanCorruptionConfig(mean_noise_span_length=0.5)
    with pytest.raises(ConfigError, match="input_length"):
        SpanCorruptionConfig(input_length=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder `lamina data prepare` wrote: 60 KB of the built-in corpus, a 400-token BPE."""
    from lamina.data.corpus import DataConfig, prepare

    out = tmp_path_factory.mktemp("sc") / "data"
    prepare(
        DataConfig(builtin="stdlib", max_bytes=60_000, train_tokenizer=400, out=str(out), num_workers=0,
                   val_fraction=0.2),
        progress=False,
    )  # fmt: skip
    return out


def test_batches_over_a_prepared_corpus(corpus: Path) -> None:
    cfg = SpanCorruptionConfig(input_length=64)
    # a model vocabulary above the tokenizer's 400: sentinels 999, 998, ... never occur in the corpus
    sc = SpanCorruptionBatches.open(corpus, "train", batch_size=4, config=cfg, seed=3, vocab_size=1000)
    L, T = input_and_target_lengths(64)
    assert (sc.tokens_length, sc.target_length) == (L, T)
    b = sc.batch(0)
    assert b["input_ids"].shape == (4, 64) and b["labels"].shape == (4, T)
    assert b["attention_mask"].eq(1).all()
    assert torch.equal(b["decoder_input_ids"][:, 1:], b["labels"][:, :-1])
    assert (b["decoder_input_ids"][:, 0] == sc.decoder_start_token_id).all()
    eos = sc.eos_token_id
    assert (b["input_ids"][:, -1] == eos).all() and (b["labels"][:, -1] == eos).all()
    assert sc.sentinels == [999 - k for k in range(len(sc.sentinels))]
    for row in range(4):  # each sentinel once, in order, in the input and in the target
        ins = [t for t in b["input_ids"][row].tolist() if t >= 900]
        outs = [t for t in b["labels"][row].tolist() if t >= 900]
        assert ins == outs == sc.sentinels
    # a pure function of the index; different indexes differ
    again = SpanCorruptionBatches.open(corpus, "train", batch_size=4, config=cfg, seed=3, vocab_size=1000)
    assert all(torch.equal(b[k], again.batch(0)[k]) for k in b)
    assert not torch.equal(sc.batch(1)["input_ids"], b["input_ids"])
    # filling each input sentinel with the tokens after it in the target gives back the window
    ev = next(sc.eval_batches())
    ins, outs = ev["input_ids"][0].tolist()[:-1], ev["labels"][0].tolist()[:-1]
    spans: dict[int, list[int]] = {}
    for t in outs:
        if t >= 900:
            current = spans.setdefault(t, [])
        else:
            current.append(t)
    rebuilt = [x for t in ins for x in (spans[t] if t >= 900 else [t])]
    assert rebuilt == sc.tokens[0:L].tolist()
    assert sum(len(v) for v in spans.values()) == round(L * 0.15)
    assert torch.equal(next(sc.eval_batches())["labels"], ev["labels"])  # the same at every evaluation


def test_too_small_a_split_is_one_line(corpus: Path) -> None:
    with pytest.raises(DataError, match="fewer than one window"):
        SpanCorruptionBatches.open(corpus, "val", 2, SpanCorruptionConfig(input_length=100_000))
