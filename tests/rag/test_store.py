"""The store suite, run against every store (the SQLite file; PostgreSQL + pgvector when its server starts):
writes, dense and BM25 search, filters, the embedding-model check; SQLite's cache and HNSW index."""

from __future__ import annotations

import contextlib
import itertools
import sqlite3

import pytest
import torch
import torch.nn.functional as F

from lamina.errors import ConfigError
from lamina.rag.store import open_store
from lamina.rag.store_sqlite import SqliteStore
from lamina.rag.types import Chunk, Document, matches

DIM = 16
WORDS = ["apple", "banana", "cherry", "date", "elder", "fig", "grape", "honeydew"]


def corpus() -> list[tuple[Document, list[Chunk], torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for d in range(12):
        doc_id = f"{'fruit' if d < 8 else 'veg'}/{d:02d}.md"
        chunks = []
        for i in range(3):
            text = f"{WORDS[d % 8]} {WORDS[(d + i) % 8]} pie number {d} part {i}"
            meta = {"path": doc_id, "title": f"T{d}", "lang": "en" if d % 2 else "fr", "page": i + 1}
            chunks.append(Chunk(f"{doc_id}#{i}", doc_id, text, 10 * i, 10 * i + len(text), meta))
        if d == 3:
            chunks.append(
                Chunk(f"{doc_id}#summary", doc_id, "a summary of apples", 0, 0, {"path": doc_id}, "summary")
            )
        vectors = F.normalize(torch.randn(len(chunks), DIM, generator=g), dim=1)
        out.append((Document(doc_id, "text", f"hash{d}", {"path": doc_id}), chunks, vectors))
    return out


STORES = ["sqlite", "postgres"]
TABLES = itertools.count()  # each PostgreSQL test gets its own tables


@pytest.fixture(params=STORES)
def make_store(request, tmp_path, pg_url):
    """A factory of empty stores of one kind (every call: the same location)."""
    options = {}
    if request.param == "postgres":
        if pg_url is None:
            pytest.skip("no PostgreSQL with pgvector (pip install pgserver)")
        from lamina.rag.store_pg import PgStore

        location, options["table"] = pg_url, f"t{next(TABLES)}"
        PgStore.drop(location, options["table"])
    else:
        location = str(tmp_path / "index.sqlite")
    opened = []

    def make(model="minilm", dim=DIM, **kw):
        store = open_store(location, model, dim, **options, **kw)
        opened.append(store)
        return store

    yield make
    for s in opened:
        with contextlib.suppress(Exception):  # already closed
            s.close()


@pytest.fixture
def store(make_store):
    s = make_store()
    for doc, chunks, vectors in corpus():
        s.put(doc, chunks, vectors)
    s.optimize()  # PostgreSQL: builds its GIN and HNSW indexes, so the suite searches through them
    return s


def all_chunks():
    return [(c, v) for _, chunks, vectors in corpus() for c, v in zip(chunks, vectors, strict=True)]


def test_put_documents_get_count(store):
    assert store.count() == 12 * 3 + 1
    assert store.documents() == {d.doc_id: d.content_hash for d, _, _ in corpus()}
    ids = ["veg/09.md#2", "fruit/00.md#0", "fruit/03.md#summary"]
    got = store.get(ids)
    assert [c.chunk_id for c in got] == ids
    assert got[0] == next(c for c, _ in all_chunks() if c.chunk_id == "veg/09.md#2")
    assert got[2].kind == "summary"


def test_put_replaces_and_delete_removes(store):
    doc, chunks, vectors = corpus()[0]
    store.put(Document(doc.doc_id, "new", "newhash", {}), chunks[:1], vectors[:1])
    assert store.count() == 11 * 3 + 1 + 1 and store.documents()[doc.doc_id] == "newhash"
    store.delete("fruit/01.md")
    store.delete("not/there")
    assert "fruit/01.md" not in store.documents() and store.count() == 10 * 3 + 1 + 1
    assert all(h.chunk.doc_id != "fruit/01.md" for h in store.search_text("banana", 50))
    assert all(h.chunk.doc_id != "fruit/01.md" for h in store.search_dense(vectors[0], 50))


def test_dense_search_is_exact_cosine(store):
    rows = all_chunks()
    q = F.normalize(torch.randn(DIM, generator=torch.Generator().manual_seed(5)), dim=0)
    expected = sorted(rows, key=lambda cv: -float(cv[1] @ q))[:5]
    hits = store.search_dense(q, 5)
    assert [h.chunk.chunk_id for h in hits] == [c.chunk_id for c, _ in expected]
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    for h, (_, v) in zip(hits, expected, strict=True):
        assert h.score == pytest.approx(float(v @ q), abs=1e-3)
    c, v = rows[7]
    assert store.search_dense(v, 1)[0].chunk.chunk_id == c.chunk_id


def test_text_search_ranks_by_bm25(store):
    hits = store.search_text("How is CHERRY made?", 40)
    assert hits and all("cherry" in h.chunk.text for h in hits)
    assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
    assert all(a.score >= b.score for a, b in itertools.pairwise(hits))
    # a chunk holding the rare word twice outranks chunks with it once
    assert hits[0].chunk.text.count("cherry") == 2
    assert store.search_text("zzz-unknown", 5) == [] and store.search_text("?!", 5) == []
    assert store.search_text('apple" OR NEAR(', 3)  # query syntax is quoted away


@pytest.mark.parametrize(
    "filters",
    [
        {"lang": "en"},
        {"lang": ["en", "fr"], "page": 2},
        {"doc_id": "fruit/03.md"},
        {"doc_id": ["veg/08.md", "fruit/00.md"]},
        {"doc_id_prefix": "veg/"},
        {"kind": "summary"},
        {"title": "T5", "lang": "fr"},  # nothing matches both
    ],
)
def test_filters_mean_the_same_in_every_store(store, filters):
    allowed = {c.chunk_id for c, _ in all_chunks() if matches(c, filters)}
    q = torch.ones(DIM) / DIM**0.5
    dense = store.search_dense(q, 100, filters)
    text = store.search_text("pie apple summary", 100, filters)
    assert {h.chunk.chunk_id for h in dense} == allowed
    assert {h.chunk.chunk_id for h in text} <= allowed
    assert bool(text) == bool(allowed)


def test_another_embedding_model_is_refused(make_store):
    make_store("minilm", DIM).close()
    with pytest.raises(ConfigError, match=r"'minilm'.*'bge-small'"):
        make_store("bge-small", DIM)
    with pytest.raises(ConfigError, match="16-dim"):
        make_store("minilm", 32)
    again = make_store(None, None)
    assert (again.embedding_model, again.dim) == ("minilm", DIM)


def test_failed_put_keeps_the_last_committed_state(store):
    doc, chunks, vectors = corpus()[2]
    twice = [chunks[0], chunks[0]]  # a duplicate chunk id fails mid-transaction
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        store.put(Document(doc.doc_id, "x", "changed", {}), twice, vectors[:2])
    assert store.documents()[doc.doc_id] == doc.content_hash
    assert [c.chunk_id for c in store.get([c.chunk_id for c in chunks])] == [c.chunk_id for c in chunks]


def test_postgres_put_many_is_one_transaction_and_optimize_builds_the_indexes(make_store):
    """put_many writes several documents in one transaction (a failure in the last leaves none of
    them); a new index searches exactly until optimize builds its GIN and HNSW indexes, then through them
    with the same results."""
    s = make_store()
    if not hasattr(s, "put_many"):
        pytest.skip("PostgreSQL only")
    items = corpus()
    doc, chunks, vectors = items[-1]
    bad = (Document(doc.doc_id, "x", "h", {}), [chunks[0], chunks[0]], vectors[:2])  # duplicate chunk id
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        s.put_many([*items[:-1], bad])
    assert s.count() == 0 and s.documents() == {}
    with pytest.raises(ConfigError, match="vectors of shape"):
        s.put_many([(doc, chunks, vectors[:1])])
    s.put_many(items)
    assert s.count() == 12 * 3 + 1
    q = F.normalize(torch.randn(DIM, generator=torch.Generator().manual_seed(5)), dim=0)
    exact = [h.chunk.chunk_id for h in s.search_dense(q, 5)]
    text = [h.chunk.chunk_id for h in s.search_text("cherry pie", 5)]

    def indexes() -> set[str]:
        rows = s.db.execute("SELECT indexname FROM pg_indexes WHERE tablename = %s", (f"{s.t}_chunks",))
        return {r[0].removeprefix(f"{s.t}_chunks_") for r in rows}

    assert not {"hnsw", "tsv"} & indexes()
    s.optimize()
    assert {"hnsw", "tsv"} <= indexes()
    assert [h.chunk.chunk_id for h in s.search_dense(q, 5)] == exact
    assert [h.chunk.chunk_id for h in s.search_text("cherry pie", 5)] == text
    s.put_many(items[:1])  # replaces the document, through the existing indexes
    assert s.count() == 12 * 3 + 1


def test_sqlite_cache_sees_other_writers(tmp_path):
    path = tmp_path / "s.sqlite"
    a, b = SqliteStore(path, "m", DIM), SqliteStore(path, "m", DIM)
    doc, chunks, vectors = corpus()[0]
    assert a.search_dense(vectors[0], 3) == []
    b.put(doc, chunks, vectors)
    assert a.search_dense(vectors[0], 1)[0].chunk.chunk_id == chunks[0].chunk_id
    b.delete(doc.doc_id)
    assert a.search_dense(vectors[0], 3) == []
    a.close(), b.close()


def test_sqlite_refuses_other_files(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 10)
    with pytest.raises(Exception, match="not a lamina index"):
        SqliteStore(junk, "m", DIM)
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE x (a)").connection.commit()
    with pytest.raises(Exception, match="not a lamina index"):
        SqliteStore(other, "m", DIM)


@pytest.mark.slow
def test_sqlite_hnsw_recall_and_incremental_updates(tmp_path):
    """Past ann_threshold unfiltered queries go to usearch's HNSW index: recall@10 against exact search
    >= 0.95 on clustered synthetic vectors, kept up to date by puts and deletes, saved and reloaded."""
    pytest.importorskip("usearch")
    g = torch.Generator().manual_seed(0)
    n, dim = 6000, 64
    centers = torch.randn(60, dim, generator=g)
    vectors = F.normalize(
        centers[torch.randint(0, 60, (n,), generator=g)] + 0.6 * torch.randn(n, dim, generator=g), dim=1
    )
    path = tmp_path / "big.sqlite"
    store = SqliteStore(path, "m", dim, ann_threshold=1000)
    per = 100
    for d in range(n // per):
        chunks = [Chunk(f"d{d}#{i}", f"d{d}", f"t{d} {i}", 0, 1) for i in range(per)]
        store.put(Document(f"d{d}", "t", str(d), {}), chunks, vectors[d * per : (d + 1) * per])
    queries = F.normalize(torch.randn(50, dim, generator=g) + centers[:50], dim=1)
    exact = SqliteStore(path, ann_threshold=10**9)

    def recall(a, b):
        got = [{h.chunk.chunk_id for h in a.search_dense(q, 10)} for q in queries]
        ref = [{h.chunk.chunk_id for h in b.search_dense(q, 10)} for q in queries]
        return sum(len(x & y) for x, y in zip(got, ref, strict=True)) / (10 * len(queries))

    assert recall(store, exact) >= 0.95 and store._ann is not None
    store.delete("d0")  # removed from the HNSW index, not rebuilt
    ann = store._ann
    new = F.normalize(torch.randn(1, dim, generator=g), dim=1)
    store.put(Document("new", "t", "h", {}), [Chunk("new#0", "new", "new", 0, 3)], new)
    assert store._ann is ann
    assert store.search_dense(new[0], 1)[0].chunk.chunk_id == "new#0"
    assert all(h.chunk.doc_id != "d0" for q in queries[:10] for h in store.search_dense(q, 10))
    store.close()
    reopened = SqliteStore(path, ann_threshold=1000)
    assert reopened._load_or_build_ann() is not None and not reopened._ann_dirty  # loaded, not rebuilt
    assert reopened.search_dense(new[0], 1)[0].chunk.chunk_id == "new#0"
    assert recall(reopened, exact) >= 0.95
    reopened.close(), exact.close()
