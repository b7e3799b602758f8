"""The engine: greedy equals `transformers` on the real SmolLM2 GGUF; per-sequence configs, seeds,
stopping, and finished rows leaving the batch."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lamina.config import GenerationConfig
from lamina.generate.engine import generate_ids, greedy_decode

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "List three primary colors:",
    "Translate to French: Good morning, my friend.",
    "1, 2, 3, 5, 8, 13,",
]
GENERATED = PROMPTS[1:4]  # code, a story, a list


@pytest.mark.slow
@torch.no_grad()
def test_greedy_32_tokens_and_last_logits_equal_transformers(
    lamina_smollm2: Any, hf_smollm2: Any, hf_smollm2_tokenizer: Any
) -> None:
    model, tok = lamina_smollm2.model, lamina_smollm2.tokenizer
    eos = lamina_smollm2.generation.eos_token_ids
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        assert ids == hf_smollm2_tokenizer(prompt)["input_ids"]
        x = torch.tensor([ids])
        ours_last = model(x)[0, -1]
        ref_last = hf_smollm2(x).logits[0, -1]
        assert (ours_last - ref_last).abs().max().item() < 1e-3, prompt
        if prompt not in GENERATED:
            continue  # (32 greedy tokens of both models a prompt: ~4 s; three kinds of text are enough)
        ref = hf_smollm2.generate(
            x, max_new_tokens=32, do_sample=False, eos_token_id=eos, pad_token_id=eos[0]
        )
        ref_new = ref[0, len(ids) :].tolist()
        ref_new = ref_new[: ref_new.index(eos[0])] if eos[0] in ref_new else ref_new
        ours = greedy_decode(model, [ids], 32, eos)[0]
        assert ours == ref_new, f"{prompt!r}: {tok.decode(ours)!r} != {tok.decode(ref_new)!r}"


@pytest.mark.slow
@torch.no_grad()
def test_batched_prompts_of_different_lengths_equal_alone(lamina_smollm2: Any) -> None:
    model, tok = lamina_smollm2.model, lamina_smollm2.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS[:4]]
    batched = greedy_decode(model, prompts, 12)
    for p, out in zip(prompts, batched, strict=True):
        assert out == greedy_decode(model, [p], 12)[0]


def test_empty_prompt_and_overlong_prompt_are_clear_errors(lamina_smollm2: Any) -> None:
    from lamina.errors import ConfigError

    with pytest.raises(ConfigError, match="empty prompt"):
        greedy_decode(lamina_smollm2.model, [[]], 4)
    with pytest.raises(ConfigError, match="max_seq_len"):
        greedy_decode(lamina_smollm2.model, [[1] * 9000], 4)


# -- per-sequence configs, stopping and freed slots ---------------------------------------------------------


def _same_tokens_and_logprobs(got: Any, want: Any) -> None:
    """Each sequence of ``got`` has the tokens of its twin in ``want`` and their logprobs within 1e-5."""
    for a, b in zip(got, want, strict=True):
        assert a.tokens == b.tokens
        assert a.logprobs is not None and b.logprobs is not None
        assert [x.logprob for x in a.logprobs] == pytest.approx([y.logprob for y in b.logprobs], abs=1e-5)


def _first_diff_margin(model: Any, prompt: list[int], a: list[int], b: list[int]) -> float:
    """The reference's top-2 logit margin at the first position where two continuations differ."""
    k = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    logits = model(torch.tensor([prompt + a[:k]]))[0, -1]
    top = logits.topk(2).values
    return float(top[0] - top[1])


@pytest.mark.slow
@torch.no_grad()
def test_seeded_sampling_is_the_same_batched_or_alone(lamina_smollm2: Any) -> None:
    model, tok = lamina_smollm2.model, lamina_smollm2.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS[:3]]
    cfgs = [
        GenerationConfig(temperature=0.8, top_k=40, seed=7, max_new_tokens=12),
        GenerationConfig(temperature=0.0, max_new_tokens=5),  # a greedy neighbour that leaves early
        GenerationConfig(temperature=1.0, top_p=0.9, min_p=0.05, seed=11, max_new_tokens=12, n=2),
    ]
    batched = generate_ids(model, prompts, cfgs)
    assert [s.prompt_index for s in batched] == [0, 1, 2, 2]
    assert len(batched[1].tokens) == 5 and batched[1].finish_reason == "length"
    alone = [generate_ids(model, [prompts[0]], cfgs[0])[0], *generate_ids(model, [prompts[2]], cfgs[2])]
    for got, ref in zip([batched[0], batched[2], batched[3]], alone, strict=True):
        if got.tokens != ref.tokens:  # allowed only where the reference itself is a near tie
            p = prompts[got.prompt_index]
            assert _first_diff_margin(model, p, ref.tokens, got.tokens) < 1e-4, (got.tokens, ref.tokens)
    assert batched[2].tokens != batched[3].tokens  # n=2: two random streams


@torch.no_grad()
def test_stopping_rules_and_finished_rows_leave_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    from lamina.config import ModelConfig
    from lamina.model.layers import KVCache
    from lamina.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("llama-tiny", vocab_size=32, max_seq_len=64)).eval()
    prompts = [[1, 2, 3], [4, 5], [6]]
    free = greedy_decode(model, prompts, 10)
    stop_tok = free[0][3]  # the 4th greedy token of row 0 becomes a stop token for row 0 only
    sizes: list[int] = []
    orig = KVCache.keep

    def spy(self: KVCache, rows: torch.Tensor) -> None:
        orig(self, rows)
        sizes.append(self.batch_size)

    monkeypatch.setattr(KVCache, "keep", spy)
    cfgs = [
        GenerationConfig(temperature=0.0, max_new_tokens=10, stop_token_ids=[stop_tok]),
        GenerationConfig(temperature=0.0, max_new_tokens=2),
        GenerationConfig(temperature=0.0, max_new_tokens=10, ignore_eos=True),
    ]
    out = generate_ids(model, prompts, cfgs, eos_token_ids=[free[2][1]])
    assert out[0].tokens == free[0][: free[0].index(stop_tok)] and out[0].finish_reason == "stop"
    assert out[1].tokens == free[1][:2] and out[1].finish_reason == "length"
    assert out[2].tokens == free[2] and out[2].finish_reason == "length"  # eos ignored
    # rows left as they finished; the last one with the whole cache (the emptied batch drops it)
    assert sizes and sizes[-1] == 1 and sizes == sorted(sizes, reverse=True)


@pytest.mark.slow
def test_stop_strings_across_token_boundaries_and_streaming(lamina_smollm2: Any) -> None:
    import lamina

    lm, tok = lamina_smollm2, lamina_smollm2.tokenizer
    prompt = "Describe the ocean in one sentence."
    free = generate_ids(lm.model, [build(lm, prompt)], GenerationConfig(temperature=0.0, max_new_tokens=24))[
        0
    ]
    pieces = [tok.decode(free.tokens[: k + 1], skip_special_tokens=True) for k in range(len(free.tokens))]
    full = pieces[-1]
    # a stop string made of the end of token 3's text and the start of token 4's
    grow = [len(pieces[0])] + [len(pieces[j]) - len(pieces[j - 1]) for j in range(1, len(pieces))]
    k = next(k for k in range(3, len(pieces) - 1) if grow[k] >= 2 and grow[k + 1] >= 2)
    stop = pieces[k][-2:] + pieces[k + 1][len(pieces[k]) : len(pieces[k]) + 2]
    assert len(stop) >= 3 and stop in full
    cut = full[: full.index(stop)]

    deltas: list[str] = []
    text = lamina.generate(lm, prompt, max_new_tokens=24, stop=[stop], stream=deltas.append)
    assert text == cut and "".join(deltas) == cut
    seq = generate_ids(
        lm.model,
        [build(lm, prompt)],
        GenerationConfig(temperature=0.0, max_new_tokens=24, stop=[stop]),
        tokenizer=tok,
    )[0]
    assert seq.finish_reason == "stop" and seq.stop_str == stop and seq.text == cut
    incl = lamina.generate(lm, prompt, max_new_tokens=24, stop=[stop], include_stop_str_in_output=True)
    assert incl == cut + stop
    # streaming without stop strings gives the same text as without streaming
    deltas.clear()
    assert lamina.generate(lm, prompt, max_new_tokens=24, stream=deltas.append) == "".join(deltas) == full


def build(lm: Any, prompt: str) -> list[int]:
    from lamina.generate.text import build_prompt_ids

    return build_prompt_ids(lm, prompt)


# -- continuous batching, cancellation, logprobs, streaming ---------------------------------------------------


def _tiny_model(vocab: int = 48) -> Any:
    from lamina.config import ModelConfig
    from lamina.model.transformer import Transformer

    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("llama-tiny", vocab_size=vocab, max_seq_len=96)).eval()


@pytest.mark.slow
@torch.no_grad()
def test_requests_join_a_running_batch_and_equal_alone(lamina_smollm2: Any) -> None:
    from lamina.generate.engine import Engine

    model, tok = lamina_smollm2.model, lamina_smollm2.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS[:4]]
    engine = Engine(model, tok, max_batch_size=3)
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=10)
    first = engine.submit(prompts[0], cfg)
    for _ in range(4):  # the first request runs alone for a few steps
        engine.step()
    later = [engine.submit(p, cfg) for p in prompts[1:]]  # a shorter and two longer prompts join
    sizes = []
    while engine.has_work():
        engine.step()
        sizes.append((engine.num_running, engine.num_queued))
    assert max(r for r, _ in sizes) == 3 and sizes[0][1] == 1  # the batch filled up; one request waited
    for p, (seq,) in zip(prompts, [first, *later], strict=True):
        alone = greedy_decode(model, [p], 10)[0]
        assert seq.finish_reason == "length" and seq.text == tok.decode(seq.tokens, skip_special_tokens=True)
        if seq.tokens != alone:
            assert _first_diff_margin(model, p, alone, seq.tokens) < 1e-4, (seq.tokens, alone)


@torch.no_grad()
def test_cancelled_requests_leave_the_batch_and_the_queue() -> None:
    from lamina.generate.engine import Engine

    engine = Engine(_tiny_model(), max_batch_size=2)
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=50, ignore_eos=True)
    a, b, c = (engine.submit([1, 2, 3], cfg) for _ in range(3))
    engine.step()
    assert (engine.num_running, engine.num_queued) == (2, 1)
    engine.cancel(a)
    engine.cancel(c)  # still queued
    deltas = engine.step()
    assert a[0].finish_reason == c[0].finish_reason == "abort" and b[0].finish_reason is None
    assert (engine.num_running, engine.num_queued) == (1, 0)
    assert {id(d.seq) for d in deltas if d.finished} == {id(a[0]), id(c[0])}
    n, m = len(a[0].tokens), len(b[0].tokens)
    engine.step()
    assert len(a[0].tokens) == n and len(b[0].tokens) == m + 1


@torch.no_grad()
def test_logprobs_are_the_raw_log_softmax_of_each_step() -> None:
    model = _tiny_model()
    prompt = [5, 9, 2, 7]
    cfg = GenerationConfig(
        temperature=1.0, seed=3, max_new_tokens=6, logprobs=True, top_logprobs=3, prompt_logprobs=2
    )
    (seq,) = generate_ids(model, [prompt], cfg)
    full = torch.log_softmax(model(torch.tensor([prompt + seq.tokens]))[0].float(), -1)
    assert seq.logprobs is not None and len(seq.logprobs) == len(seq.tokens) == 6
    for i, lp in enumerate(seq.logprobs):
        row = full[len(prompt) - 1 + i]
        assert lp.token == seq.tokens[i]
        assert lp.logprob == pytest.approx(row[lp.token].item(), abs=1e-4)
        assert lp.rank == int((row > row[lp.token]).sum()) + 1
        assert [t for t, _ in lp.top] == row.topk(3).indices.tolist()
    assert seq.prompt_logprobs is not None and seq.prompt_logprobs[0] is None
    for j, plp in enumerate(seq.prompt_logprobs[1:], start=1):
        assert plp is not None and plp.token == prompt[j] and len(plp.top) == 2
        assert plp.logprob == pytest.approx(full[j - 1, prompt[j]].item(), abs=1e-4)


@pytest.mark.slow
def test_stream_deltas_never_split_characters_and_concatenate_to_the_text(lamina_smollm2: Any) -> None:
    from lamina.generate.text import stream_text

    lm = lamina_smollm2
    prompt = "Écris une phrase en français avec des emojis 🌊 et des accents:"
    deltas = list(stream_text(lm, prompt, max_new_tokens=24))
    text = lamina_generate(lm, prompt, max_new_tokens=24)
    assert "".join(deltas) == text and len(deltas) > 3
    assert all("\ufffd" not in d for d in deltas)


def lamina_generate(lm: Any, prompt: str, **kw: Any) -> str:
    import lamina

    return lamina.generate(lm, prompt, **kw)


@torch.no_grad()
def test_a_failing_sequence_finishes_alone_and_the_batch_goes_on() -> None:
    model = _tiny_model()
    doomed = GenerationConfig(
        temperature=0.0, allowed_token_ids=[5], no_repeat_ngram_size=1, max_new_tokens=4
    )
    fine = GenerationConfig(temperature=0.0, max_new_tokens=6, ignore_eos=True)
    bad, good = generate_ids(model, [[1, 2], [3, 4]], [doomed, fine])
    assert bad.finish_reason == "error" and bad.error and bad.tokens == [5]  # every token banned at step 2
    assert good.finish_reason == "length" and good.tokens == greedy_decode(model, [[3, 4]], 6)[0]


@torch.no_grad()
def test_prompt_logprobs_without_new_tokens_and_the_prefill_cap() -> None:
    from lamina.generate.engine import Engine

    model = _tiny_model()
    (seq,) = generate_ids(model, [[3, 1, 4, 1, 5]], GenerationConfig(max_new_tokens=0, prompt_logprobs=1))
    assert seq.tokens == [] and seq.finish_reason == "length"
    assert seq.prompt_logprobs is not None and len(seq.prompt_logprobs) == 5 and seq.prompt_logprobs[1]
    engine = Engine(model, max_batch_size=8, max_prefill_tokens=15)
    for _ in range(3):
        engine.submit(list(range(1, 11)), GenerationConfig(temperature=0.0, max_new_tokens=5))
    engine.step()
    assert (engine.num_running, engine.num_queued) == (1, 2)  # 10 + 10 prompt tokens > 15 per step
    engine.step()
    assert (engine.num_running, engine.num_queued) == (2, 1)


@torch.no_grad()
def test_a_delta_stays_unfinished_once_its_sequence_finishes() -> None:
    # before: Delta.finished read seq.finish_reason when asked, so the admission delta of a step that also
    # decoded the last token counted as finished too (the server's request waited for a delta that never came)
    from lamina.generate.engine import Engine

    engine = Engine(_tiny_model(), max_batch_size=2)
    (seq,) = engine.submit([1, 2, 3], GenerationConfig(temperature=0.0, max_new_tokens=2, ignore_eos=True))
    deltas = engine.step()  # its first token at admission, its second (the last) decoded
    assert [d.seq for d in deltas] == [seq, seq] and seq.finish_reason == "length"
    assert [d.finished for d in deltas] == [False, True]
    (seq,) = engine.submit([1, 2, 3], GenerationConfig(temperature=0.0, max_new_tokens=3, ignore_eos=True))
    first = engine.step()
    assert [d.finished for d in first] == [False, False]
    assert [d.finished for d in engine.step()] == [True] and [d.finished for d in first] == [False, False]


@torch.no_grad()
def test_prompts_prefilled_together_equal_alone() -> None:
    # prompts of different lengths admitted in one step are prefilled together (left-padded, in groups of
    # similar lengths), some after a cached prefix of their own length: each gets its alone output
    from lamina.generate.engine import Engine, _length_groups

    model = _tiny_model()
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=5, ignore_eos=True, logprobs=True)
    shared = [(5 * i) % 40 + 3 for i in range(32)]
    prompts = [
        [4],
        [7, 8, 9],
        [1, 2, 3, 4, 5, 6, 7],
        [*shared, 6],
        [*shared[:16], 9, 9],
        [k % 47 for k in range(1, 60)],
    ]
    alone = [generate_ids(model, [p], cfg)[0] for p in prompts]
    engine = Engine(model, prefix_cache_mib=1.0)
    engine.submit([*shared, 1], cfg)  # stores shared's two blocks
    while engine.has_work():
        engine.step()
    together = [engine.submit(p, cfg)[0] for p in prompts]
    engine.step()
    assert engine.num_running == len(prompts) and engine.prefix_cache is not None
    while engine.has_work():
        engine.step()
    _same_tokens_and_logprobs(alone, together)
    assert _length_groups([1, 3, 7, 2, 59]) == [[0, 3, 1, 2], [4]]


@torch.no_grad()
def test_a_long_prompt_is_prefilled_in_chunks_while_the_batch_decodes() -> None:
    from lamina.generate.engine import Engine

    model = _tiny_model()
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=8, ignore_eos=True, logprobs=True)
    long = [(3 * k) % 47 for k in range(50)]
    alone = [generate_ids(model, [p], cfg)[0] for p in ([5, 6], long)]
    engine = Engine(model, max_prefill_tokens=16, prefix_cache_mib=1.0)
    (short,) = engine.submit([5, 6], cfg)
    engine.step()
    (seq,) = engine.submit(long, cfg)
    for k in range(1, 4):  # 16 + 16 + 16 of its 50 tokens, one chunk per step; the short row goes on
        engine.step()
        assert len(short.tokens) == 2 + k and not seq.tokens and engine.num_queued == 1
    engine.step()  # the last 2 tokens: its first token, then it decodes with the batch
    assert len(seq.tokens) == 2 and engine.num_running == 2
    while engine.has_work():
        engine.step()
    _same_tokens_and_logprobs(alone, [short, seq])
    assert engine.prefix_cache is not None and engine.prefix_cache.num_blocks == 3  # its whole blocks
    again = engine.submit([1, *long], cfg)  # no cached prefix: chunked again, then cancelled midway
    engine.step()
    engine.cancel(again)
    engine.step()
    assert again[0].finish_reason == "abort" and not engine.has_work()


@torch.no_grad()
def test_a_chunked_request_done_at_its_first_token_forgets_its_adapter() -> None:
    # before: only the requests admitted in a step were cleaned up, so a chunked prompt's adapter entry
    # stayed when it finished at its first token (and every later decode took the per-row adapter path)
    from lamina.generate.engine import Engine
    from lamina.model.lora import add_multi_adapter

    model = _tiny_model()
    lin = model.blocks[0].attn.q_proj
    add_multi_adapter(
        model,
        "a",
        {"blocks.0.attn.q_proj": (torch.randn(2, lin.in_features), torch.randn(lin.out_features, 2), 1.0)},
    )
    engine = Engine(model, max_prefill_tokens=16)
    (seq,) = engine.submit(list(range(1, 41)), GenerationConfig(temperature=0.0, max_new_tokens=1), adapter=1)
    engine.step()
    assert not seq.tokens and engine._rid_adapter  # chunked: 16 of its 40 tokens
    while engine.has_work():
        engine.step()
    assert len(seq.tokens) == 1 and engine._rid_adapter == {} and engine._row_adapters() == []


def test_min_new_tokens_bans_only_ids_in_the_vocabulary() -> None:
    from lamina.config import ModelConfig
    from lamina.errors import ConfigError
    from lamina.generate.engine import Engine
    from lamina.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=32)).eval()
    cfg = GenerationConfig(temperature=0, min_new_tokens=3, max_new_tokens=4, eos_token_ids=[64])
    with pytest.raises(ConfigError, match="eos_token_ids names token id 64 outside the model's vocabulary"):
        Engine(model).submit([1, 2, 3], cfg)
    # a row whose bans name an id past the vocabulary (not through submit's check) still decodes
    engine = Engine(model)
    (seq,) = engine.submit([1, 2, 3], GenerationConfig(temperature=0, min_new_tokens=3, max_new_tokens=4))
    engine._queue[0].running[0].min_new_bans[:] = [70]
    while engine.has_work():
        engine.step()
    assert seq.finish_reason == "length" and len(seq.tokens) == 4


def test_kv_cache_grows_no_further_than_its_rows_can_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """``reserve(slots, limit)`` grows by half the capacity, but to at most ``limit`` slots after
    ``length``; growing keeps every row's keys, values and masks, and returns free memory once (not
    per layer), keeping MKL's buffers (the decoding step that grew the cache uses them next)."""
    import lamina.malloc
    from lamina.config import ModelConfig
    from lamina.model.layers import KVCache

    trims: list[bool] = []
    monkeypatch.setattr(lamina.malloc, "trim", lambda mkl=True: trims.append(mkl))

    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=256)
    cache = KVCache(cfg, 2, 8, max_batch_size=2)
    for t in (*cache.k, *cache.v):
        t[:, :, :8] = torch.randn(t.shape)
    cache.valid[:] = True
    cache.length = 8
    kept = [t.clone() for t in (*cache.k, *cache.v)]
    cache.reserve(1, limit=3)
    assert cache.capacity == 11  # not 12 (8 + 8 // 2): no row can use more than 3 more slots
    assert trims == [False]
    for old, new in zip(kept, (*cache.k, *cache.v), strict=True):
        assert torch.equal(new[:, :, :8], old)
    assert bool(cache.valid[:, :8].all()) and not bool(cache.valid[:, 8:].any())
    cache.length = 11
    cache.reserve(1)
    assert cache.capacity == 11 + 11 // 2


@torch.no_grad()
def test_an_emptied_batch_frees_its_kv_cache_before_the_next_batch() -> None:
    """The batch's KV storage goes with its last row: it is not kept until the next request's batch
    storage is made beside it (two caches at once: the server's RSS peak at a wave of new requests)."""
    import gc
    import weakref

    from lamina.generate.engine import Engine

    engine = Engine(_tiny_model(), max_batch_size=4)
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=3, ignore_eos=True)
    for p in ([1, 2, 3], [4, 5]):
        engine.submit(p, cfg)
    engine.step()
    assert engine._cache is not None and engine.num_running == 2
    first = weakref.ref(engine._cache)
    while engine.has_work():
        engine.step()
    gc.collect()
    assert first() is None  # freed when the batch emptied, not when the next batch arrives
    engine.submit([6, 7, 8], cfg)
    engine.step()
    assert engine._cache is not None and engine.num_running == 1


@torch.no_grad()
def test_first_tokens_go_out_before_memory_is_returned_and_mkl_s_buffers_go_with_the_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``step(emit=)`` hands the first tokens on before the prefill's memory goes back (``trim``: not in
    the time to first token); while rows run an admission keeps MKL's buffers (the next decoding
    step's), which go when the decoding row count changes and when the batch empties."""
    from lamina.generate import engine as engine_module
    from lamina.generate.engine import Engine

    events: list[tuple[str, Any]] = []
    monkeypatch.setattr(engine_module, "trim", lambda mkl=True: events.append(("trim", mkl)))
    emit = lambda deltas: events.append(("emit", len(deltas)))  # noqa: E731
    engine = Engine(_tiny_model(), max_batch_size=4)
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=3, ignore_eos=True)
    engine.submit([1, 2, 3], cfg)
    engine.submit([4, 5], cfg)
    engine.step(emit=emit)  # admits two rows, decodes their second tokens
    assert events == [("emit", 2), ("trim", False), ("trim", True)]  # the last: 2 decoding rows, not 0
    engine.submit([6], GenerationConfig(temperature=0.0, max_new_tokens=1))  # done at its first token
    events.clear()
    engine.step(emit=emit)  # the two rows finish: the batch empties
    assert events == [("emit", 1), ("trim", False), ("trim", True)] and not engine.has_work()
    engine.submit([7, 8], GenerationConfig(temperature=0.0, max_new_tokens=1))
    events.clear()
    engine.step(emit=emit)  # no batch: the admission returns everything
    assert events == [("emit", 1), ("trim", True)]


@torch.no_grad()
def test_a_failed_prefill_leaves_the_engine_admitting() -> None:
    """A prefill into the batch's storage whose forward raises (an error, Ctrl-C) leaves no view of the
    storage pending: the engine's next admissions decode what they decode alone, beside the rows that
    ran on, and an engine with no rows keeps no storage."""
    from lamina.generate.engine import Engine

    model = _tiny_model()
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=6, ignore_eos=True, logprobs=True)
    alone = []
    for p in ([1, 2, 3], [4, 5], [6, 7, 8, 9]):
        one = Engine(model)
        alone += one.submit(p, cfg)
        while one.has_work():
            one.step()
    forward = model.forward

    def fail_once(*args: Any, **kw: Any) -> Any:
        del model.forward  # the class's forward again
        raise RuntimeError("out of memory")

    for running in (False, True):
        engine = Engine(model, max_batch_size=4)
        first = engine.submit([1, 2, 3], cfg) if running else []
        if running:
            engine.step()
        engine.submit([9, 9], cfg)
        model.forward = fail_once  # the step's first forward: the admission's prefill
        with pytest.raises(RuntimeError, match="out of memory"):
            engine.step()
        assert engine._view is None and (engine._cache is None) == (not running)
        assert model.forward == forward
        later = engine.submit([4, 5], cfg) + engine.submit([6, 7, 8, 9], cfg)
        while engine.has_work():
            engine.step()
        _same_tokens_and_logprobs(first + later, alone if running else alone[1:])


@torch.no_grad()
def test_padded_shapes_keep_every_rows_output() -> None:
    """Decoding steps run ``batch_rows`` rows and prefills ``prefill_tokens`` tokens per row (a bounded
    set of matmul shapes for the server's memory); the padding changes no real row's tokens or logprobs,
    also for rows that join later in storage rows the padding used (learned positions: a padding row's
    position stays in the table)."""
    from lamina.config import ModelConfig
    from lamina.generate.engine import Engine, batch_rows, prefill_tokens
    from lamina.model.transformer import Transformer

    assert [batch_rows(n, 32) for n in (1, 2, 3, 5, 8, 9, 16, 17, 31)] == [1, 2, 4, 8, 8, 16, 16, 24, 32]
    assert [batch_rows(n, 12) for n in (3, 9, 12, 14)] == [4, 12, 12, 14]
    assert [prefill_tokens(n) for n in (1, 8, 9, 33, 64, 65, 130)] == [8, 8, 16, 64, 64, 128, 192]
    quantized = _tiny_model()
    quantized.weight_format = "int4"  # integer formats decode exact shapes (padding costs them ~1.5x a step)
    # offline generation runs exact shapes unless asked (lamina serve asks: ServeConfig.pad_shapes)
    assert not Engine(_tiny_model()).pad_shapes and Engine(_tiny_model(), pad_shapes=True).pad_shapes
    assert not Engine(quantized, pad_shapes=True).pad_shapes
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=4, ignore_eos=True)
    for pad, storage in ((False, 3), (True, 4)):  # 3 rows: KV storage for 3, or as the steps pad them, 4
        engine = Engine(_tiny_model(), max_batch_size=8, pad_shapes=pad)
        for p in ([1, 2], [3], [4, 5, 6]):
            engine.submit(p, cfg)
        engine.step()
        cache = engine._cache
        assert cache is not None and engine.num_running == 3 and cache.max_batch_size == storage
        k = cache.k[0]  # (rows, n_kv_heads, capacity, head_dim) views of (storage, ...)
        assert engine.cache_bytes == 2 * len(cache.k) * storage * k[0].numel() * k.element_size()
    torch.manual_seed(0)
    gpt = Transformer(ModelConfig.preset("tiny", vocab_size=48, max_seq_len=40)).eval()
    prompts = [[4], [7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [5, 6], [9, 1, 9], [3, 3, 3, 3]]
    budgets = [12, 3, 8, 10, 6, 9]  # rows leave at different steps; later ones join padded storage
    for model in (_tiny_model(), gpt):
        runs: list[list[Any]] = []
        shapes: list[tuple[int, ...]] = []
        hook = model.register_forward_pre_hook(lambda m, args, seen=shapes: seen.append(tuple(args[0].shape)))
        for pad in (False, True):
            engine = Engine(model, max_batch_size=8, pad_shapes=pad)
            seqs = []
            for i, (p, n) in enumerate(zip(prompts, budgets, strict=True)):
                cfg = GenerationConfig(temperature=0.0, max_new_tokens=n, ignore_eos=True, logprobs=True)
                seqs += engine.submit(p, cfg)
                if i in (0, 2, 3):
                    for _ in range(3):
                        engine.step()
            while engine.has_work():
                engine.step()
            runs.append(seqs)
        hook.remove()
        half = len(shapes) // 2  # the padded run's forwards are the second half (same step count)
        assert {b for b, t in shapes[:half] if t == 1} >= {3, 5}  # unpadded decoding batches
        assert {b for b, t in shapes[half:] if t == 1} <= {1, 2, 4, 8}
        assert {t for _, t in shapes[half:] if t > 1} <= {8, 16}
        _same_tokens_and_logprobs(*runs)


@torch.no_grad()
def test_prefills_write_into_the_batch_s_kv_storage() -> None:
    """Prompts admitted beside running rows prefill straight into spare rows of the batch's KV storage
    (no one-off cache made and copied: it was alive beside the batch's storage at the server's RSS
    peak), also when a group's padded rows do not fit beside the running ones (it is prefilled in
    pieces), with rows repeated (n=2) or done at their first token; every row gets the tokens and
    logprobs it gets alone."""
    from unittest import mock

    from lamina.generate.engine import Engine
    from lamina.model.layers import KVCache

    model = _tiny_model()

    def cfg(n: int, k: int = 1) -> GenerationConfig:
        return GenerationConfig(temperature=0.0, max_new_tokens=n, ignore_eos=True, logprobs=True, n=k)

    first = [([1, 2, 3], cfg(9)), ([4, 5], cfg(7)), ([6], cfg(8))]
    later = [([7, 8, 9, 10], cfg(5)), ([11], cfg(1)), ([12, 13], cfg(4)), ([3, 4], cfg(6)), ([5], cfg(3))]
    later.append(([9, 9], cfg(4, 2)))  # waits for rows (8 at most), then joins as two rows
    alone = []
    for p, c in first + later:
        one = Engine(model, max_batch_size=8)
        alone += one.submit(p, c)
        while one.has_work():
            one.step()
    for pad in (False, True):
        engine = Engine(model, max_batch_size=8, pad_shapes=pad)
        seqs = [s for p, c in first for s in engine.submit(p, c)]
        engine.step()
        engine.step()
        assert engine._cache is not None and engine.num_running == 3
        seqs += [s for p, c in later for s in engine.submit(p, c)]
        with mock.patch.object(KVCache, "__init__", side_effect=AssertionError("a one-off cache")):
            engine.step()  # 5 new rows beside 3: padded to 8 they do not fit 8, so in pieces of 4 and 1
        assert engine.num_running == 7 and engine.num_queued == 1  # one left at its first token
        while engine.has_work():
            engine.step()
        _same_tokens_and_logprobs(seqs, alone)
