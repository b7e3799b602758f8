"""Seq2seq metrics: the numbers are sacrebleu's and rouge-score's own; the runner scores any predict()."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer

from lamina.data.pairs import PairData
from lamina.errors import ConfigError
from lamina.eval.seq2seq import evaluate_pairs, generation_predictor, score_pairs

PREDS = [
    "The cat sat on the mat.",
    "Return the running totals of the list",
    "",
    "a completely different sentence",
    "Gibt die Länge zurück.",
]
REFS = [
    "The cat sat on the mat.",
    "Return a list of running totals.",
    "Compute the checksum of the data.",
    "Open the file and read it.",
    "Gibt die Länge der Liste zurück.",
]


def _direct(preds: list[str], refs: list[str]) -> dict[str, float]:
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    per = [scorer.score(r, p) for p, r in zip(preds, refs, strict=True)]
    out = {
        "bleu": sacrebleu.corpus_bleu(preds, [refs]).score,
        "chrf": sacrebleu.corpus_chrf(preds, [refs]).score,
    }
    for k in ("rouge1", "rouge2", "rougeL"):
        out[k] = sum(s[k].fmeasure for s in per) / len(per)
    return out


def test_scores_equal_the_reference_libraries_called_directly() -> None:
    got = score_pairs(PREDS, REFS)
    want = _direct(PREDS, REFS)
    for k, v in want.items():
        assert got[k] == v, k  # the very same numbers, not approximately
    assert got["exact_match"] == pytest.approx(1 / 5)
    assert got["n"] == 5
    assert 0 < got["bleu"] < 100 and 0 < got["rougeL"] < 1  # a mixed set: neither floor nor ceiling


def test_perfect_and_empty_predictions() -> None:
    perfect = score_pairs(REFS, REFS)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)
    assert perfect["rougeL"] == pytest.approx(1.0) and perfect["exact_match"] == 1.0
    empty = score_pairs([""] * len(REFS), REFS)
    assert empty["bleu"] == 0.0 and empty["chrf"] == 0.0 and empty["rouge1"] == 0.0
    assert empty["exact_match"] == 0.0
    assert score_pairs([" same "], ["same"])["exact_match"] == 1.0  # surrounding whitespace ignored


def test_unicode_text() -> None:
    preds, refs = (
        ["東京は日本の首都です", "Ελληνικά κείμενα"],
        ["東京は日本の首都です", "Ελληνικά κείμενα εδώ"],
    )
    got = score_pairs(preds, refs)
    want = _direct(preds, refs)
    assert {k: got[k] for k in want} == want
    assert got["chrf"] > 50 and got["exact_match"] == 0.5
    assert got["rougeL"] == 0.0  # rouge-score's default tokenizer keeps [a-z0-9] only, as documented
    uni = score_pairs(preds, refs, rouge_tokenizer="unicode")
    assert uni["rouge1"] == pytest.approx((1.0 + 0.8) / 2)  # 2 of 3 Greek words: F = 2*1*(2/3)/(5/3)


def test_bad_arguments_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="2 predictions but 1 references"):
        score_pairs(["a", "b"], ["a"])
    with pytest.raises(ConfigError, match="no predictions"):
        score_pairs([], [])
    with pytest.raises(ConfigError, match="must be strings"):
        score_pairs([None], ["a"])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="rouge_tokenizer"):
        score_pairs(["a"], ["a"], rouge_tokenizer="x")  # type: ignore[arg-type]


def test_evaluate_pairs_runs_any_predict_over_a_pair_file(tmp_path: Path) -> None:
    path = tmp_path / "test.jsonl"
    rows = [{"src": f"w{i} a b c d", "tgt": f"d c b a w{i}"} for i in range(7)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen: list[int] = []

    def reverse(texts: list[str]) -> list[str]:
        seen.append(len(texts))
        return [" ".join(reversed(t.split())) for t in texts]

    result = evaluate_pairs(reverse, path, source_field="src", target_field="tgt", batch_size=3)
    assert seen == [3, 3, 1]
    assert result.scores["exact_match"] == 1.0 and result.predictions[0] == "d c b a w0"
    assert result.summary().startswith("n=7 bleu=100.00")
    half = evaluate_pairs(lambda t: list(t), PairData(["a b", "c"], ["b a", "c"]), limit=2)
    assert half.scores["exact_match"] == 0.5
    with pytest.raises(ConfigError, match="predict returned 0 texts for 2"):
        evaluate_pairs(lambda t: [], PairData(["a", "b"], ["a", "b"]))


def test_generation_predictor_batches_through_the_engine() -> None:
    from tiny_chat import tiny_lm

    lm = tiny_lm()
    predict = generation_predictor(lm, max_new_tokens=3)
    out = predict(["the cat", "hello world red"])
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    assert out == predict(["the cat", "hello world red"])  # greedy: the same twice
    import lamina

    alone = lamina.generate(lm, "hello world red", chat=False, max_new_tokens=3).strip()
    assert out[1] == alone  # batched decoding gives what one prompt alone gives


def test_generation_predictor_decodes_with_the_config_given_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """``config=`` is every request's decoding as given: its None fields stay None (they were filled from
    the checkpoint's generation.yaml, as generate_batch rebuilt the config from the model's defaults)."""
    from tiny_chat import tiny_lm

    from lamina.config import GenerationConfig
    from lamina.generate import batch

    own = GenerationConfig(temperature=0.7, top_n_sigma=1.0, seed=7, max_new_tokens=2)
    lm = tiny_lm(generation=own)
    config = GenerationConfig(temperature=0.0, max_new_tokens=1, eos_token_ids=own.eos_token_ids)
    used = []

    def spy(*args: Any, **kwargs: Any) -> GenerationConfig:
        used.append(generation_config(*args, **kwargs))
        return used[-1]

    generation_config = batch.generation_config
    monkeypatch.setattr(batch, "generation_config", spy)
    generation_predictor(lm, config=config)(["the cat"])
    assert used == [config]


def test_missing_extra_is_one_line_naming_the_extra() -> None:
    code = (
        "import sys; sys.modules['sacrebleu'] = None\n"
        "from lamina.eval.seq2seq import score_pairs\n"
        "try:\n    score_pairs(['a'], ['a'])\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == (
        "MissingExtraError sacrebleu is not installed; seq2seq metrics need it: pip install 'lamina[seq2seq]'"
    )


@pytest.fixture(scope="module")
def t5() -> tuple[Any, Any]:
    """A tiny random T5 over the reverse task's symbol tokenizer."""
    from lamina.config import ModelConfig
    from lamina.data.synthetic import symbol_tokenizer
    from lamina.model.transformer import Transformer

    torch.manual_seed(0)
    tok = symbol_tokenizer()
    # a large init spreads the logits, so greedy outputs vary (at 0.02 they repeat the start token)
    return Transformer(
        ModelConfig.preset("t5-tiny", vocab_size=len(tok), initializer="normal", init_std=0.5)
    ).eval(), tok


def _plain_greedy(model: Any, ids: list[list[int]], eos: int, n: int) -> list[list[int]]:
    """A reference: one source at a time, the whole decoder prefix every step, no cache."""
    out = []
    with torch.no_grad():
        for src in ids:
            x = torch.tensor([src])
            dec = [model.config.decoder_start_token_id]
            for _ in range(n):
                nxt = int(model(x, decoder_input_ids=torch.tensor([dec]))[0, -1].argmax())
                if nxt == eos:
                    break
                dec.append(nxt)
            out.append(dec[1:])
    return out


def test_seq2seq_predictor_is_greedy_decoding_of_eos_ended_sources(t5: tuple[Any, Any]) -> None:
    from lamina.eval.seq2seq import seq2seq_predictor

    model, tok = t5
    texts = ["s1 s2 s3", "s7", "s0 s19 s4 s4 s4 s5 s6 s8"]
    got = seq2seq_predictor(model, tok, max_new_tokens=6)(texts)
    eos = tok.eos_token_id
    ids = [[*tok.encode(t, add_special_tokens=False), eos] for t in texts]
    want = [tok.decode(o, skip_special_tokens=True).strip() for o in _plain_greedy(model, ids, eos, 6)]
    assert got == want and any(got)
    assert seq2seq_predictor(model, tok, max_source_len=2, max_new_tokens=6)(["s1 s2 s3"]) == [
        tok.decode(_plain_greedy(model, [[ids[0][0], eos]], eos, 6)[0]).strip()
    ]  # a long source is cut to its first tokens and eos, as in training batches
    calls: list[dict[str, Any]] = []
    encode_batch = tok.encode_batch

    def spy(texts: Any, **kw: Any) -> Any:
        calls.append(kw)
        return encode_batch(texts, **kw)

    # the source is user text: a "</s>" in it must stay text, as PairBatches encodes it
    tok.encode_batch = spy
    try:
        seq2seq_predictor(model, tok, max_new_tokens=2)(["s1 </s> s2"])
    finally:
        del tok.encode_batch
    assert calls and all(kw.get("split_special_tokens") is True for kw in calls)


def test_generation_predictor_routes_an_encoder_decoder_to_seq2seq(t5: tuple[Any, Any]) -> None:
    from lamina.checkpoint.load import LoadedModel
    from lamina.checkpoint.registry import ModelEntry
    from lamina.config import GenerationConfig
    from lamina.eval.seq2seq import seq2seq_predictor

    model, tok = t5
    lm = LoadedModel(
        model,
        tok,
        GenerationConfig(eos_token_ids=[tok.eos_token_id]),
        ModelEntry("t5", Path("."), "path", "lamina"),
    )
    texts = ["s1 s2 s3", "s9 s9"]
    assert generation_predictor(lm, max_new_tokens=5)(texts) == seq2seq_predictor(
        model, tok, max_new_tokens=5
    )(texts)


def test_pair_metrics_scores_the_models_outputs(t5: tuple[Any, Any]) -> None:
    from lamina.config import GenerationConfig
    from lamina.data.synthetic import reverse_pairs
    from lamina.eval.seq2seq import pair_metrics, seq2seq_predictor

    model, tok = t5
    data = reverse_pairs(10, seed=3)
    greedy = GenerationConfig(temperature=0.0, max_new_tokens=8)
    got = pair_metrics(tok, data, config=greedy, batch_size=4, limit=6)(model)
    outputs = seq2seq_predictor(model, tok, max_new_tokens=8)(data.sources[:6])
    want = score_pairs(outputs, data.targets[:6])
    assert got == {f"val_{k}": v for k, v in want.items() if k != "n"}
    from lamina.eval.seq2seq import PAIR_METRICS
    from lamina.train.seq2seq import BEST_METRICS

    # what seq2seq.best_metric accepts is what an evaluation has (val_rougeLsum was accepted, never scored)
    assert tuple(got) == PAIR_METRICS and set(BEST_METRICS) == {"val_loss", "val_ppl", *got}


def test_generation_predictor_cuts_sources_at_the_trained_length(t5: tuple[Any, Any], tmp_path: Path) -> None:
    from lamina.checkpoint.load import LoadedModel
    from lamina.checkpoint.registry import ModelEntry
    from lamina.config import GenerationConfig
    from lamina.eval.seq2seq import seq2seq_predictor, trained_source_len

    model, tok = t5
    lm = LoadedModel(model, tok, GenerationConfig(eos_token_ids=[tok.eos_token_id]),
                     ModelEntry("t5", tmp_path, "path", "lamina"))  # fmt: skip
    assert trained_source_len(lm) == model.config.max_seq_len  # no run.yaml: the configured length
    (tmp_path / "run.yaml").write_text("seq2seq:\n  max_source_len: 100000\n")
    assert trained_source_len(lm) == model.config.max_seq_len  # training capped it there
    (tmp_path / "run.yaml").write_text("seq2seq:\n  max_source_len: 3\n")
    assert trained_source_len(lm) == 3
    texts = ["s1 s2 s3 s4 s5", "s9 s9 s8 s7"]
    got = generation_predictor(lm, max_new_tokens=5)(texts)
    assert got == seq2seq_predictor(model, tok, max_source_len=3, max_new_tokens=5)(texts)
    assert got != seq2seq_predictor(model, tok, max_new_tokens=5)(texts)


def test_controls_are_generation_config_fields_checked_up_front(t5: tuple[Any, Any]) -> None:
    """Decoding controls are read through GenerationConfig's fields (a wrong name: one ConfigError naming
    the nearest field, never a TypeError), replace fields of a given config, and are checked when the
    predictor is made, before any text is decoded."""
    from tiny_chat import tiny_lm

    from lamina.checkpoint.load import LoadedModel
    from lamina.checkpoint.registry import ModelEntry
    from lamina.config import GenerationConfig
    from lamina.eval.seq2seq import seq2seq_predictor

    model, tok = t5
    eos = tok.eos_token_id
    long = GenerationConfig(temperature=0.0, max_new_tokens=6, eos_token_ids=[eos])
    short = seq2seq_predictor(model, tok, config=long, max_new_tokens="1")(["s1 s2 s3", "s7"])
    assert short == seq2seq_predictor(model, tok, max_new_tokens=1)(["s1 s2 s3", "s7"])
    assert all(len(t.split()) <= 1 for t in short)  # the control replaced the config's 6 tokens
    with pytest.raises(ConfigError, match=r"unknown GenerationConfig field 'top_pp'.*'top_p'"):
        seq2seq_predictor(model, tok, top_pp=0.5)
    t5_lm = LoadedModel(model, tok, long, ModelEntry("t5", Path("."), "path", "lamina"))
    with pytest.raises(ConfigError, match=r"'num_beam'.*'num_beams'"):
        generation_predictor(t5_lm, num_beam=2)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generation_predictor(t5_lm, max_new_tokens="many")
    with pytest.raises(ConfigError, match=r"'top_pp'.*'top_p'"):
        generation_predictor(tiny_lm(), top_pp=0.5)  # a decoder: refused now, not at the first batch
