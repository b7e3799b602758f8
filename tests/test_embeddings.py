"""Sentence embeddings: lamina's vectors equal sentence-transformers' on the real all-MiniLM-L6-v2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import lamina
from lamina.embeddings import EmbeddingConfig, embed_texts, pool
from lamina.errors import ConfigError, InputTooLongError


@pytest.mark.slow
def test_minilm_matches_sentence_transformers(
    lamina_minilm: Any, st_minilm: Any, varied_texts: list[str]
) -> None:
    texts = varied_texts[:110] + varied_texts[-3:]  # 113 texts, the last three past 256 tokens
    ours = embed_texts(lamina_minilm, texts, batch_size=16, truncate=True)  # sentence-transformers cuts
    ref = torch.from_numpy(st_minilm.encode(texts, batch_size=16))
    assert ours.vectors.dtype == torch.float32 and ours.vectors.shape == ref.shape == (len(texts), 384)
    cos = torch.nn.functional.cosine_similarity(ours.vectors, ref)
    assert cos.min() >= 0.9999, (cos.argmin(), cos.min())
    assert torch.allclose(ours.vectors.norm(dim=1), torch.ones(len(texts)), atol=1e-5)
    # the three 300-word texts, and only they, are cut to sentence_bert_config's 256 tokens
    assert ours.max_seq_len == st_minilm.max_seq_length == 256
    long = [i for i, t in enumerate(texts) if len(st_minilm.tokenizer(t)["input_ids"]) > 256]
    assert ours.truncated == long and len(long) == 3
    assert max(ours.n_tokens) == 256 and ours.pooling == ["mean"]


def test_embed_is_batch_independent(lamina_minilm: Any) -> None:
    texts = ["short", "a somewhat longer sentence with more tokens in it", "mid length text"]
    together = lamina.embed(lamina_minilm, texts, batch_size=3)
    alone = torch.cat([lamina.embed(lamina_minilm, [t]) for t in texts])
    assert torch.allclose(together, alone, atol=1e-5)
    assert lamina.embed(lamina_minilm, []).shape == (0, 384)


def test_folder_config_is_read(minilm_path: Path, tmp_path: Path) -> None:
    cfg = EmbeddingConfig.from_folder(minilm_path)
    assert cfg == EmbeddingConfig(pooling=["mean"], normalize=True, max_seq_len=256, do_lower_case=False)
    EmbeddingConfig(pooling=["cls", "max"], normalize=False, max_seq_len=64).write(tmp_path, 8)
    assert EmbeddingConfig.from_folder(tmp_path) == EmbeddingConfig(["cls", "max"], False, 64, False)
    assert EmbeddingConfig.from_folder(tmp_path / "nothing") is None


def test_pooling_modes_skip_padding() -> None:
    h = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [100.0, 100.0]]])  # last position is padding
    mask = torch.tensor([[1, 1, 0]])
    out = pool(h, mask, ["cls", "max", "mean", "mean_sqrt_len", "lasttoken"])
    s2 = 2**0.5
    assert torch.allclose(out, torch.tensor([[1.0, 2.0, 3.0, 6.0, 2.0, 4.0, 4.0 / s2, 8.0 / s2, 3.0, 6.0]]))


def test_bad_input_is_one_clear_error(lamina_minilm: Any) -> None:
    with pytest.raises(ConfigError, match=r"list of strings"):
        lamina.embed(lamina_minilm, "one text")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="pooling"):
        EmbeddingConfig(pooling=["median"])


def test_over_long_input_is_refused_unless_truncation_is_asked_for(lamina_minilm: Any) -> None:
    """The 1,130-token input of the issue: refused, naming the input, its length and the limit; cut and
    reported with truncate=True."""
    texts = ["short", "word " * 1128, "word " * 300]
    with pytest.raises(InputTooLongError) as e:
        lamina.embed(lamina_minilm, texts)
    assert (e.value.index, e.value.n_tokens, e.value.limit) == (1, 1130, 256)
    assert (
        "text 1 has 1130 tokens" in str(e.value) and "256" in str(e.value) and "truncate=True" in str(e.value)
    )
    assert "2 of 3 texts are too long" in str(e.value)
    result = embed_texts(lamina_minilm, texts, truncate=True)
    assert result.truncated == [1, 2] and result.n_tokens[1:] == [256, 256] and result.max_seq_len == 256
    fits = embed_texts(lamina_minilm, ["word " * 254])  # 254 + [CLS] + [SEP] = the limit
    assert fits.truncated == [] and fits.n_tokens == [256]


def _decoder(folder: Path) -> Path:
    """A tiny random decoder checkpoint with a word-level tokenizer, without sentence-transformers files."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from lamina.checkpoint.lamina import save_checkpoint
    from lamina.config import ModelConfig
    from lamina.model.transformer import Transformer
    from lamina.tokenizer import Tokenizer

    words = ["[UNK]", "a", "cat", "sat", "dog", "ran"]
    backend = Backend(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("llama-tiny", vocab_size=len(words), max_seq_len=16))
    return save_checkpoint(folder, model, Tokenizer(backend, unk_token="[UNK]"))


def test_embedding_a_decoder_says_which_pooling(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    from lamina.cli.main import main

    folder = _decoder(tmp_path / "dec")
    with caplog.at_level("INFO", logger="lamina"):
        result = embed_texts(lamina.load(folder), ["a cat sat", "dog"])
    assert result.pooling == ["mean"] and result.vectors.shape == (2, 128)
    assert (
        "decoder without sentence-transformers files: embedding with mean pooling, unit length" in caplog.text
    )
    (tmp_path / "in.txt").write_text("a cat sat\ndog ran\n")
    assert (
        main(["embed", str(folder), "--input", str(tmp_path / "in.txt"), "--out", str(tmp_path / "v.npy")])
        == 0
    )
    err = capsys.readouterr().err
    assert "pooling: mean, unit length (lamina's default:" in err and "no sentence-transformers files" in err


def test_embed_cli_refuses_or_truncates_and_reports(
    lamina_minilm: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    import numpy as np

    from lamina.cli.main import main

    texts = ["A cat sat.", "", "word " * 300]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    argv = ["embed", "minilm", "--input", str(tmp_path / "in.txt"), "--out", str(tmp_path / "v.npy")]
    assert main(argv) == 1  # refused by default: one line naming the input, its length and the limit
    err = capsys.readouterr().err
    assert "input 3 has 302 tokens, more than the 256 the model takes" in err and "Traceback" not in err
    assert not (tmp_path / "v.npy").exists()
    assert main([*argv, "--truncate"]) == 0  # embed_texts' `truncate` keyword, as a flag
    err = capsys.readouterr().err
    assert "embedded 3 texts as 384-dim vectors" in err and "pooling: mean, unit length\n" in err
    assert "1 of 3 inputs truncated to 256 tokens (inputs 3)" in err
    ref = lamina.embed(lamina_minilm, texts, truncate=True)
    assert np.allclose(np.load(tmp_path / "v.npy"), ref.numpy(), atol=1e-5)
    texts = texts[:2]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    ref = ref[:2]
    assert main(["embed", "minilm", "--input", str(tmp_path / "in.jsonl"), "--field", "body"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["index"] for r in rows] == [0, 1]
    assert np.allclose(np.array([r["embedding"] for r in rows]), ref.numpy(), atol=1e-5)
    assert main(["embed", "minilm", "--input", str(tmp_path / "in.jsonl"), "--field", "text"]) == 1
    assert "no string field 'text'" in capsys.readouterr().err
