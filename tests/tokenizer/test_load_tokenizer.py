"""One resolver for "the tokenizer of MODEL" (``lamina.checkpoint.load.load_tokenizer``), used by every verb;
it never reads weights, and GGUF metadata comes from lamina's own reader (lamina issue 11, §2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lamina.checkpoint.load import load_tokenizer
from lamina.errors import ModelNotFoundError, TokenizerError
from lamina.tokenizer import Tokenizer


@pytest.fixture()
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything reads model weights (GGUF tensors, safetensors, lamina.load)."""
    import lamina.checkpoint.load as load_module
    from lamina.checkpoint import gguf, hf

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("model weights were read to get a tokenizer")

    monkeypatch.setattr(gguf.GGUFFile, "load_tensor", refuse)
    monkeypatch.setattr(gguf.GGUFFile, "load_tensors", refuse)
    monkeypatch.setattr(hf, "read_hf_folder", refuse)
    monkeypatch.setattr(load_module, "load", refuse)
    monkeypatch.setattr(load_module, "load_checkpoint", refuse)


@pytest.fixture()
def no_gguf_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the `gguf` package's reader is used (lamina reads GGUF with its own reader)."""
    gguf_package = pytest.importorskip("gguf")

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the gguf package's reader was used")

    monkeypatch.setattr(gguf_package, "GGUFReader", refuse)


def _tiny(tmp_path: Path) -> Tokenizer:
    texts = [f"the quick brown fox {i} jumps over the lazy dog" for i in range(50)]
    return Tokenizer.train(texts, vocab_size=300, show_progress=False)


def test_tokenizer_of_a_gguf_model_reads_only_metadata(
    smollm2_path: Path, no_weights: None, no_gguf_package: None
) -> None:
    from lamina.data.corpus import load_tokenizer as data_load_tokenizer

    for tok in (load_tokenizer("smollm2"), load_tokenizer(smollm2_path), Tokenizer.from_gguf(smollm2_path)):
        assert tok.vocab_size == 49152 and tok.token_to_id("<|im_end|>") == 2
        assert len(tok.apply_chat_template([{"role": "user", "content": "x"}], True, tokenize=True)) == 31
    assert data_load_tokenizer("smollm2").encode("Hello world") == load_tokenizer("smollm2").encode(
        "Hello world"
    )


def test_cli_count_does_not_load_weights(
    no_weights: None, no_gguf_package: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from lamina.cli.main import main

    assert main(["tokenizer", "count", "smollm2", "Hello world, how are you?"]) == 0
    assert capsys.readouterr().out.strip() == str(
        len(load_tokenizer("smollm2").encode("Hello world, how are you?"))
    )


def test_tokenizer_files_folders_and_checkpoints(minilm_path: Path, tmp_path: Path, no_weights: None) -> None:
    assert load_tokenizer("minilm").encode("hello world") == Tokenizer.from_file(minilm_path).encode(
        "hello world"
    )
    tok = _tiny(tmp_path)
    folder = tok.save(tmp_path / "tok")
    checkpoint = tmp_path / "ckpt"  # a lamina checkpoint folder: config.yaml + tokenizer files
    tok.save(checkpoint)
    (checkpoint / "config.yaml").write_text("d_model: 8\n")
    for source in (folder, folder / "tokenizer.json", checkpoint, str(checkpoint)):
        assert load_tokenizer(source).encode("the lazy fox") == tok.encode("the lazy fox")


def test_errors_name_the_problem(tmp_path: Path) -> None:
    from lamina.data.corpus import load_tokenizer as data_load_tokenizer

    with pytest.raises(ModelNotFoundError):
        load_tokenizer(tmp_path / "nothing-here")
    with pytest.raises(TokenizerError, match="train_tokenizer"):
        data_load_tokenizer(tmp_path / "nothing-here")
    hf_folder = tmp_path / "hf"  # a HF model folder without tokenizer.json
    hf_folder.mkdir()
    (hf_folder / "config.json").write_text('{"model_type": "llama"}')
    (hf_folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(TokenizerError, match=r"has no tokenizer\.json"):
        load_tokenizer(hf_folder)
