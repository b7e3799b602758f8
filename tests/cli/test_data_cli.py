"""``lamina data prepare``: the verb over lamina.data.prepare, its summary, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lamina.cli.main import main
from lamina.data import Manifest, TokenShards
from lamina.tokenizer import Tokenizer

TEXTS = [f"file {i}: the quick brown fox jumps over the lazy dog, again and again.\n" * 3 for i in range(8)]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, text in enumerate(TEXTS):
        (folder / f"{i}.txt").write_text(text)
    (folder / "blob.bin").write_bytes(b"\x00\x01\x02\x03")
    (folder / "rows.jsonl").write_text(
        json.dumps({"body": "a json row"}) + "\n" + json.dumps({"x": 1}) + "\n"
    )
    return folder


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = Tokenizer.train(TEXTS, vocab_size=300, show_progress=False)
    return tok.save(tmp_path_factory.mktemp("tok"))


def test_prepare_prints_a_summary(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, corpus: Path, tok_dir: Path
) -> None:
    out_dir = tmp_path / "data"
    code, out, err = run(
        capsys, "data", "prepare", str(corpus), "--tokenizer", str(tok_dir), "--out", str(out_dir),
        "--jsonl-field", "body", "--val-fraction", "0.2", "--num-workers", "2", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    m = Manifest.load(out_dir)
    assert m.documents == 9 and m.splits["val"].documents >= 1 and m.jsonl_field == "body"
    assert "9 documents" in out and "train:" in out and "val:" in out and "time:" in out
    assert "skipped: 1 bad_record, 1 binary" in out
    assert f"{m.splits['train'].tokens:,} tokens" in out
    assert len(TokenShards.open(out_dir, "train")) == m.splits["train"].tokens


def test_train_tokenizer_then_prepare(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, corpus: Path
) -> None:
    out_dir = tmp_path / "data"
    code, out, err = run(
        capsys, "data", "prepare", str(corpus / "*.txt"), "--train-tokenizer", "280", "--out", str(out_dir),
        "--no-progress", "--num-workers", "1",
    )  # fmt: skip
    assert code == 0, err
    tok = Tokenizer.from_file(out_dir / "tokenizer")
    assert tok.eos_token == "<|endoftext|>" and "trained:280" in out
    ids = TokenShards.open(out_dir, "train")[:].tolist() + TokenShards.open(out_dir, "val")[:].tolist()
    assert ids.count(tok.eos_token_id) == len(TEXTS)


def test_builtin_with_max_bytes(capsys: pytest.CaptureFixture[str], tmp_path: Path, tok_dir: Path) -> None:
    out_dir = tmp_path / "data"
    code, out, err = run(
        capsys, "data", "prepare", "--builtin", "stdlib", "--max-bytes", "20K", "--tokenizer", str(tok_dir),
        "--out", str(out_dir), "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    m = Manifest.load(out_dir)
    assert m.max_bytes == 20_000 and m.bytes_read <= 20_000 and "files not read" in out


def test_errors_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path, tok_dir: Path) -> None:
    pattern = str(tmp_path / "missing" / "*.txt")
    code, _, err = run(
        capsys, "data", "prepare", pattern, "--tokenizer", str(tok_dir), "--out", str(tmp_path / "o")
    )
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("lamina data prepare: error: no input files matched") and pattern in err
    (tmp_path / "a.txt").write_text("text\n")
    code, _, err = run(capsys, "data", "prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "o"))
    assert code == 1 and "no tokenizer" in err and "--train-tokenizer" in err
    code, _, err = run(capsys, "data", "prepare", "--out", str(tmp_path / "o"), "--tokenizer", str(tok_dir))
    assert code == 1 and "no input" in err
    code, _, err = run(
        capsys, "data", "prepare", str(tmp_path / "a.txt"), "--tokenizer", "no-such-model", "--out",
        str(tmp_path / "o"),
    )  # fmt: skip
    assert code == 1 and "tokenizer 'no-such-model' not found" in err
    assert not (tmp_path / "o").exists()


def test_help_explains(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["data", "prepare", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--tokenizer", "--train-tokenizer", "--builtin", "--max-bytes", "--jsonl-field",
                 "--val-fraction", "--num-workers", "uint16", "examples:"):  # fmt: skip
        assert flag in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "    data" in capsys.readouterr().out
