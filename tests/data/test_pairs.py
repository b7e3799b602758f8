"""Pair files (TSV/CSV/JSONL) and teacher-forcing batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_chat import tiny_tokenizer

from lamina.data.pairs import IGNORE, PairBatches, PairData, PairDataConfig, load_pairs, read_pairs
from lamina.errors import ConfigError, DataError

PAIRS = [("the cat sat", "a dog ran"), ("hello world", "red"), ("blue green red mat", "the mat")]


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return tiny_tokenizer()


def _write(
    tmp: Path, suffix: str, rows: list[tuple[str, str]], names: tuple[str, str] = ("en", "fr")
) -> Path:
    path = tmp / f"pairs{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps({names[0]: s, names[1]: t}) + "\n" for s, t in rows))
    else:
        sep = "\t" if suffix == ".tsv" else ","
        path.write_text(sep.join(names) + "\n" + "".join(f"{s}{sep}{t}\n" for s, t in rows))
    return path


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl"])
def test_every_format_reads_the_fields_chosen(tmp_path: Path, suffix: str) -> None:
    data = read_pairs(_write(tmp_path, suffix, PAIRS), source_field="en", target_field="fr")
    assert list(zip(data.sources, data.targets, strict=True)) == PAIRS
    assert data.where[0].endswith(":2" if suffix != ".jsonl" else ":1")


def test_tsv_keeps_quotes_as_text(tmp_path: Path) -> None:
    path = tmp_path / "q.tsv"
    path.write_text('source\ttarget\nhe said "hi\tbye "x\n')
    data = read_pairs(path)
    assert data.sources == ['he said "hi'] and data.targets == ['bye "x']


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl"])
def test_a_missing_field_names_the_line_and_the_field(tmp_path: Path, suffix: str) -> None:
    path = _write(tmp_path, suffix, PAIRS)
    if suffix == ".jsonl":
        lines = path.read_text().splitlines()
        lines[1] = json.dumps({"en": "hello world"})
        path.write_text("\n".join(lines) + "\n")
        line = 2
    else:
        lines = path.read_text().splitlines()
        lines[2] = "hello world"  # a row with one column: the second is missing
        path.write_text("\n".join(lines) + "\n")
        line = 3
    with pytest.raises(DataError) as e:
        read_pairs(path, source_field="en", target_field="fr")
    msg = str(e.value)
    assert f"{path}:{line} has no field 'fr'" in msg and "target_field" in msg and "\n" not in msg


def test_a_wrong_field_name_lists_the_fields_the_file_has(tmp_path: Path) -> None:
    path = _write(tmp_path, ".jsonl", PAIRS)
    with pytest.raises(DataError, match=r":1 has no field 'source' \(it has 'en', 'fr'\)"):
        read_pairs(path)


def test_bad_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no pair file"):
        read_pairs(tmp_path / "nope.tsv")
    (tmp_path / "x.txt").write_text("a\tb\n")
    with pytest.raises(DataError, match=r"must be \.tsv, \.csv or \.jsonl"):
        read_pairs(tmp_path / "x.txt")
    (tmp_path / "bad.jsonl").write_text('{"source": "a", "target": "b"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2 is not valid JSON"):
        read_pairs(tmp_path / "bad.jsonl")
    (tmp_path / "num.jsonl").write_text('{"source": "a", "target": 3}\n')
    with pytest.raises(DataError, match="'target' must be text"):
        read_pairs(tmp_path / "num.jsonl")
    (tmp_path / "empty.csv").write_text("source,target\n")
    with pytest.raises(DataError, match="has no pairs"):
        read_pairs(tmp_path / "empty.csv")


def test_config_validates_itself() -> None:
    with pytest.raises(ConfigError, match="val_fraction"):
        PairDataConfig(val_fraction=1.0)
    with pytest.raises(ConfigError, match="max_source_len"):
        PairDataConfig(max_source_len=1)
    with pytest.raises(ConfigError, match="both 'x'"):
        PairDataConfig(source_field="x", target_field="x")


def test_load_pairs_splits_or_reads_the_validation_file(tmp_path: Path) -> None:
    rows = [(f"the cat {i}", f"a dog {i}") for i in range(20)]
    path = _write(tmp_path, ".jsonl", rows, ("source", "target"))
    train, val = load_pairs(PairDataConfig(path=str(path), val_fraction=0.25), seed=1)
    assert len(train) == 15 and len(val) == 5
    assert sorted(train.sources + val.sources) == sorted(s for s, _ in rows)
    assert load_pairs(PairDataConfig(path=str(path), val_fraction=0.25), seed=1)[1].sources == val.sources
    _, val2 = load_pairs(PairDataConfig(path=str(path), val_path=str(path)))
    assert len(val2) == 20
    with pytest.raises(DataError, match="no pair file given"):
        load_pairs(PairDataConfig())


def test_batch_layout_for_teacher_forcing(tok) -> None:  # type: ignore[no-untyped-def]
    data = PairData([s for s, _ in PAIRS], [t for _, t in PAIRS])
    pb = PairBatches(tok, data, batch_size=3, decoder_start_token_id=7)
    b = next(pb.eval_batches())
    eos, pad = tok.eos_token_id, tok.eos_token_id  # the tiny tokenizer has no pad: eos pads
    src = [[*tok.encode(s, add_special_tokens=False), eos] for s, _ in PAIRS]
    tgt = [[*tok.encode(t, add_special_tokens=False), eos] for _, t in PAIRS]
    S, T = max(map(len, src)), max(map(len, tgt))
    assert b["input_ids"].shape == (3, S) and b["labels"].shape == (3, T)
    for r in range(3):
        n, m = len(src[r]), len(tgt[r])
        assert b["input_ids"][r, :n].tolist() == src[r]
        assert b["input_ids"][r, n:].tolist() == [pad] * (S - n)
        assert b["attention_mask"][r].tolist() == [1] * n + [0] * (S - n)
        assert b["labels"][r].tolist() == tgt[r] + [IGNORE] * (T - m)
        # decoder_input_ids = start, then labels shifted right by one
        assert b["decoder_input_ids"][r, :m].tolist() == [7, *tgt[r][:-1]]
        assert b["decoder_input_ids"][r, m:].tolist() == [pad] * (T - m)
    assert all(v.dtype == torch.long for v in b.values())


def test_control_token_text_in_a_pair_stays_text(tok) -> None:  # type: ignore[no-untyped-def]
    # before: sources were encoded with special tokens parsed, so "<|im_end|>" in a file became the eos id
    eos = tok.eos_token
    data = PairData([f"the cat {eos} sat"], [f"a dog {eos}"])
    b = next(PairBatches(tok, data, batch_size=1, decoder_start_token_id=7).eval_batches())
    assert b["input_ids"][0].tolist().count(tok.eos_token_id) == 1  # only the appended one
    assert b["labels"][0].tolist().count(tok.eos_token_id) == 1


def test_decoder_start_defaults_to_pad_then_bos_then_eos(tok) -> None:  # type: ignore[no-untyped-def]
    data = PairData(["the"], ["cat"])
    assert PairBatches(tok, data, 1).decoder_start_token_id == tok.eos_token_id


def test_batches_are_a_pure_function_of_the_index_and_cover_an_epoch(tok) -> None:  # type: ignore[no-untyped-def]
    rows = [(f"the cat {w}", w) for w in ("red", "blue", "green", "dog", "mat", "sat", "on", "a")]
    data = PairData([s for s, _ in rows], [t for _, t in rows])
    pb = PairBatches(tok, data, batch_size=3, seed=5)
    assert pb.steps_per_epoch == 2
    a, b = pb.batch(1), PairBatches(tok, data, batch_size=3, seed=5).batch(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    firsts = {tuple(pb.batch(i)["labels"][r, :1].tolist()) for i in range(2) for r in range(3)}
    assert len(firsts) == 6  # six different pairs in the epoch's two batches
    assert pb.n_eval_batches() == 3 and sum(len(x["labels"]) for x in pb.eval_batches()) == 8


def test_over_long_pairs_are_truncated_and_counted_or_refused(tok) -> None:  # type: ignore[no-untyped-def]
    data = PairData(["the cat sat on the mat", "a dog"], ["red blue green", "hello"], ["p.tsv:2", "p.tsv:3"])
    pb = PairBatches(tok, data, 2, max_source_len=4, max_target_len=3)
    assert (pb.truncated_sources, pb.truncated_targets) == (1, 1)
    b = next(pb.eval_batches())
    eos = tok.eos_token_id
    assert b["input_ids"][0].tolist() == [*tok.encode("the cat sat", add_special_tokens=False), eos]
    assert b["labels"][0].tolist() == [*tok.encode("red blue", add_special_tokens=False), eos]
    assert pb.notes() == [
        "1 of 2 training sources truncated to 4 tokens",
        "1 of 2 training targets truncated to 3 tokens",
    ]
    assert pb.stats()["truncated_sources"] == 1
    with pytest.raises(DataError) as e:
        PairBatches(tok, data, 2, max_source_len=4, max_target_len=3, truncate=False)
    assert "1 of 2 sources are longer than max_source_len=4" in str(e.value)
    assert "first: p.tsv:2, 7 tokens" in str(e.value) and "\n" not in str(e.value)
