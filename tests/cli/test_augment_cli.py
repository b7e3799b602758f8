"""``lamina data augment --back-translate MODEL --input FILE --out pairs.jsonl`` with a tiny checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lamina.cli.main import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_chat import tiny_lm

    import lamina

    lm = tiny_lm()
    return lamina.save_checkpoint(
        tmp_path_factory.mktemp("m") / "tiny", lm.model, lm.tokenizer, lm.generation
    )


def test_augment_writes_pairs(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "fr.jsonl"
    src.write_text("".join(json.dumps({"body": t}) + "\n" for t in ("the cat", "a dog ran", "hello")))
    out = tmp_path / "pairs.jsonl"
    argv = ["data", "augment", "--back-translate", str(model_dir), "--input", str(src), "--input-field", "body",
            "--out", str(out), "--max-new-tokens", "2", "--max-batch-size", "2", "--target-field", "fr",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert f"wrote 3 back-translated pairs to {out}" in stdout
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["fr"] for r in rows] == ["the cat", "a dog ran", "hello"]
    assert all(isinstance(r["source"], str) and r["source"] for r in rows)
    # greedy decoding: the same pairs again
    assert main(argv) == 0
    assert [json.loads(x) for x in out.read_text().splitlines()] == rows


def test_augment_errors_are_one_line(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["data", "augment", "--input", "x.txt", "--out", "o.jsonl"]) != 0
    err = capsys.readouterr().err
    assert "back_translate is not set; fix: pass --back-translate" in err and "Traceback" not in err
    assert main(["data", "augment", "--back-translate", str(model_dir), "--input", str(tmp_path / "no.txt"),
                 "--out", str(tmp_path / "o.jsonl")]) != 0  # fmt: skip
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.jsonl").exists()


def test_augment_with_an_encoder_decoder_translates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    import lamina
    from lamina.config import GenerationConfig, ModelConfig
    from lamina.data.synthetic import symbol_tokenizer
    from lamina.eval.seq2seq import seq2seq_predictor
    from lamina.model.transformer import Transformer

    torch.manual_seed(0)
    tok = symbol_tokenizer()
    model = Transformer(
        ModelConfig.preset("t5-tiny", vocab_size=len(tok), initializer="normal", init_std=0.5)
    ).eval()
    folder = lamina.save_checkpoint(
        tmp_path / "t5", model, tok, GenerationConfig(eos_token_ids=[tok.eos_token_id])
    )
    texts = ["s1 s2 s3", "s4", "s9 s8 s7 s6"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    out = tmp_path / "pairs.jsonl"
    argv = ["data", "augment", "--back-translate", str(folder), "--input", str(tmp_path / "in.txt"), "--out",
            str(out), "--max-new-tokens", "5", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert "wrote 3 back-translated pairs" in capsys.readouterr().out
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["target"] for r in rows] == texts
    # greedy translations of the checkpoint's model, batched as the library does it
    assert [r["source"] for r in rows] == seq2seq_predictor(model, tok, max_new_tokens=5)(texts)
