"""Files -> :class:`~lamina.rag.types.Document`: folders and globs of text, Markdown, HTML, PDF, Python and
JSONL, with stable ids, content hashes and the files that could not be read counted by kind.

    result = read_documents(["docs/", "notes/*.md"])
    result.documents      # sorted by doc_id
    result.skipped        # Counter: {"binary": 2, "encrypted_pdf": 1, ...}

- ``doc_id`` is the file's path relative to the root (the deepest folder holding every path given, so
  indexing ``docs/`` again gives the same ids), with ``/`` separators; a JSONL line is
  ``"<path>:<line number>"`` (1-based), or ``"<path>:<id>"`` when the record has an ``id`` field.
- ``content_hash`` is the sha256 of the extracted text (it decides re-embedding).
- ``metadata``: ``path`` (the relative path), ``title`` (an HTML ``<title>``, a Markdown file's first
  heading, a PDF's title, else the file name), ``kind`` (``text``, ``markdown``, ``html``, ``pdf``,
  ``python``, ``jsonl``); PDFs add ``pages``, a list of ``[start_char, page_number]`` (1-based pages);
  a JSONL record adds its other scalar fields.
- HTML text comes from a real parser (:mod:`html.parser`): ``script``, ``style``, ``noscript``,
  ``template`` and ``head`` content (except the title) are dropped, block elements end lines.
- Skipped, counted by kind in ``skipped``: ``binary`` (a NUL byte in the first 8 KiB), ``undecodable``
  (not UTF-8), ``empty`` (no text after extraction), ``encrypted_pdf``, ``unreadable_pdf`` (pypdf cannot
  parse it), ``unreadable`` (an OS error), ``bad_jsonl`` (a line that is not a JSON object with the text
  field), and in folders ``unsupported`` (another extension). A file named explicitly is read as text
  whatever its extension. PDFs need the ``rag`` extra (``pip install lamina[rag]``: pypdf).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from lamina.errors import ConfigError, DataError
from lamina.rag.types import Document

__all__ = ["KINDS", "Ingested", "html_text", "read_documents", "text_hash"]

# extension -> kind of the files a folder walk picks up
KINDS = {
    ".txt": "text",
    ".text": "text",
    ".rst": "text",
    ".md": "markdown",
    ".markdown": "markdown",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
    ".py": "python",
    ".jsonl": "jsonl",
}
_SKIP_DIRS = frozenset({"__pycache__", "node_modules", ".git", ".hg", ".svn", ".venv", "venv"})


@dataclass
class Ingested:
    """The documents read (sorted by ``doc_id``), the number of files skipped per kind, and which files
    were skipped (``(relative path, kind)``)."""

    documents: list[Document]
    skipped: Counter[str] = field(default_factory=Counter)
    skipped_files: list[tuple[str, str]] = field(default_factory=list)


def text_hash(text: str) -> str:
    """sha256 of the UTF-8 text, hex: the content hash that decides re-embedding."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_documents(paths: Sequence[str | os.PathLike[str]], *, text_field: str = "text") -> Ingested:
    """Read every supported file under ``paths`` (folders, files or glob patterns) into documents.

    Raises ``DataError`` when a path matches nothing, or two files give the same ``doc_id``.

    Args:
        text_field: the JSONL field holding a record's text
    """
    if not paths:
        raise ConfigError("name at least one folder, file or glob pattern to read")
    files: list[tuple[Path, bool]] = []  # (file, named explicitly)
    tops: list[Path] = []
    for p in map(str, paths):
        if any(c in p for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(p, recursive=True))
            if not matches:
                raise DataError(f"{p!r} matches no file; check the pattern")
            for m in matches:
                files.extend(_walk(m) if m.is_dir() else [(m, False)])
            tops.append(_fixed_prefix(p))
        elif Path(p).is_dir():
            files.extend(_walk(Path(p)))
            tops.append(Path(p))
        elif Path(p).is_file():
            files.append((Path(p), True))
            tops.append(Path(p).parent)
        else:
            raise DataError(f"{p!r} is not a file or folder; check the path")
    root = Path(os.path.commonpath([t.resolve() for t in tops]))
    out = Ingested([])
    seen: dict[str, Path] = {}
    for path, explicit in sorted(set(files), key=lambda f: f[0].resolve().as_posix()):
        rel = path.resolve().relative_to(root).as_posix()
        kind = KINDS.get(path.suffix.lower())
        if kind is None and not explicit:
            out.skipped["unsupported"] += 1
            out.skipped_files.append((rel, "unsupported"))
            continue
        for doc_or_skip in _read(path, rel, kind or "text", text_field):
            if isinstance(doc_or_skip, str):
                out.skipped[doc_or_skip] += 1
                out.skipped_files.append((rel, doc_or_skip))
                continue
            if doc_or_skip.doc_id in seen:
                raise DataError(f"two inputs give the document id {doc_or_skip.doc_id!r}; index them apart")
            seen[doc_or_skip.doc_id] = path
            out.documents.append(doc_or_skip)
    out.documents.sort(key=lambda d: d.doc_id)
    return out


def _fixed_prefix(pattern: str) -> Path:
    """The folder part of a glob pattern before its first wildcard (``docs/**/*.md`` -> ``docs``)."""
    parts = Path(pattern).parts
    fixed = [p for p in parts[: next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))]]
    return Path(*fixed) if fixed else Path(".")


def _walk(folder: Path) -> list[tuple[Path, bool]]:
    found: list[tuple[Path, bool]] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        found.extend((Path(dirpath) / f, False) for f in sorted(filenames) if not f.startswith("."))
    return found


def _read(path: Path, rel: str, kind: str, text_field: str) -> Iterator[Document | str]:
    """The file's documents, or the kind of skip (a string) for what could not be read."""
    if kind == "pdf":
        yield _read_pdf(path, rel)
        return
    try:
        data = path.read_bytes()
    except OSError:
        yield "unreadable"
        return
    if b"\x00" in data[:8192]:
        yield "binary"
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        yield "undecodable"
        return
    if kind == "jsonl":
        yield from _read_jsonl(text, rel, text_field)
        return
    title = path.name
    if kind == "html":
        text, found = html_text(text)
        title = found or title
    elif kind == "markdown":
        m = re.search(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", text, re.MULTILINE)
        title = m.group(1).strip() if m else title
    if not text.strip():
        yield "empty"
        return
    yield Document(rel, text, text_hash(text), {"path": rel, "title": title, "kind": kind})


def _read_jsonl(text: str, rel: str, text_field: str) -> Iterator[Document | str]:
    any_line = False
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        any_line = True
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            yield "bad_jsonl"
            continue
        body = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(body, str):
            yield "bad_jsonl"
            continue
        if not body.strip():
            yield "empty"
            continue
        key = record.get("id")
        doc_id = f"{rel}:{key if isinstance(key, (str, int)) and not isinstance(key, bool) else n}"
        extra: dict[str, Any] = {
            k: v for k, v in record.items() if k != text_field and isinstance(v, (str, int, float, bool))
        }
        title = str(record.get("title", doc_id))
        yield Document(doc_id, body, text_hash(body), {**extra, "path": rel, "title": title, "kind": "jsonl"})
    if not any_line:
        yield "empty"


def _read_pdf(path: Path, rel: str) -> Document | str:
    try:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError
    except ImportError:
        raise ConfigError("reading PDFs needs pypdf: pip install 'lamina[rag]'") from None
    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted and not reader.decrypt(""):
            return "encrypted_pdf"
        parts: list[str] = []
        pages: list[list[int]] = []
        at = 0
        for number, page in enumerate(reader.pages, 1):
            text = (page.extract_text() or "").strip()
            if not text:
                continue
            if parts:
                parts.append("\n\n")
                at += 2
            pages.append([at, number])
            parts.append(text)
            at += len(text)
        meta = reader.metadata
        title = str(meta.get("/Title") or "") if meta is not None else ""
        title = title or path.name
    except (PdfReadError, OSError, ValueError, KeyError, TypeError):
        return "unreadable_pdf"
    except Exception as e:  # pypdf raises other errors on broken files (and on encrypted ones it cannot open)
        return (
            "encrypted_pdf"
            if "encrypt" in str(e).lower() or "crypt" in type(e).__name__.lower()
            else "unreadable_pdf"
        )
    text = "".join(parts)
    if not text.strip():
        return "empty"
    return Document(rel, text, text_hash(text), {"path": rel, "title": title, "kind": "pdf", "pages": pages})


_BLOCK = frozenset(
    [
        "p",
        "div",
        "section",
        "article",
        "header",
        "footer",
        "main",
        "nav",
        "aside",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "ul",
        "ol",
        "li",
        "dl",
        "dt",
        "dd",
        "table",
        "tr",
        "blockquote",
        "pre",
        "br",
        "hr",
        "form",
        "figure",
        "figcaption",
        "details",
        "summary",
        "address",
    ]
)
_DROP = frozenset({"script", "style", "noscript", "template", "head", "svg"})


class _TextParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title: list[str] = []
        self.drop = 0
        self.in_title = False
        self.pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self.in_title = True
        elif tag in _DROP:
            self.drop += 1
        elif tag in _BLOCK:
            self.parts.append("\n")
            self.pre += tag == "pre"
        elif tag in ("td", "th"):
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self.in_title = False
        elif tag in _DROP:
            self.drop = max(0, self.drop - 1)
        elif tag in _BLOCK:
            self.parts.append("\n")
            self.pre -= tag == "pre" and self.pre > 0

    def handle_data(self, data: str) -> None:
        if self.in_title:
            self.title.append(data)
        elif not self.drop:
            self.parts.append(data if self.pre else re.sub(r"[ \t\r\n]+", " ", data))


def html_text(html: str) -> tuple[str, str]:
    """The visible text of an HTML page and its ``<title>``: scripts, styles and ``<head>`` dropped,
    block elements (paragraphs, headings, list items, rows) on lines of their own, paragraphs apart."""
    parser = _TextParser()
    parser.feed(html)
    parser.close()
    text = "".join(parser.parts)
    lines = [line.strip() for line in text.split("\n")]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    return text, " ".join("".join(parser.title).split())
