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
