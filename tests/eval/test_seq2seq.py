"""Seq2seq metrics: the numbers are sacrebleu's and rouge-score's own; the runner scores any predict()."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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


class _ReverseOracle(torch.nn.Module):
    """An encoder-decoder stand-in with the Transformer's interface that always predicts the reversed
    source then eos: greedy decoding must give exactly the reversed texts."""

    def __init__(self, vocab_size: int, eos: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.vocab_size, self.eos = vocab_size, eos
        self.config = SimpleNamespace(decoder_start_token_id=0)
        self.encoded = 0

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.encoded += 1
        return torch.zeros(*input_ids.shape, 4)

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None, memory=None):  # type: ignore[no-untyped-def]
        assert memory is not None and decoder_input_ids[:, 0].eq(0).all()
        B, T = decoder_input_ids.shape
        logits = torch.zeros(B, T, self.vocab_size)
        for b in range(B):
            src = input_ids[b][attention_mask[b].bool()].tolist()
            assert src[-1] == self.eos  # sources end with eos, as in training batches
            want = [*src[-2::-1], self.eos]
            for t in range(T):
                logits[b, t, want[min(t, len(want) - 1)]] = 1.0
        return logits


def test_greedy_seq2seq_and_pair_metrics_with_an_oracle() -> None:
    from lamina.data.synthetic import reverse_pairs, symbol_tokenizer
    from lamina.eval.seq2seq import greedy_seq2seq, pair_metrics

    tok = symbol_tokenizer()
    oracle = _ReverseOracle(len(tok), tok.eos_token_id)
    data = reverse_pairs(10, seed=3)
    assert greedy_seq2seq(oracle, tok, data.sources, max_new_tokens=20) == data.targets
    assert oracle.encoded == 1  # the encoder runs once per batch
    cut = greedy_seq2seq(oracle, tok, ["s1 s2 s3 s4"], max_new_tokens=2)
    assert cut == ["s4 s3"]
    scores = pair_metrics(tok, data, batch_size=4)(oracle)
    assert scores["val_exact_match"] == 1.0 and "val_rougeL" in scores and "val_n" not in scores
