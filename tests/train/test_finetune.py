"""Fine-tuning task heads: a small encoder learns a label that depends on word order (which sentiment
word a "not" negates), which a bag-of-words model cannot; frozen layers stay bit-identical."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch

from lamina.checkpoint.lamina import load_checkpoint
from lamina.cli.main import main
from lamina.errors import ConfigError
from lamina.tokenizer import Tokenizer
from lamina.train.finetune import FinetuneRun, classification_metrics, finetune

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
    from lamina.train.finetune import _base_model, with_task_head

    base, _ = _base_model(run)
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


def test_metrics_accuracy_and_macro_f1() -> None:
    m = classification_metrics(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1]), 2)
    assert m["accuracy"] == 0.75 and abs(m["f1"] - (2 / 3 + 0.8) / 2) < 1e-9


def test_missing_column_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "d.jsonl").write_text(json.dumps({"sentence": "hi", "label": 1}) + "\n")
    assert main(["finetune", "--data", str(tmp_path / "d.jsonl"), "--init", "minilm"]) == 1
    err = capsys.readouterr().err
    assert "no column 'text'" in err and "sentence" in err and len(err.strip().splitlines()) == 1
