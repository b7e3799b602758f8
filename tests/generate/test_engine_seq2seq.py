"""Encoder-decoders in the engine (lamina/generate/engine.py): a T5 request batched with others (sources of
different lengths, joining at different steps, every decoding control) gives its alone result;
``lamina generate`` and a served ``/v1/completions`` on a tiny T5 folder give the same text; what an
encoder-decoder cannot do is one clear error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lamina.config import GenerationConfig, ModelConfig
from lamina.errors import ConfigError
from lamina.generate.engine import Engine, Sequence_
from lamina.model.transformer import Transformer


@pytest.fixture(scope="module")
def t5() -> tuple[Transformer, Any]:
    """A random t5-tiny (init_std 0.5: greedy targets that vary) over the symbol tokenizer (eos 2)."""
    from lamina.data.synthetic import symbol_tokenizer

    torch.manual_seed(0)
    tok = symbol_tokenizer()
    return Transformer(
        ModelConfig.preset("t5-tiny", vocab_size=len(tok), initializer="normal", init_std=0.5)
    ).eval(), tok


def _requests(tok: Any, stop: str = "s5") -> list[tuple[list[int], GenerationConfig]]:
    """(source ids, config): every kind of request the engine runs, sources of 2 to 12 tokens; the fourth
    stops at the string ``stop``."""
    g = torch.Generator().manual_seed(1)
    eos = tok.eos_token_id

    def src(n: int) -> list[int]:
        return [*torch.randint(4, len(tok), (n - 1,), generator=g).tolist(), eos]

    cfgs = [
        GenerationConfig(temperature=0, max_new_tokens=8, logprobs=True, top_logprobs=2),
        GenerationConfig(temperature=1.2, top_k=10, seed=3, n=2, repetition_penalty=1.3, max_new_tokens=8),
        GenerationConfig(temperature=0, num_beams=3, n=2, length_penalty=0.8, max_new_tokens=8),
        GenerationConfig(temperature=0, stop=[stop], min_new_tokens=2, max_new_tokens=8),
        GenerationConfig(temperature=0, choices=["s1", "s3", "s6"], max_new_tokens=8),
        GenerationConfig(temperature=0.9, seed=5, no_repeat_ngram_size=2, presence_penalty=0.5, max_new_tokens=8),
    ]  # fmt: skip
    return [(src(n), c) for n, c in zip([9, 3, 6, 12, 4, 2], cfgs, strict=True)]


def _view(seqs: list[Sequence_]) -> list[tuple[Any, ...]]:
    return [
        (s.tokens, s.text, s.finish_reason, s.stop_str, s.prompt_tokens,
         None if s.score is None else round(s.score, 4),
         None if s.logprobs is None else [(lp.token, round(lp.logprob, 4), [t for t, _ in lp.top]) for lp in s.logprobs])
        for s in seqs
    ]  # fmt: skip


def _run(engine: Engine, seqs: list[list[Sequence_]]) -> None:
    while engine.has_work():
        engine.step()
    assert all(s.finish_reason in ("stop", "length") for group in seqs for s in group)


def test_requests_batched_and_joining_late_equal_alone(t5: tuple[Transformer, Any]) -> None:
    model, tok = t5
    eos = [tok.eos_token_id]
    probe = _requests(tok)[
        3
    ]  # the stop string: the fourth request's own third greedy token (after min_new_tokens)
    engine = Engine(model, tok, eos)
    seq = engine.submit(probe[0], GenerationConfig(temperature=0, max_new_tokens=8))[0]
    _run(engine, [[seq]])
    stop = tok.decode([seq.tokens[2]]).strip()
    assert stop
    requests = _requests(tok, stop)
    alone = []
    for source, cfg in requests:
        engine = Engine(model, tok, eos)
        seqs = [engine.submit(source, cfg)]
        _run(engine, seqs)
        alone.append(_view(seqs[0]))
    engine = Engine(model, tok, eos, max_batch_size=16)
    batched: list[list[Sequence_]] = []
    for k, (source, cfg) in enumerate(requests):  # join at steps 0, 0, 1, 3, 3, 5: the cache pads cross keys
        batched.append(engine.submit(source, cfg))
        if k in (1, 2, 4):
            for _ in range(k - 1 if k > 1 else 1):
                engine.step()
    _run(engine, batched)
    assert [_view(s) for s in batched] == alone
    # the controls acted: the stop string cut, the choice is one of the choices, beams are distinct
    assert (batched[3][0].stop_str, batched[3][0].finish_reason) == (stop, "stop")
    assert batched[4][0].text in ("s1", "s3", "s6")
    assert batched[2][0].tokens != batched[2][1].tokens and batched[2][0].score is not None
    assert len({tuple(s.tokens) for s in batched[1]}) == 2
    assert {len(set(s.tokens)) for s in batched[0]} != {1}  # not one repeated token: a real test
    assert batched[0][0].prompt_tokens == 9  # the source's tokens


def test_generate_seq2seq_is_the_engine(t5: tuple[Transformer, Any]) -> None:
    from lamina.generate.seq2seq import generate_seq2seq

    model, tok = t5
    requests = _requests(tok)[:3]
    for source, cfg in requests:
        cfg.eos_token_ids = [tok.eos_token_id]
        engine = Engine(model, tok, cfg.eos_token_ids)
        seqs = engine.submit(source, cfg)
        _run(engine, [seqs])
        got = generate_seq2seq(model, [source], cfg, tok)[0]
        assert [(g.token_ids, g.text) for g in got] == [(s.tokens, s.text) for s in seqs]


@pytest.fixture(scope="module")
def t5_folder(t5: tuple[Transformer, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    import lamina

    model, tok = t5
    gen = GenerationConfig(eos_token_ids=[tok.eos_token_id], max_new_tokens=7)
    return lamina.save_checkpoint(tmp_path_factory.mktemp("t5") / "t5", model, tok, gen)


@pytest.mark.slow
def test_cli_generate_and_served_completion_give_the_same_text(
    t5_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fastapi.testclient import TestClient

    import lamina
    from lamina.cli.main import main
    from lamina.serve import Registry, ServeConfig, create_app

    source = "s3 s1 s4 s1 s5"
    assert main(["generate", str(t5_folder), source, "--max-new-tokens", "6", "--quiet"]) == 0
    text = capsys.readouterr().out.rstrip("\n")
    assert text and text == lamina.generate(str(t5_folder), source, max_new_tokens=6)
    registry = Registry(ServeConfig(timeout=60.0))
    registry.add("t5", lamina.load(str(t5_folder)))
    with TestClient(create_app(registry)) as client:
        body = {"model": "t5", "prompt": source, "max_tokens": 6, "temperature": 0}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["choices"][0]["text"] == text
        assert out["usage"]["prompt_tokens"] == 6  # five symbols and eos
        r = client.post("/v1/completions", json={**body, "stream": True})
        events = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
        assert "".join(e["choices"][0]["text"] for e in events) == text
        r = client.post(
            "/v1/chat/completions", json={"model": "t5", "messages": [{"role": "user", "content": "s1"}]}
        )
        assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]


def test_what_an_encoder_decoder_cannot_do_is_one_clear_error(t5: tuple[Transformer, Any]) -> None:
    from lamina.checkpoint.load import LoadedModel
    from lamina.checkpoint.registry import ModelEntry
    from lamina.generate.chat import chat_loop

    model, tok = t5
    lm = LoadedModel(model, tok, GenerationConfig(), ModelEntry("t5", Path("t5"), "path", "lamina"))
    with pytest.raises(
        ConfigError, match="has no chat template; `lamina generate t5 PROMPT` maps one source"
    ):
        chat_loop(lm, lambda: None, print)
    with pytest.raises(ConfigError, match="prompt_logprobs"):
        Engine(model, tok).submit([5, 2], GenerationConfig(prompt_logprobs=1))
    with pytest.raises(ConfigError, match="draft"):
        Engine(model, tok, draft=model)
    Engine(model, tok).submit([5] * (model.config.max_seq_len + 1))  # relative positions: no source limit
    torch.manual_seed(0)  # sinusoidal (or learned) positions end at max_seq_len
    base = Transformer(ModelConfig.preset("transformer-base", vocab_size=len(tok), n_layers=1, d_model=16,
                                          n_heads=2, d_ff=32, max_seq_len=8)).eval()  # fmt: skip
    Engine(base, tok).submit([5] * 8)
    with pytest.raises(ConfigError, match="source of 9 tokens does not fit the encoder's context window"):
        Engine(base, tok).submit([5] * 9)


def test_admission_counts_the_copy_heads_cache() -> None:
    # a copy_attention row also keeps its source's copy keys, encoder output and ids: t5-tiny (2 decoder
    # layers, d_model 64) 1 + 520/1024 decoder tokens per source token, so a 10-token source costs 16
    from lamina.generate.engine import source_token_cost

    def admitted(copy: bool) -> int:
        torch.manual_seed(0)
        cfg = ModelConfig.preset("t5-tiny", vocab_size=32, copy_attention=copy)
        engine = Engine(Transformer(cfg).eval(), max_tokens_in_flight=30)
        for _ in range(2):  # each needs 1 start + 10 source + 4 new tokens = 15 without the copy head
            engine.submit([5] * 10, GenerationConfig(temperature=0, max_new_tokens=4))
        return len(engine._admissible(10**6))

    copying = ModelConfig.preset("t5-tiny", copy_attention=True)
    assert source_token_cost(copying, torch.float32) == 1 + 520 / 1024
    assert admitted(copy=False) == 2 and admitted(copy=True) == 1  # 15 + 15 <= 30 < 21 + 21
