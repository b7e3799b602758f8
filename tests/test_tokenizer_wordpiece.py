"""WordPiece (BERT) tokenizers: lamina's ids equal transformers' fast tokenizer on the same tokenizer.json."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lamina.tokenizer import Tokenizer


def test_wordpiece_ids_match_transformers(minilm_path: Path, varied_texts: list[str]) -> None:
    ours = Tokenizer.from_file(minilm_path)
    fast = PreTrainedTokenizerFast(tokenizer_file=str(minilm_path / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(minilm_path)
    assert len(varied_texts) >= 200
    for text in varied_texts:
        ids = ours.encode(text)
        assert ids == fast(text)["input_ids"] == auto(text)["input_ids"], text
        assert ids[0] == ours.token_to_id("[CLS]") and ids[-1] == ours.token_to_id("[SEP]")
        assert (
            ours.encode(text, add_special_tokens=False) == auto(text, add_special_tokens=False)["input_ids"]
        )
    # the file pads and truncates to 128: encode() does neither (as transformers' default call)
    assert len(ours.encode("hi")) == 3
    assert len(ours.encode("word " * 300)) == 302


def test_wordpiece_pairs_and_roles(minilm_path: Path) -> None:
    ours = Tokenizer.from_file(minilm_path)
    auto = AutoTokenizer.from_pretrained(minilm_path)
    a, b = "How old are you?", "I am six years old."
    enc = ours.backend.encode(a, b)
    ref = auto(a, b)
    assert enc.ids == ref["input_ids"] and enc.type_ids == ref["token_type_ids"]
    assert (ours.pad_token, ours.mask_token, ours.unk_token) == ("[PAD]", "[MASK]", "[UNK]")
    assert ours.decode(ours.encode("Hello, World!"), skip_special_tokens=True) == "hello, world!"
