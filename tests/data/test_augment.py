"""Back-translation: batching through any translate callable, the JSONL it writes, the library runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lamina.data.augment import AugmentConfig, augment, back_translate, write_pairs
from lamina.data.pairs import read_pairs
from lamina.errors import ConfigError


def test_back_translate_batches_and_pairs_outputs_with_inputs() -> None:
    calls: list[list[str]] = []

    def translate(texts: list[str]) -> list[str]:
        calls.append(texts)
        return [t.upper() for t in texts]

    seen: list[tuple[int, int]] = []
    pairs = back_translate(
        translate, ["a", "b", "c", "d", "e"], batch_size=2, progress=lambda d, t: seen.append((d, t))
    )
    assert calls == [["a", "b"], ["c", "d"], ["e"]]
    assert pairs == [("A", "a"), ("B", "b"), ("C", "c"), ("D", "d"), ("E", "e")]
    assert seen == [(2, 5), (4, 5), (5, 5)]
    with pytest.raises(ConfigError, match="returned 1 texts for 2"):
        back_translate(lambda t: t[:1], ["a", "b"])
    with pytest.raises(ConfigError, match="batch_size"):
        back_translate(lambda t: t, ["a"], batch_size=0)


def test_written_pairs_read_back_as_pair_data(tmp_path: Path) -> None:
    path = write_pairs([("Bonjour « le » monde", "hello world")], tmp_path / "sub" / "p.jsonl", "fr", "en")
    assert json.loads(path.read_text()) == {"fr": "Bonjour « le » monde", "en": "hello world"}
    data = read_pairs(path, source_field="fr", target_field="en")
    assert data.sources == ["Bonjour « le » monde"] and data.targets == ["hello world"]
    assert not list(tmp_path.rglob("*.tmp"))


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="back_translate is not set; fix: pass --back-translate"):
        AugmentConfig(input="x", out="y").validate()
    with pytest.raises(ConfigError, match="max_batch_size"):
        AugmentConfig(max_batch_size=0)
    with pytest.raises(ConfigError, match="both 'a'"):
        AugmentConfig(source_field="a", target_field="a")


def test_augment_runs_a_loaded_model_over_a_file(tmp_path: Path) -> None:
    from tiny_chat import tiny_lm

    src = tmp_path / "target_side.txt"
    src.write_text("the cat sat\n\nhello world\nred blue\n")
    cfg = AugmentConfig(
        back_translate="tiny", input=str(src), out=str(tmp_path / "pairs.jsonl"), max_batch_size=2
    )
    report = augment(cfg, lm=tiny_lm(), max_new_tokens=3)
    assert report.pairs == 3 and report.skipped_blank == 1
    data = read_pairs(report.out)
    assert data.targets == ["the cat sat", "hello world", "red blue"]
    assert all(s for s in data.sources)  # the random model's continuations (3 tokens each)
    assert "wrote 3 back-translated pairs" in report.summary() and "1 blank lines skipped" in report.summary()
