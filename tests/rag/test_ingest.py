"""Reading files into documents: kinds, ids, hashes, HTML text, PDF pages, and skips counted by kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lamina.errors import DataError
from lamina.rag.ingest import html_text, read_documents, text_hash


def write_pdf(path: Path, pages: list[str]) -> Path:
    """A PDF with one line of Helvetica text per page."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>"]
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(len(pages)))
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>")
    objects.append("<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    for i, text in enumerate(pages):
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET"
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {5 + 2 * i} 0 R "
            "/Resources << /Font << /F1 3 0 R >> >> >>"
        )
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
    out = b"%PDF-1.4\n"
    offsets = []
    for n, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{n} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(out)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    (root / "guide").mkdir()
    (root / "guide" / "install.md").write_text("# Install\n\nRun pip.\n\n## From source\n\nClone it.\n")
    (root / "notes.txt").write_text("Plain notes about indexing.\n")
    (root / "page.html").write_text(
        "<html><head><title>The Page</title><style>p {color: red}</style>"
        "<script>var secret = 1;</script></head><body><h1>Heading</h1><p>First &amp; para.</p>"
        "<script>alert('x')</script><ul><li>one</li><li>two</li></ul></body></html>"
    )
    (root / "tool.py").write_text('"""A tool."""\n\ndef f():\n    return 1\n')
    (root / "rows.jsonl").write_text(
        json.dumps({"id": "a", "text": "Row A text.", "lang": "en"})
        + "\n\n"
        + json.dumps({"text": "Row B."})
        + "\n"
        + json.dumps({"body": "no text field"})
        + "\n"
    )
    write_pdf(root / "paper.pdf", ["Hello page one", "Second page here"])
    (root / "bin.txt").write_bytes(b"abc\x00\x01\x02")
    (root / "empty.md").write_text("  \n")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    (root / "image.png").write_bytes(b"\x89PNG")
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(str(write_pdf(root / "plain.tmp", ["Secret"]))))
    writer.encrypt("secret", algorithm="RC4-128")
    writer.write(str(root / "locked.pdf"))
    (root / "plain.tmp").unlink()
    return root


def test_folder_kinds_ids_and_skips(folder):
    result = read_documents([folder])
    docs = {d.doc_id: d for d in result.documents}
    assert sorted(docs) == [
        "guide/install.md",
        "notes.txt",
        "page.html",
        "paper.pdf",
        "rows.jsonl:3",  # its line number (the blank line counts)
        "rows.jsonl:a",
        "tool.py",
    ]
    assert [d.doc_id for d in result.documents] == sorted(docs)
    assert result.skipped == {
        "binary": 1,
        "empty": 1,
        "undecodable": 1,
        "unreadable_pdf": 1,
        "encrypted_pdf": 1,
        "unsupported": 1,
        "bad_jsonl": 1,
    }
    assert ("locked.pdf", "encrypted_pdf") in result.skipped_files
    md = docs["guide/install.md"]
    assert md.metadata == {"path": "guide/install.md", "title": "Install", "kind": "markdown"}
    assert md.content_hash == text_hash(md.text) and len(md.content_hash) == 64
    assert docs["tool.py"].metadata["kind"] == "python"
    row = docs["rows.jsonl:a"]
    assert row.text == "Row A text." and row.metadata["lang"] == "en" and row.metadata["path"] == "rows.jsonl"
    pdf = docs["paper.pdf"]
    assert pdf.text == "Hello page one\n\nSecond page here"
    assert pdf.metadata["pages"] == [[0, 1], [16, 2]]
    html = docs["page.html"]
    assert html.metadata["title"] == "The Page"
    assert "secret" not in html.text and "alert" not in html.text and "color" not in html.text
    assert html.text == "Heading\n\nFirst & para.\n\none\n\ntwo"


def test_ids_are_stable_relative_to_the_root(folder):
    again = read_documents([folder / "guide"])
    assert [d.doc_id for d in again.documents] == ["install.md"]
    globbed = read_documents([str(folder / "**" / "*.md")])
    assert [d.doc_id for d in globbed.documents] == ["guide/install.md"]  # empty.md: skipped
    assert globbed.skipped == {"empty": 1}
    one = read_documents([folder / "notes.txt", folder / "guide" / "install.md"])
    assert [d.doc_id for d in one.documents] == ["guide/install.md", "notes.txt"]


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(DataError, match="not a file or folder"):
        read_documents([tmp_path / "nope"])
    with pytest.raises(DataError, match="matches no file"):
        read_documents([str(tmp_path / "*.md")])


def test_html_text_drops_scripts_and_keeps_pre():
    text, title = html_text(
        "<title> A  B </title><pre>x  = 1\ny = 2</pre><noscript>no</noscript><p>a\n b</p>"
    )
    assert title == "A B"
    assert text == "x  = 1\ny = 2\n\na b"
