"""Fine-tuning task heads: a small encoder learns a label that depends on word order (which sentiment
word a "not" negates), which a bag-of-words model cannot; tags that depend on the word before (token
classification), a count (regression) and whether two texts agree (sentence pairs); frozen layers stay
bit-identical; bad data is one clear line."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from interrupting import assert_same_weights, interrupt_and_resume, losses  # tests/train/interrupting.py

from lamina.checkpoint.lamina import load_checkpoint
from lamina.cli.main import main
from lamina.data.labeled import IGNORE, LabeledBatches, LabeledData, TaggedBatches, TaggedData
from lamina.errors import ConfigError, DataError
from lamina.tokenizer import Tokenizer
from lamina.train.finetune import FinetuneRun, classification_metrics, entity_f1, finetune

POS = ["good", "great", "fine", "nice", "superb", "lovely"]
NEG = ["bad", "awful", "poor", "dull", "boring", "weak"]
SUBJECTS = ["the film", "this movie", "the show", "our trip", "the meal", "that book"]


def _rows(n: int, seed: int) -> list[dict[str, str]]:
    """Each text holds one positive and one negative word, in either order, and one "not" before one of
    them: the label is positive iff the "not" negates the negative word. The bag of words of a positive
    text equals that of a negative one, so only word order tells them apart."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p, q = rng.choice(POS), rng.choice(NEG)
        negate_pos = rng.random() < 0.5
        a, b = (f"not {p}", q) if negate_pos else (p, f"not {q}")
        if rng.random() < 0.5:
            a, b = b, a
        text = f"{rng.choice(SUBJECTS)} was {a} and {b}"
        rows.append({"text": text, "label": "negative" if negate_pos else "positive"})
    return rows


def _write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    return path


def _bag_of_words_accuracy(train: list[dict[str, str]], test: list[dict[str, str]]) -> float:
    """Held-out accuracy of a logistic regression on word counts."""
    vocab = {w: i for i, w in enumerate(sorted({w for r in train + test for w in r["text"].split()}))}

    def feats(rows: list[dict[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.zeros(len(rows), len(vocab))
        for i, r in enumerate(rows):
            for w in r["text"].split():
                x[i, vocab[w]] += 1
        return x, torch.tensor([float(r["label"] == "positive") for r in rows])

    (x, y), (xt, yt) = feats(train), feats(test)
    lin = torch.nn.Linear(len(vocab), 1)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(lin(x).squeeze(1), y)
        loss = loss + 1e-4 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return float(((lin(xt).squeeze(1) > 0).float() == yt).float().mean())


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sentiment")
    train, test = _rows(1600, 0), _rows(400, 1)
    tok = Tokenizer.train([r["text"] for r in train], vocab_size=300, special_tokens=["<|pad|>", "<|cls|>"],
                          show_progress=False)  # fmt: skip
    tok.save(d / "tok")
    return {
        "train": _write_csv(d / "train.csv", train),
        "test": _write_csv(d / "test.csv", test),
        "tok": d / "tok",
    }


def _flags(task: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "finetune", "--task", "classify", "--data", str(task["train"]), "--task.val_data", str(task["test"]),
        "--task.tokenizer", str(task["tok"]), "--task.max_seq_len", "16",
        "--model.preset", "minilm-l6", "--model.vocab_size", "320", "--model.n_layers", "2",
        "--model.d_model", "64", "--model.n_heads", "4", "--model.d_ff", "128", "--model.max_seq_len", "16",
        "--train.out_dir", str(out), "--train.batch_size", "32", "--train.lr", "2e-3",
        "--train.warmup_steps", "10", "--train.progress", "false", "--train.log_every", "10", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_resume_is_exact(task: dict[str, Path], tmp_path: Path) -> None:
    """SIGTERM (what torchrun and schedulers send) mid-run: the step is saved, the exit code is 143, the
    printed `lamina finetune ... --resume` ends with the uninterrupted weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    extra = ["--train.max_steps", "60", "--train.dropout", "0.1"]
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-m", "lamina", *_flags(task, ref, *extra)], env=env, check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lamina", *_flags(task, out, *extra, "--train.log_every", "1")]
    interrupt_and_resume(cmd, out, signal.SIGTERM, env)
    assert_same_weights(out / "last", ref / "last")
    assert losses(out)[-1] == losses(ref)[-1]


def test_bag_of_words_cannot_solve_the_task(task: dict[str, Path]) -> None:
    with open(task["train"]) as f, open(task["test"]) as g:
        train, test = list(csv.DictReader(f)), list(csv.DictReader(g))
    assert _bag_of_words_accuracy(train, test) <= 0.70


@pytest.mark.slow
def test_small_encoder_learns_word_order(task: dict[str, Path], tmp_path: Path) -> None:
    assert main(_flags(task, tmp_path / "out", "--train.epochs", "6")) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "accuracy" in r]
    assert len(evals) == 6 and all("f1" in r for r in evals)  # one evaluation per epoch
    assert evals[-1]["accuracy"] > 0.95, evals
    model, _ = load_checkpoint(tmp_path / "out" / "last")
    assert model.config.head == "classify" and model.config.labels == ["negative", "positive"]


def test_frozen_layers_stay_bit_identical(task: dict[str, Path], tmp_path: Path) -> None:
    run = FinetuneRun.from_dict(
        {
            "task": {"data": str(task["train"]), "val_data": str(task["test"]), "tokenizer": str(task["tok"]),
                     "max_seq_len": 16},
            "model": {"preset": "minilm-l6", "vocab_size": 320, "n_layers": 2, "d_model": 32, "n_heads": 4,
                      "d_ff": 64, "max_seq_len": 16},
            "train": {"out_dir": str(tmp_path / "out"), "max_steps": 8, "batch_size": 16, "lr": 1e-2,
                      "progress": False, "freeze": ["0", "tok_emb.*", "*.mlp_norm.*"]},
        }
    )  # fmt: skip
    torch.manual_seed(run.train.seed)
    from lamina.train.finetune import base_model, with_task_head

    base, _ = base_model(run)
    before = {k: v.clone() for k, v in with_task_head(base, "classify", ["a", "b"]).state_dict().items()}
    model, _, _ = finetune(run)
    after = model.state_dict()
    frozen = [k for k in after if k.startswith(("blocks.0.", "tok_emb.")) or ".mlp_norm." in k]
    assert "blocks.1.mlp_norm.weight" in frozen and "blocks.0.attn.q_proj.weight" in frozen
    for k in frozen:
        assert torch.equal(after[k], before[k]), k
    assert not torch.equal(after["blocks.1.attn.q_proj.weight"], before["blocks.1.attn.q_proj.weight"])
    with pytest.raises(ConfigError, match=r"block indices must be in 0\.\.1"):
        finetune(FinetuneRun.from_dict({**run.to_dict(), "model": {"preset": "minilm-l6", "vocab_size": 320,
                 "n_layers": 2, "d_model": 32, "n_heads": 4, "max_seq_len": 16},
                 "train": {"max_steps": 1, "freeze": ["5"], "progress": False, "out_dir": str(tmp_path / "o2")}}))  # fmt: skip


def test_init_and_model_missing_or_both_name_the_flags() -> None:
    # before: "give exactly one of init ... and model ..." named YAML keys only, and not which case it was
    with pytest.raises(ConfigError, match=r"--init smollm2.*--model\.preset tiny\); got neither$"):
        FinetuneRun.from_dict({})
    with pytest.raises(ConfigError, match=r"got both$"):
        FinetuneRun.from_dict({"init": "smollm2", "model": {"preset": "tiny"}})


def test_metrics_accuracy_and_macro_f1() -> None:
    m = classification_metrics(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1]), 2)
    assert m["accuracy"] == 0.75 and abs(m["f1"] - (2 / 3 + 0.8) / 2) < 1e-9


def test_missing_column_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "d.jsonl").write_text(json.dumps({"sentence": "hi", "label": 1}) + "\n")
    assert main(["finetune", "--data", str(tmp_path / "d.jsonl"), "--init", "minilm"]) == 1
    err = capsys.readouterr().err
    assert "no column 'text'" in err and "sentence" in err and len(err.strip().splitlines()) == 1


# -- token classification, regression, sentence pairs: a 2-layer encoder built from scratch


def _write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _encoder_flags(task: str, data: dict[str, Path], out: Path, steps: int, *extra: str) -> list[str]:
    """A short run of a tiny encoder (vocabulary 340, d_model 64) at a high learning rate."""
    return [
        "finetune", "--task", task, "--data", str(data["train"]), "--task.val_data", str(data["test"]),
        "--task.tokenizer", str(data["tok"]), "--task.max_seq_len", "32",
        "--model.preset", "minilm-l6", "--model.vocab_size", "340", "--model.n_layers", "2",
        "--model.d_model", "64", "--model.n_heads", "4", "--model.d_ff", "128", "--model.max_seq_len", "32",
        "--train.out_dir", str(out), "--train.max_steps", str(steps), "--train.batch_size", "32",
        "--train.lr", "5e-3", "--train.warmup_steps", "10", "--train.progress", "false", *extra,
    ]  # fmt: skip


def _evals(out: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val_loss" in r]


NAMES = ["jordan", "paris", "austin", "florence", "chelsea", "victoria", "sydney", "dallas"]
SURNAMES = ["smith", "jones", "brown", "lee"]
PERSON_CUES, PLACE_CUES = ["mr", "ms", "dr"], ["in", "to", "from"]
LINKS = ["and", "then", "we saw", "they met", "with"]


def _tagged_rows(n: int, seed: int) -> list[dict[str, list[str]]]:
    """Sentences of one to three mentions of names that are people or places ("jordan", "paris", ...):
    a name is a person (B-PER) after "mr"/"ms"/"dr", a place (B-LOC) after "in"/"to"/"from" and no
    entity (O) without either; a surname after a person's name continues it (I-PER). A name's tag is
    the word before it's to tell."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words: list[str] = []
        tags: list[str] = []
        for m in range(rng.randint(1, 3)):
            if m:
                link = rng.choice(LINKS).split()
                words += link
                tags += ["O"] * len(link)
            name, kind = rng.choice(NAMES), rng.randrange(3)
            if kind == 0:
                words += [rng.choice(PERSON_CUES), name]
                tags += ["O", "B-PER"]
                if rng.random() < 0.5:
                    words.append(rng.choice(SURNAMES))
                    tags.append("I-PER")
            elif kind == 1:
                words += [rng.choice(PLACE_CUES), name]
                tags += ["O", "B-LOC"]
            else:
                words.append(name)
                tags.append("O")
        rows.append({"tokens": words, "tags": tags})
    return rows


@pytest.fixture(scope="module")
def tagging(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tagging")
    train, test = _tagged_rows(800, 0), _tagged_rows(300, 1)
    texts = [" ".join(r["tokens"]) for r in train]
    # a small vocabulary: most names are cut into subwords, only the first of which is labelled
    tok = Tokenizer.train(texts, vocab_size=340, special_tokens=["<|pad|>"], show_progress=False)
    tok.save(d / "tok")
    return {"train": _write_jsonl(d / "train.jsonl", train), "test": _write_jsonl(d / "test.jsonl", test),
            "tok": d / "tok"}  # fmt: skip


def test_tags_need_context(tagging: dict[str, Path]) -> None:
    """Tagging each word with its most frequent tag (no context) is far from the encoder's > 95%."""
    train, test = ([json.loads(x) for x in tagging[k].read_text().splitlines()] for k in ("train", "test"))
    counts: dict[str, dict[str, int]] = {}
    for r in train:
        for w, t in zip(r["tokens"], r["tags"], strict=True):
            counts.setdefault(w, {}).setdefault(t, 0)
            counts[w][t] += 1
    pairs = [(w, t) for r in test for w, t in zip(r["tokens"], r["tags"], strict=True)]
    accuracy = sum(max(counts[w], key=counts[w].__getitem__) == t for w, t in pairs) / len(pairs)
    assert accuracy < 0.85, accuracy


@pytest.mark.slow
def test_small_encoder_learns_tags_from_context(tagging: dict[str, Path], tmp_path: Path) -> None:
    # RoPE: a relative position ("the word before") is learnt in far fewer steps than with learned
    # absolute positions
    flags = _encoder_flags("token_classify", tagging, tmp_path / "out", 80, "--model.pos_encoding", "rope")
    assert main(flags) == 0
    evals = _evals(tmp_path / "out")
    assert len(evals) == 4 and all({"accuracy", "f1", "entity_f1"} <= set(r) for r in evals)  # every epoch
    assert evals[-1]["accuracy"] > 0.95 and evals[-1]["f1"] > 0.9 and evals[-1]["entity_f1"] > 0.9, evals
    model, _ = load_checkpoint(tmp_path / "out" / "last")
    assert model.config.head == "token_classify" and model.config.labels == ["B-LOC", "B-PER", "I-PER", "O"]


def test_tags_go_to_first_subwords_as_in_transformers() -> None:
    """WordPiece with [CLS]/[SEP]: the labels equal those of transformers' token-classification recipe
    (``is_split_into_words``, the tag at each word's first subword, -100 elsewhere)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Backend(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.train_from_iterator(
        [" ".join(r["tokens"]) for r in _tagged_rows(200, 0)],
        trainers.WordPieceTrainer(vocab_size=60, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]),
    )
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    assert cls is not None and sep is not None
    backend.post_processor = processors.BertProcessing(("[SEP]", sep), ("[CLS]", cls))
    tok, hf = Tokenizer(backend, pad_token="[PAD]"), PreTrainedTokenizerFast(tokenizer_object=backend)
    words = [["Mr", "Jordan", "Smith", "met", "Ms", "Victoria", "in", "Paris,", "U.S."], ["dallas"]]
    tags = [[0, 1, 2, 0, 0, 1, 0, 3, 3], [3]]
    data = TaggedData(words, [[str(t) for t in row] for row in tags])
    got = TaggedBatches(tok, data, tags, batch_size=2, max_seq_len=64)
    for k in range(2):
        word_ids = hf(words[k], is_split_into_words=True).word_ids()
        expected = [
            IGNORE if w is None or w == prev else tags[k][w]
            for prev, w in zip([None, *word_ids[:-1]], word_ids, strict=True)
        ]
        assert got.token_labels[k] == expected
    assert sum(y != IGNORE for y in got.token_labels[0]) == 9 and len(got.ids[0]) > 11  # words split
    assert got.truncated == 0
    cut = TaggedBatches(tok, data, tags, batch_size=2, max_seq_len=6)
    assert len(cut.ids[0]) == 6 and cut.token_labels[0][0] == cut.token_labels[0][-1] == IGNORE  # [CLS] [SEP]
    assert cut.truncated == sum(len(ids) > 6 for ids in got.ids) >= 1  # every cut sentence is counted
    message = rf"{cut.truncated} of 2 sentences are longer than max_seq_len=6 tokens \(first: row 1, "
    with pytest.raises(DataError, match=message):
        TaggedBatches(tok, data, tags, batch_size=2, max_seq_len=6, truncate=False)
    b = cut.batch(0)
    assert b["labels"].shape == b["input_ids"].shape
    assert (b["labels"][b["attention_mask"] == 0] == IGNORE).all()


def test_byte_level_tags_keep_running_text_tokens(tagging: dict[str, Path]) -> None:
    """A byte-level tokenizer reads the words as running text ("Ġjones", with its space), and a word's
    tag lands on its first token that holds a letter of it (a lone "Ġ" holds none)."""
    tok = Tokenizer.from_file(tagging["tok"])
    words = ["dr", "florence", "jones", "in", "victoria", "then", "xq"]
    tags = [0, 1, 2, 0, 3, 0, 0]
    got = TaggedBatches(tok, TaggedData([words], [[str(t) for t in tags]]), [tags], 1, 32)
    text = " ".join(words)
    assert got.ids[0] == tok.encode(text)
    pieces = tok.backend.encode(text).tokens
    firsts = [
        j for j, p in enumerate(pieces) if p != "Ġ" and (j == 0 or p.startswith("Ġ") or pieces[j - 1] == "Ġ")
    ]
    assert len(firsts) == len(words) and len(pieces) > len(words)  # some words are split
    assert got.token_labels[0] == [
        tags[firsts.index(j)] if j in firsts else IGNORE for j in range(len(pieces))
    ]


def test_entity_f1_as_seqeval() -> None:
    true = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    assert entity_f1(true, pred) == 0.5  # seqeval's README example
    assert entity_f1([["I-PER", "I-PER", "B-LOC"]], [["B-PER", "I-PER", "I-LOC"]]) == 1.0  # stray I- opens
    assert entity_f1([["B-PER", "I-PER"]], [["B-PER", "I-LOC"]]) == 0.0


def test_bad_tagged_data_is_one_clear_line(
    tagging: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def error(rows: list[dict[str, Any]], *extra: str, name: str = "bad.jsonl") -> str:
        data = {**tagging, "train": _write_jsonl(tmp_path / name, rows)}
        assert main(_encoder_flags("token_classify", data, tmp_path / "out", 1, *extra)) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    good = {"tokens": ["mr", "jordan"], "tags": ["O", "B-PER"]}
    assert "bad.jsonl:2 has 2 tokens but 1 tags" in error([good, {"tokens": ["in", "paris"], "tags": ["O"]}])
    assert "'tags' must be a list" in error([good, {"tokens": ["in", "paris"], "tags": "O O"}])
    assert "bad.jsonl:1 has no 'tokens' or no 'tags' (it has words, ner_tags)" in error(
        [{"words": ["x"], "ner_tags": [0]}]
    )
    assert "must be a .jsonl file" in error([good], name="bad.csv")
    err = error(
        [good, {"tokens": ["in", "paris"], "tags": ["O", "B-LOC"]}], "--task.labels", "[O, B-PER, I-PER]"
    )
    assert "bad.jsonl:2: label 'B-LOC' is not one of task.labels ['O', 'B-PER', 'I-PER']" in err


WORDS = ["cat", "dog", "bird", "fish", "cow", "hen", "fox", "owl", "ant", "bee"]
COLORS = ["red", "green", "blue"]


def _count_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Eight words, zero to four of them "apple": the label is the count of "apple" / 4."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        c = rng.randint(0, 4)
        words = ["apple"] * c + [rng.choice(WORDS) for _ in range(8 - c)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": c / 4})
    return rows


def _pair_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Two short texts that each start with a colour: "same" when the colours agree."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a = [rng.choice(COLORS)] + [rng.choice(WORDS) for _ in range(rng.randint(0, 2))]
        same = rng.random() < 0.5
        first = a[0] if same else rng.choice([c for c in COLORS if c != a[0]])
        b = [first] + [rng.choice(WORDS) for _ in range(rng.randint(0, 2))]
        rows.append({"text": " ".join(a), "text_pair": " ".join(b), "label": "same" if same else "different"})
    return rows


@pytest.fixture(scope="module")
def sequences(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    d = tmp_path_factory.mktemp("sequences")
    count, pairs = (_count_rows(800, 0), _count_rows(300, 1)), (_pair_rows(800, 0), _pair_rows(300, 1))
    texts = [str(r["text"]) for r in count[0]] + [r[k] for r in pairs[0] for k in ("text", "text_pair")]
    Tokenizer.train(texts, vocab_size=340, special_tokens=["<|pad|>"], show_progress=False).save(d / "tok")
    return {
        name: {"train": _write_jsonl(d / f"{name}-train.jsonl", train),
               "test": _write_jsonl(d / f"{name}-test.jsonl", test), "tok": d / "tok"}
        for name, (train, test) in (("count", count), ("pairs", pairs))
    }  # fmt: skip


@pytest.mark.slow
def test_small_encoder_regresses_a_count(sequences: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    data = sequences["count"]
    assert main(_encoder_flags("regress", data, tmp_path / "out", 60)) == 0
    train, test = (
        [json.loads(x)["label"] for x in data[k].read_text().splitlines()] for k in ("train", "test")
    )
    mean = sum(train) / len(train)
    baseline = sum((y - mean) ** 2 for y in test) / len(test)  # MSE of predicting the training mean
    evals = _evals(tmp_path / "out")
    assert evals[-1]["mse"] <= 0.25 * baseline, (evals, baseline)
    model, _ = load_checkpoint(tmp_path / "out" / "last")
    assert model.config.head == "regress" and model.config.n_labels == 1


@pytest.mark.slow
def test_small_encoder_classifies_sentence_pairs(
    sequences: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    flags = _encoder_flags(
        "classify", sequences["pairs"], tmp_path / "out", 80, "--task.pair_field", "text_pair"
    )
    assert main(flags) == 0
    evals = _evals(tmp_path / "out")
    assert evals[-1]["accuracy"] > 0.9, evals
    model, _ = load_checkpoint(tmp_path / "out" / "last")
    assert model.config.labels == ["different", "same"] and model.type_emb is not None


@pytest.mark.parametrize("kind", ["classify", "regress", "token_classify"])
def test_task_heads_report_no_perplexity(
    kind: str,
    task: dict[str, Path],
    tagging: dict[str, Path],
    sequences: dict[str, dict[str, Path]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """exp(loss) means something for a per-token cross-entropy only: not in the logs, bar or metrics."""
    if kind == "classify":
        flags = _flags(task, tmp_path / "out", "--train.max_steps", "2")
    else:
        data = sequences["count"] if kind == "regress" else tagging
        flags = _encoder_flags(kind, data, tmp_path / "out", 2)
    assert main(flags) == 0
    printed = capsys.readouterr()
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in rows) and not any("val_ppl" in r for r in rows), rows
    assert "val loss" in printed.out + printed.err
    assert "perplexity" not in (printed.out + printed.err).lower() and "ppl" not in printed.out + printed.err


def test_every_truncated_text_is_counted_or_refused(task: dict[str, Path]) -> None:
    tok = Tokenizer.from_file(task["tok"])
    texts = ["the film was good", "the film was not good and not bad and dull and weak", "x"]
    data = LabeledData(texts, ["a", "b", "a"], where=[f"f.csv row {i}" for i in (2, 3, 4)])
    lengths = [len(tok.encode(t)) for t in texts]
    limit = lengths[1] - 1  # only the second text is too long
    assert max(lengths[0], lengths[2]) <= limit
    b = LabeledBatches(tok, data, torch.tensor([0, 1, 0]), batch_size=2, max_seq_len=limit)
    assert b.truncated == 1 and max(len(ids) for ids in b.ids) == limit
    with pytest.raises(
        DataError,
        match=rf"1 of 3 texts are longer than max_seq_len={limit} tokens \(first: f.csv row 3, {lengths[1]} tokens\)",
    ):
        LabeledBatches(tok, data, torch.tensor([0, 1, 0]), batch_size=2, max_seq_len=limit, truncate=False)
    pairs = LabeledData(texts, ["a", "b", "a"], pairs=texts)
    assert LabeledBatches(tok, pairs, torch.tensor([0, 1, 0]), 2, max_seq_len=2 * limit).truncated == 1


def test_finetune_counts_truncations_in_metrics_and_summary(
    task: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = _flags(task, tmp_path / "out", "--train.max_steps", "2", "--task.max_seq_len", "8")
    assert main(flags) == 0
    printed = capsys.readouterr()
    err = printed.err
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    counts = rows[0]
    assert counts["step"] == 0 and counts["train_rows"] == 1600 and counts["val_rows"] == 400
    assert (
        counts["max_seq_len"] == 8 and 0 < counts["train_truncated"] <= 1600 and counts["val_truncated"] > 0
    )
    note = f"{counts['train_truncated']} of 1600 training texts truncated to 8 tokens"
    assert note in err  # said at the start, and again in the summary at the end
    summary = printed.out.strip().splitlines()[-1]
    assert summary.startswith("trained 2 steps in ") and "held-out accuracy " in summary and note in summary
    assert main([*flags, "--overwrite", "--task.truncate", "false"]) == 1  # refused instead
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "texts are longer than max_seq_len=8 tokens" in err, err
    assert "train.csv row " in err and "task.truncate" in err
