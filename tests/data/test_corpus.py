"""prepare(): text, folders, globs, JSONL and the built-in corpus -> token shards that decode back exactly."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from tokenizers import AddedToken

import lamina.data.corpus as corpus
from lamina.data import DataConfig, Manifest, TokenShards, prepare, stdlib_texts
from lamina.data.builtin import stdlib_files
from lamina.errors import ConfigError, DataError, TokenizerError
from lamina.tokenizer import Tokenizer

WORDS = ["the", "model", "reads", "tokens", "and", "learns", "to", "predict", "next", "one", "from", "data"]


def sentence(rng: random.Random, n: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + ".\n"


def document(seed: int, lines: int = 3) -> str:
    rng = random.Random(seed)
    return f"Document {seed}: " + "".join(sentence(rng) for _ in range(lines))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE of 400 ids (eos = <|endoftext|>), trained on a few KB, saved to a folder."""
    texts = [document(i, 5) for i in range(40)]
    tok = Tokenizer.train(texts, vocab_size=400, show_progress=False)
    return tok.save(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(tok_dir)


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def documents(m: Manifest, split: str, tok: Tokenizer) -> list[str]:
    """The split's stream cut at the eos ids and decoded: the documents, in order."""
    ids = TokenShards.open(m.root, split)[:]
    assert m.eos_token_id is not None and len(ids) and ids[-1] == m.eos_token_id
    ends = np.flatnonzero(ids == m.eos_token_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(ids[a:b].tolist()) for a, b in zip(starts, ends, strict=True)]


def config(tmp_path: Path, sources: list[str], tok_dir: Path, **kw: object) -> DataConfig:
    kw.setdefault("num_workers", 1)
    return DataConfig(sources=sources, tokenizer=str(tok_dir), out=str(tmp_path / "out"), **kw)  # type: ignore[arg-type]


def test_round_trip_text_files(tmp_path: Path, tok_dir: Path, tok: Tokenizer) -> None:
    texts = [document(i) for i in range(3)] + ["unicode: café, 東京, emoji 🙂\n"]
    for i, text in enumerate(texts):
        write(tmp_path / "in" / f"{i}.txt", text)
    m = prepare(config(tmp_path, [str(tmp_path / "in")], tok_dir, val_fraction=0.0), progress=False)
    assert documents(m, "train", tok) == texts
    assert m.splits["train"].documents == 4 and m.splits["val"].documents == 0
    assert m.splits["train"].tokens == sum(len(tok.encode(t)) + 1 for t in texts)
    assert m.dtype == "uint16" and m.vocab_size == tok.vocab_size and m.eos_token_id == tok.eos_token_id
    assert (m.root / "train-00000.bin").stat().st_size == 2 * m.splits["train"].tokens
    # The manifest on disk says the same; the tokenizer copy inside the folder is the same tokenizer.
    assert Manifest.load(m.root) == m
    assert m.load_tokenizer().encode(texts[0]) == tok.encode(texts[0])


def test_uint32_when_the_vocabulary_exceeds_65536(tmp_path: Path, tok: Tokenizer) -> None:
    big = Tokenizer.from_file(tok.save(tmp_path / "small"))
    big.backend.add_special_tokens([AddedToken(f"<x{i}>", special=True) for i in range(65_300)])
    assert big.vocab_size > 65_536
    big.save(tmp_path / "big")
    text = "the model reads <x65000> tokens\n"
    write(tmp_path / "in.txt", text)
    cfg = config(tmp_path, [str(tmp_path / "in.txt")], tmp_path / "big", val_fraction=0.0)
    cfg.parse_special_tokens = True
    m = prepare(cfg, progress=False)
    assert m.dtype == "uint32"
    ids = TokenShards.open(m.root)[:]
    assert ids.dtype == np.uint32 and big.token_to_id("<x65000>") in ids.tolist()
    assert documents(m, "train", big) == [text]


def test_jsonl_field_and_bad_records(tmp_path: Path, tok_dir: Path, tok: Tokenizer) -> None:
    lines = [
        json.dumps({"content": "first record\nwith two lines", "text": "not this one"}),
        "",  # blank lines are ignored
        "{not json",
        json.dumps({"text": "no content field"}),
        json.dumps({"content": ["a", "list"]}),
        json.dumps({"content": "   "}),
        json.dumps(["an", "array"]),
        json.dumps({"content": "second record"}),
    ]
    write(tmp_path / "a.jsonl", "\n".join(lines) + "\n")
    m = prepare(config(tmp_path, [str(tmp_path / "a.jsonl")], tok_dir, jsonl_field="content", val_fraction=0))
    assert documents(m, "train", tok) == ["first record\nwith two lines", "second record"]
    assert m.skipped_by_reason() == {"bad_record": 4, "empty": 1}
    bad = next(s for s in m.skipped if s.reason == "bad_record")
    assert bad.source.endswith("a.jsonl") and "line 3" in bad.detail and "not valid JSON" in bad.detail


def test_jsonl_without_the_field_names_the_keys_it_has(tmp_path: Path, tok_dir: Path) -> None:
    """Every record lacks --jsonl-field: the error names the keys the first one has (was only "1 bad_record"),
    and a record that is not an object says what it is."""
    write(tmp_path / "a.jsonl", json.dumps({"content": "hello", "id": 1}) + "\n")
    with pytest.raises(DataError, match=r"line 1: no 'text' field \(its keys: 'content', 'id'\); fix"):
        prepare(config(tmp_path, [str(tmp_path / "a.jsonl")], tok_dir, val_fraction=0), progress=False)
    write(tmp_path / "a.jsonl", json.dumps("just a string") + "\n")
    with pytest.raises(DataError, match="line 1: a string, not an object"):
        prepare(config(tmp_path, [str(tmp_path / "a.jsonl")], tok_dir, val_fraction=0), progress=False)


@pytest.mark.parametrize(
    ("value", "named"), [(3, "a number"), (2.5, "a number"), (["a"], "an array"), ({"a": 1}, "an object"), (True, "a boolean"),
     (None, "null")]  # null: it said "no 'text' field (its keys: 'text')"
)  # fmt: skip
def test_a_field_that_is_not_a_string_is_named_as_json_names_it(
    tmp_path: Path, tok_dir: Path, value: object, named: str
) -> None:
    write(tmp_path / "a.jsonl", json.dumps({"text": value}) + "\n" + json.dumps({"text": "fine"}) + "\n")
    m = prepare(config(tmp_path, [str(tmp_path / "a.jsonl")], tok_dir, val_fraction=0), progress=False)
    assert m.skipped[0].detail.endswith(f"'text' is {named}, not a string")


def test_large_jsonl_files_are_read_in_chunks(
    tmp_path: Path, tok_dir: Path, tok: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = [document(i, 1 + i % 3) for i in range(25)]
    lines = [json.dumps({"text": r}) for r in records]
    lines[7] = "{broken"
    write(tmp_path / "big.jsonl", "\n".join(lines) + "\n")
    whole = prepare(config(tmp_path, [str(tmp_path / "big.jsonl")], tok_dir, val_fraction=0.0))
    monkeypatch.setattr(corpus, "JSONL_CHUNK_BYTES", 97)  # chunk edges fall inside lines
    cfg = config(tmp_path, [str(tmp_path / "big.jsonl")], tok_dir, val_fraction=0.0, num_workers=2)
    cfg.out = str(tmp_path / "chunked")
    chunked = prepare(cfg, progress=False)
    expected = records[:7] + records[8:]
    assert documents(whole, "train", tok) == documents(chunked, "train", tok) == expected
    assert chunked.skipped_by_reason() == {"bad_record": 1} and chunked.bytes_read == whole.bytes_read


def test_globs_and_folders(tmp_path: Path, tok_dir: Path, tok: Tokenizer) -> None:
    write(tmp_path / "docs" / "b" / "deep.md", "deep markdown\n")
    write(tmp_path / "docs" / "a.md", "top markdown\n")
    write(tmp_path / "docs" / "notes.txt", "a note\n")
    write(tmp_path / "docs" / ".hidden" / "x.md", "hidden folder\n")
    write(tmp_path / "docs" / ".secret.md", "hidden file\n")
    write(tmp_path / "more" / "c.txt", "in a folder\n")
    sources = [str(tmp_path / "docs" / "**" / "*.md"), str(tmp_path / "more")]
    m = prepare(config(tmp_path, sources, tok_dir, val_fraction=0.0), progress=False)
    # sorted glob matches (hidden ones left out by glob), then the folder's files
    assert documents(m, "train", tok) == ["top markdown\n", "deep markdown\n", "in a folder\n"]
    assert [s["files"] for s in m.sources] == [2, 1]
    # a file named twice is read once
    m2 = prepare(
        config(tmp_path, [str(tmp_path / "more"), str(tmp_path / "more" / "c.txt")], tok_dir, overwrite=True)
    )
    assert m2.documents == 1


def test_bad_files_are_counted_not_fatal(tmp_path: Path, tok_dir: Path, tok: Tokenizer) -> None:
    write(tmp_path / "in" / "good.txt", "good text\n")
    write(tmp_path / "in" / "image.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    write(tmp_path / "in" / "empty.txt", "")
    write(tmp_path / "in" / "blank.txt", "  \n\n\t")
    write(tmp_path / "in" / "latin1.txt", "caf\xe9 au lait\n".encode("latin-1"))
    write(tmp_path / "in" / "bom.txt", "\ufeffwith a byte-order mark\n".encode())
    m = prepare(config(tmp_path, [str(tmp_path / "in")], tok_dir, val_fraction=0.0), progress=False)
    assert m.skipped_by_reason() == {"binary": 1, "empty": 2}
    assert {s.source.rsplit("/", 1)[-1] for s in m.skipped} == {"image.png", "empty.txt", "blank.txt"}
    assert [s.rsplit("/", 1)[-1] for s in m.invalid_utf8] == ["latin1.txt"]
    assert documents(m, "train", tok) == ["with a byte-order mark\n", "good text\n", "caf\ufffd au lait\n"]
    summary = m.summary()
    assert "1 binary" in summary and "2 empty" in summary and "not UTF-8" in summary


def test_val_split_is_by_document_non_empty_and_disjoint(
    tmp_path: Path, tok_dir: Path, tok: Tokenizer
) -> None:
    texts = [document(i, 1) for i in range(30)]
    for i, text in enumerate(texts):
        write(tmp_path / "in" / f"{i:02d}.txt", text)
    m = prepare(config(tmp_path, [str(tmp_path / "in")], tok_dir, val_fraction=0.01), progress=False)
    train, val = documents(m, "train", tok), documents(m, "val", tok)
    assert len(val) >= 1 and len(train) >= 1
    assert not set(train) & set(val) and sorted(train + val) == sorted(texts)
    assert m.splits["val"].documents == len(val) and m.splits["train"].documents == len(train)
    # the split depends on the content and the seed only: a larger fraction keeps the val set and adds to it
    m2 = prepare(config(tmp_path, [str(tmp_path / "in")], tok_dir, val_fraction=0.3, overwrite=True))
    val2 = documents(m2, "val", tok)
    assert set(val) <= set(val2) and 3 <= len(val2) <= 18
    # two documents: one each side, whatever the fraction
    for fraction in (0.001, 0.99):
        m3 = prepare(
            config(
                tmp_path,
                [str(tmp_path / "in" / f"0{i}.txt") for i in (0, 1)],
                tok_dir,
                val_fraction=fraction,
                overwrite=True,
            )
        )
        assert m3.splits["train"].documents == 1 and m3.splits["val"].documents == 1


def test_a_split_far_from_val_fraction_is_warned_on_one_line(
    tmp_path: Path, tok_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two input files of very different sizes: whichever goes to val, its share of the tokens is far from
    20% (documents go wholly to one split), and prepare says so on stderr, with the fix."""
    write(tmp_path / "in" / "small.txt", document(0, 1))
    write(tmp_path / "in" / "large.txt", document(1, 40))
    m = prepare(config(tmp_path, [str(tmp_path / "in")], tok_dir, val_fraction=0.2), progress=False)
    err = capsys.readouterr().err
    share = m.splits["val"].tokens / (m.splits["val"].tokens + m.splits["train"].tokens)
    assert not 0.04 < share < 0.9 and err.count("\n") == 1
    assert err.startswith(f"warning: the validation split holds {share:.1%} of the tokens (1 of 2 documents)")
    assert "val_fraction=0.2" in err
    assert "more, smaller documents" in err and "--val-fraction" in err
    assert m.split_warning() == err.removeprefix("warning: ").strip()
    summary = m.summary()  # and the summary counts in words a person would write
    assert "2 documents from" in summary and "1 document " in summary and "(1 shard)" in summary
    assert "1 documents" not in summary
    # many documents of the same size: the share lands near the fraction, no warning
    for i in range(60):
        write(tmp_path / "many" / f"{i:02d}.txt", document(i, 2))
    cfg = config(tmp_path, [str(tmp_path / "many")], tok_dir, val_fraction=0.3, overwrite=True)
    m = prepare(cfg, progress=False)
    assert 0.15 <= m.splits["val"].tokens / (m.splits["val"].tokens + m.splits["train"].tokens) <= 0.45
    assert m.split_warning() is None and capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("fraction", "val_tokens", "warned"),
    [(0.0, 0, False), (0.01, 0, True), (0.01, 3, True), (0.01, 4, False), (0.01, 30, False),
     (0.01, 31, True), (0.3, 101, False), (0.3, 99, True), (0.3, 499, False), (0.3, 501, True),
     (0.5, 699, False), (0.5, 701, True)],
)  # fmt: skip
def test_split_warning_thresholds(fraction: float, val_tokens: int, warned: bool) -> None:
    """Off by more than a factor 3 either way, or by more than 20 percentage points (tokens of 1000)."""
    m = Manifest("t", "tokenizer", 10, "uint16", 0, True, {}, [], [], [], 0, None, 0, fraction, 0, "text")
    m.splits = {"train": corpus.SplitInfo(9, 1000 - val_tokens), "val": corpus.SplitInfo(1, val_tokens)}
    assert (m.split_warning() is not None) is warned


def test_parallel_equals_serial(tmp_path: Path, tok_dir: Path) -> None:
    for i in range(40):  # 40 files -> 3 tasks of at most 16 files
        write(tmp_path / "in" / f"{i:02d}.txt", document(i, 2))
    write(tmp_path / "in" / "records.jsonl", "\n".join(json.dumps({"text": document(i)}) for i in range(9)))
    outs = {}
    for workers in (1, 2):
        cfg = config(tmp_path, [str(tmp_path / "in")], tok_dir, num_workers=workers, val_fraction=0.1)
        cfg.out, cfg.shard_tokens = str(tmp_path / f"out{workers}"), 500
        outs[workers] = prepare(cfg, progress=False)
    one, two = outs[1], outs[2]
    assert one.to_dict() == two.to_dict() and len(one.splits["train"].shards) > 1
    files = sorted(p.name for p in one.root.iterdir() if p.suffix == ".bin")
    assert files == sorted(p.name for p in two.root.iterdir() if p.suffix == ".bin")
    for name in files:
        assert (one.root / name).read_bytes() == (two.root / name).read_bytes()


def test_shards_are_cut_at_the_size_cap(tmp_path: Path, tok_dir: Path, tok: Tokenizer) -> None:
    texts = [document(i, 4) for i in range(5)]
    for i, text in enumerate(texts):
        write(tmp_path / "in" / f"{i}.txt", text)
    cfg = config(tmp_path, [str(tmp_path / "in")], tok_dir, val_fraction=0.0, shard_tokens=100)
    m = prepare(cfg, progress=False)
    sizes = [s.tokens for s in m.splits["train"].shards]
    assert all(n == 100 for n in sizes[:-1]) and 0 < sizes[-1] <= 100 and len(sizes) > 2
    assert documents(m, "train", tok) == texts  # documents continue across shard boundaries


def test_failure_leaves_nothing_behind(
    tmp_path: Path, tok_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "in" / "a.txt", "some text\n")
    cfg = config(tmp_path, [str(tmp_path / "in")], tok_dir)

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(corpus, "_write_shards", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(cfg, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no out, no temporary folder
    # an existing folder survives a failed --overwrite run untouched
    monkeypatch.undo()
    first = prepare(cfg, progress=False)
    before = {p.name: p.read_bytes() for p in first.root.iterdir() if p.is_file()}
    monkeypatch.setattr(corpus, "_write_shards", boom)
    cfg.overwrite = True
    with pytest.raises(RuntimeError):
        prepare(cfg, progress=False)
    assert {p.name: p.read_bytes() for p in first.root.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_existing_output_needs_overwrite(tmp_path: Path, tok_dir: Path) -> None:
    write(tmp_path / "in" / "a.txt", "first\n")
    cfg = config(tmp_path, [str(tmp_path / "in")], tok_dir)
    prepare(cfg, progress=False)
    with pytest.raises(DataError, match=r"already exists.*overwrite"):
        prepare(cfg, progress=False)
    write(tmp_path / "in" / "b.txt", "second\n")
    cfg.overwrite = True
    assert prepare(cfg, progress=False).documents == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_clear_errors(tmp_path: Path, tok_dir: Path) -> None:
    with pytest.raises(DataError, match=r"no input files matched '.*nothing/\*\.txt'"):
        prepare(config(tmp_path, [str(tmp_path / "nothing" / "*.txt")], tok_dir), progress=False)
    write(tmp_path / "in" / "x.bin", b"\x00\x01\x02")
    write(tmp_path / "in" / "e.txt", "")
    with pytest.raises(
        DataError, match=r"empty after filtering.*1 binary \(.*x\.bin\).*1 empty \(.*e\.txt\)"
    ):
        prepare(config(tmp_path, [str(tmp_path / "in")], tok_dir), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    write(tmp_path / "ok.txt", "text\n")
    with pytest.raises(DataError, match=r"no tokenizer.*train_tokenizer"):
        prepare(DataConfig(sources=[str(tmp_path / "ok.txt")], out=str(tmp_path / "o")), progress=False)
    with pytest.raises(TokenizerError, match="tokenizer 'no-such-tokenizer' not found"):
        prepare(config(tmp_path, [str(tmp_path / "ok.txt")], Path("no-such-tokenizer")), progress=False)
    with pytest.raises(ConfigError, match="val_fraction"):
        DataConfig(sources=["x"], out="o", tokenizer="t", val_fraction=1.5)
    with pytest.raises(ConfigError, match="no input"):  # a config without inputs may name a prepared folder;
        prepare(DataConfig(out=str(tmp_path / "o"), tokenizer="t"), progress=False)  # preparing it fails


def test_special_token_text_is_plain_text_by_default(tmp_path: Path, tok_dir: Path, tok: Tokenizer) -> None:
    text = "a document that mentions <|endoftext|> in its text\n"
    write(tmp_path / "a.txt", text)
    m = prepare(config(tmp_path, [str(tmp_path / "a.txt")], tok_dir, val_fraction=0.0), progress=False)
    ids = TokenShards.open(m.root)[:].tolist()
    assert ids.count(tok.eos_token_id) == 1 and tok.decode(ids[:-1]) == text


def test_max_bytes_cuts_at_a_line(tmp_path: Path, tok_dir: Path, tok: Tokenizer) -> None:
    write(tmp_path / "in" / "a.txt", "line one\nline two\nline three\n")
    write(tmp_path / "in" / "b.txt", "never read\n")
    m = prepare(config(tmp_path, [str(tmp_path / "in")], tok_dir, val_fraction=0, max_bytes=22))
    assert documents(m, "train", tok) == ["line one\nline two\n"]
    assert m.unread_files == 1 and m.bytes_read == 18


def test_builtin_stdlib(tmp_path: Path, tok_dir: Path, tok: Tokenizer) -> None:
    names = [n for n, _ in stdlib_files()]
    assert names == sorted(names) and len(names) > 300
    assert not any(f"/{d}/" in n for n in names for d in ("test", "tests", "idlelib", "site-packages"))
    assert "stdlib/json/decoder.py" in names and not any("encodings/cp1252" in n for n in names)
    texts = list(stdlib_texts(max_bytes=30_000))
    assert texts == list(stdlib_texts(max_bytes=30_000))  # deterministic
    assert 0 < sum(len(t.encode()) for _, t in texts) <= 30_000 and texts[0][0] == "stdlib/__future__.py"
    cfg = DataConfig(builtin="stdlib", max_bytes=30_000, tokenizer=str(tok_dir), out=str(tmp_path / "o"))
    m = prepare(cfg, progress=False)
    assert m.sources[0]["source"] == "builtin:stdlib" and m.unread_files > 0 and m.bytes_read <= 30_000
    assert sorted(documents(m, "train", tok) + documents(m, "val", tok)) == sorted(t for _, t in texts)


def test_train_tokenizer_on_the_corpus(tmp_path: Path) -> None:
    for i in range(6):
        write(tmp_path / "in" / f"{i}.txt", document(i, 4))
    cfg = DataConfig(
        sources=[str(tmp_path / "in")], train_tokenizer=320, out=str(tmp_path / "o"), num_workers=1
    )
    m = prepare(cfg, progress=False)
    assert m.tokenizer == "trained:320" and 260 < m.vocab_size <= 320
    tok = Tokenizer.from_file(tmp_path / "o" / "tokenizer")
    assert sorted(documents(m, "train", tok) + documents(m, "val", tok)) == sorted(
        document(i, 4) for i in range(6)
    )
