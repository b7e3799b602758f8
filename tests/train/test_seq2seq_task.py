"""``finetune --task seq2seq`` (lamina/train/seq2seq.py): a tiny T5 built from scratch learns the reverse
task to >= 95% greedy exact match through ``finetune`` (what the CLI calls); the CLI on a handful of
pairs writes a checkpoint that ``lamina.load`` and ``generate_seq2seq`` read, with validation BLEU/ROUGE
in metrics.jsonl; a decoder-only model and a pair without its target field are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lamina
from lamina.cli.main import main
from lamina.config import GenerationConfig, ModelConfig
from lamina.data.pairs import read_pairs
from lamina.data.synthetic import symbol_tokenizer, write_reverse_task
from lamina.errors import ConfigError
from lamina.generate.seq2seq import generate_seq2seq
from lamina.model.transformer import Transformer
from lamina.train.finetune import FinetuneRun, finetune


@pytest.fixture(scope="module")
def reverse(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The reverse task's splits and its symbol tokenizer (saved as a folder)."""
    root = tmp_path_factory.mktemp("reverse")
    paths = write_reverse_task(root, n_train=20_000, n_val=200, n_test=200)
    paths["tokenizer"] = symbol_tokenizer().save(root / "tokenizer")
    return paths


def _greedy_exact_match(model: Transformer, tok: lamina.Tokenizer, path: Path) -> float:
    data = read_pairs(path)
    eos = tok.eos_token_id
    assert eos is not None
    ids = [[*tok.encode(s, add_special_tokens=False), eos] for s in data.sources]
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=12, eos_token_ids=[eos])
    outs = generate_seq2seq(model.eval(), ids, cfg, tok)
    got = [tok.decode(o[0].token_ids, skip_special_tokens=True).strip() for o in outs]
    return sum(g == t for g, t in zip(got, data.targets, strict=True)) / len(data)


@pytest.mark.slow
def test_tiny_t5_learns_the_reverse_task(reverse: dict[str, Path], tmp_path: Path) -> None:
    """t5-tiny from scratch, AdamW 3e-3 (beta2 0.999), 30 warmup steps then linear decay, batch 32, 800
    steps: >= 95% of 200 held-out sequences reversed exactly (greedy). 600 steps gave 86.5% on validation,
    800 steps 97.5% (seed 1337); after 200 steps it is ~2%."""
    run = FinetuneRun.from_dict(
        {
            "task": {"task": "seq2seq", "data": str(reverse["train"]), "val_data": str(reverse["val"]),
                     "tokenizer": str(reverse["tokenizer"])},
            "seq2seq": {"max_source_len": 16, "max_target_len": 16, "eval_pairs": 100},
            "model": {"preset": "t5-tiny", "vocab_size": 24},
            "train": {"out_dir": str(tmp_path / "run"), "lr": 3e-3, "beta2": 0.999, "warmup_steps": 30, "schedule": "linear",
                      "grad_clip": 1.0, "batch_size": 32, "max_steps": 800, "eval_every": 800,
                      "save_every": 800, "progress": False, "threads": 1},
        }
    )  # fmt: skip
    model, tok, _ = finetune(run)
    assert _greedy_exact_match(model, tok, reverse["test"]) >= 0.95
    evals = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if "val_exact_match" in r]  # fmt: skip
    assert evals and evals[-1]["val_exact_match"] >= 0.9 and evals[-1]["val_bleu"] > 50


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cli(data: Path, tokenizer: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--task", "seq2seq", "--data", str(data), "--task.tokenizer", str(tokenizer),
            "--model.preset", "t5-tiny", "--model.vocab_size", "24", "--train.max_steps", "4",
            "--train.batch_size", "4", "--train.eval_every", "2", "--train.lr", "3e-3",
            "--train.progress", "false", "--train.threads", "1", "--seq2seq.max_target_len", "10", "--out", str(out), *extra]  # fmt: skip


def test_cli_trains_a_checkpoint_that_loads_and_generates(
    reverse: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [json.loads(x) for x in reverse["val"].read_text().splitlines()[:20]]
    data = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "run"
    args = ("--task.val_fraction", "0.2", "--seq2seq.no_repeat_ngram_size", "2",
            "--seq2seq.repetition_penalty", "1.3")  # fmt: skip
    assert main(_cli(data, reverse["tokenizer"], out, *args)) == 0
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_bleu" in r]
    assert len(evals) == 2 and {"val_rougeL", "val_exact_match", "val_loss"} <= set(evals[-1])
    lm = lamina.load(str(out / "last"))
    assert lm.model.config.arch == "encoder-decoder" and lm.tokenizer is not None
    eos = lm.tokenizer.eos_token_id
    assert eos is not None and eos in lm.generation.eos_token_ids
    # the checkpoint decodes as the evaluations did: greedy, max_target_len tokens, n-gram ban, penalty
    g = lm.generation
    assert (g.temperature, g.max_new_tokens, g.no_repeat_ngram_size) == (0.0, 10, 2)
    assert g.repetition_penalty == 1.3
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=5, eos_token_ids=[eos])
    outs = generate_seq2seq(lm.model, [[5, 6, eos]], cfg, lm.tokenizer)
    assert len(outs[0][0].token_ids) <= 5 and outs[0][0].finish_reason in ("stop", "length")
    assert "seq2seq" in (out / "run.yaml").read_text()


def test_best_metric_picks_the_checkpoint_with_the_highest_rouge(
    reverse: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``seq2seq.best_metric val_rougeL``: OUT/best is the evaluation with the highest ROUGE-L (the first of
    two here, faked so that it is), not the one with the lowest validation loss (the default's choice)."""
    import lamina.eval.seq2seq as metrics_module

    def fake_pair_metrics(*args: object, **kwargs: object) -> object:
        scores = iter([0.9, 0.1])  # evaluation 1 (step 2) scores best, evaluation 2 (step 4) worse
        return lambda model: {"val_rougeL": next(scores)}

    monkeypatch.setattr(metrics_module, "pair_metrics", fake_pair_metrics)
    rows = [json.loads(x) for x in reverse["val"].read_text().splitlines()[:20]]
    data = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    weights = "model.safetensors"
    for metric, best_step in (("val_rougeL", 2), ("val_loss", 4)):
        out = tmp_path / metric
        args = ("--task.val_fraction", "0.2", "--train.save_every", "2", "--train.lr", "3e-2",
                "--seq2seq.best_metric", metric)  # fmt: skip
        assert main(_cli(data, reverse["tokenizer"], out, *args)) == 0
        losses = [r["val_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                  if "val_loss" in r]  # fmt: skip
        assert len(losses) == 2 and losses[1] < losses[0]  # so val_loss would pick step 4
        best = (out / "best" / weights).read_bytes()
        assert best == (out / "checkpoints" / f"step-{best_step:08d}" / weights).read_bytes(), metric
        assert best != (out / "checkpoints" / f"step-{6 - best_step:08d}" / weights).read_bytes(), metric


def test_best_metric_is_checked() -> None:
    from lamina.train.seq2seq import Seq2SeqConfig

    with pytest.raises(ConfigError, match=r"^seq2seq\.best_metric='rougeL' must be one of val_loss, "):
        Seq2SeqConfig(best_metric="rougeL")
    with pytest.raises(ConfigError, match=r"set seq2seq\.eval_pairs > 0"):
        Seq2SeqConfig(best_metric="val_rougeL", eval_pairs=0)


def test_the_decoding_fields_are_checked_once_by_generation_config() -> None:
    from lamina.train.seq2seq import Seq2SeqConfig

    with pytest.raises(ConfigError, match=r"^seq2seq\.no_repeat_ngram_size=-1 must be >= 0"):
        Seq2SeqConfig(no_repeat_ngram_size=-1)
    with pytest.raises(ConfigError, match=r"^seq2seq\.repetition_penalty=0\.0 must be > 0"):
        Seq2SeqConfig(repetition_penalty=0.0)
    assert Seq2SeqConfig(repetition_penalty=1.3).generation(7).repetition_penalty == 1.3


def test_a_decoder_only_model_is_one_line(
    reverse: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write_jsonl(tmp_path / "pairs.jsonl", [{"source": "s1 s2", "target": "s2 s1"}] * 10)
    argv = _cli(data, reverse["tokenizer"], tmp_path / "run")
    argv[argv.index("t5-tiny")] = "tiny"
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "arch='encoder-decoder'" in err and "Traceback" not in err
    # the same for an --init decoder, refused after loading it
    torch.manual_seed(0)
    dec = Transformer(ModelConfig.preset("tiny", vocab_size=24))
    folder = lamina.save_checkpoint(tmp_path / "dec", dec, symbol_tokenizer())
    argv = ["finetune", "--task", "seq2seq", "--data", str(data), "--init", str(folder), "--out",
            str(tmp_path / "run2"), "--train.progress", "false"]  # fmt: skip
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "arch='encoder-decoder'" in err and "'decoder'" in err


def test_a_pair_without_its_target_is_one_line(
    reverse: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [{"source": "s1 s2", "target": "s2 s1"}] * 10
    rows[3] = {"source": "s1 s2", "summary": "s2 s1"}
    data = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert main(_cli(data, reverse["tokenizer"], tmp_path / "run")) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pairs.jsonl:4" in err and "target" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


LINES = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400)]


def _pretrain_flags(tmp: Path, out: Path, steps: int, *extra: str) -> list[str]:
    corpus = tmp / "corpus"
    if not corpus.exists():
        corpus.mkdir()
        for k in range(4):
            (corpus / f"part{k}.py").write_text("".join(LINES[k * 100 : (k + 1) * 100]))
    return [
        "pretrain", "--data.sources", f"[{corpus}]", "--data.train_tokenizer", "300", "--data.out",
        str(tmp / "data"), "--data.val_fraction", "0.25", "--model.preset", "t5-tiny", "--train.out_dir",
        str(out), "--train.batch_size", "4", "--train.seq_len", "32", "--train.max_steps", str(steps),
        "--train.save_every", "3", "--train.eval_every", "3", "--train.eval_batches", "2", "--train.lr", "3e-3",
        "--train.schedule", "constant", "--train.warmup_steps", "0", "--train.progress", "false",
        "--train.threads", "1", *extra,
    ]  # fmt: skip


def test_pretrain_an_encoder_decoder_with_span_corruption_and_resume(tmp_path: Path) -> None:
    """t5-tiny from scratch on a tiny corpus: span corruption by default (sentinels added to the trained
    tokenizer), a checkpoint lamina.load reads, and 3 steps + --resume to 6 equal 6 uninterrupted steps."""
    from safetensors.torch import load_file

    assert main(_pretrain_flags(tmp_path, tmp_path / "full", 6)) == 0
    run = __import__("yaml").safe_load((tmp_path / "full" / "run.yaml").read_text())
    assert run["span_corruption"]["input_length"] == 32 and run["model"]["arch"] == "encoder-decoder"
    lm = lamina.load(str(tmp_path / "full" / "last"))
    assert lm.tokenizer is not None and lm.tokenizer.token_to_id("<extra_id_0>") is not None
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in rows)
    assert main(_pretrain_flags(tmp_path, tmp_path / "cut", 3)) == 0
    assert main([*_pretrain_flags(tmp_path, tmp_path / "cut", 6), "--resume"]) == 0
    a = load_file(tmp_path / "full" / "last" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "last" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
