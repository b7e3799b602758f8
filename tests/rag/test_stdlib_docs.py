"""The built-in ``stdlib-docs`` corpus: one document per documented public object, stable ids and order."""

from __future__ import annotations

import hashlib

import pytest

from lamina.rag.stdlib_docs import LEAD_MIN_CHARS, lead_span, module_names, stdlib_documents


@pytest.fixture(scope="module")
def docs():
    return stdlib_documents(modules=["csv", "json", "os"])


def test_ids_are_the_public_qualified_names(docs):
    ids = {d.doc_id: d for d in docs}
    for name in ("csv", "csv.DictReader", "csv.reader", "json.loads", "json.JSONDecoder", "os.path.join"):
        assert name in ids, name
    assert "posixpath.join" not in ids and "json.decoder.JSONDecoder" not in ids  # the shortest public name
    assert not any(part.startswith("_") for d in docs for part in d.doc_id.split("."))
    assert ids["json.loads"].text.startswith("json.loads(s, ")
    assert "Deserialize" in ids["json.loads"].text
    assert ids["csv.DictReader"].metadata == {
        "path": "csv.DictReader",
        "title": "csv.DictReader",
        "kind": "class",
        "module": "csv",
    }
    assert len(ids["csv.DictReader"].text) <= LEAD_MIN_CHARS  # short: no lead entry
    assert "fieldnames" in ids["csv.DictReader"].text  # no docstring: its signature and members stand in
    assert ids["json.JSONDecoder.decode"].metadata["kind"] == "method"


def test_sorted_unique_hashed_and_deterministic(docs):
    ids = [d.doc_id for d in docs]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for d in docs:  # the text, and the lead span the chunker indexes from it
        lead = d.metadata.get("lead")
        hashed = d.text + (f"\0lead {lead[0]} {lead[1]}" if lead else "")
        assert d.content_hash == hashlib.sha256(hashed.encode()).hexdigest()
    assert all(d.text.strip() for d in docs)
    again = stdlib_documents(modules=["csv", "json", "os"])
    assert [(d.doc_id, d.content_hash) for d in again] == [(d.doc_id, d.content_hash) for d in docs]


def test_skips_side_effect_and_gui_modules():
    names = module_names()
    assert "csv" in names and "os.path" in names and "xml.etree.ElementTree" in names
    for skipped in ("this", "antigravity", "tkinter", "turtle", "idlelib", "test", "posixpath"):
        assert skipped not in names
    assert not any(n.startswith(("test.", "encodings.", "idlelib.")) for n in names)
    assert stdlib_documents(modules=["no_such_module_xyz"]) == []


def test_the_lead_is_the_paragraph_after_the_signature(docs):
    ids = {d.doc_id: d for d in docs}
    loads = ids["json.loads"]
    a, b = loads.metadata["lead"]
    assert loads.text[a:b].startswith("Deserialize ``s``") and "\n\n" not in loads.text[a:b]
    module = ids["csv"]
    assert module.text[slice(*module.metadata["lead"])] == "CSV parsing and writing."  # no signature line
    assert lead_span("f(x)\n\nMembers: a, b.") is None and lead_span("f(x) -> y") is None
    assert lead_span("one paragraph", skip_first=False) is None  # the whole text: nothing to add
