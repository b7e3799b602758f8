"""The built-in corpus ``stdlib-docs``: the running Python's standard-library documentation, as documents.

Every machine with lamina has it, so ``lamina index --builtin stdlib-docs`` and the retrieval tests need no
download. One :class:`~lamina.rag.types.Document` per documented public object: each module (its
docstring), each public class and function it exports, and each public method of those classes
(``str.split``, ``pathlib.Path.read_text``). The text is the object's signature (where ``inspect`` finds
one) and its docstring, never the ``.py`` source.

- ``doc_id`` is the shortest public qualified name that reaches the object: ``csv.DictReader``,
  ``json.loads``, ``os.path.join`` (not ``posixpath.join``), ``asyncio.sleep`` (not ``asyncio.tasks.sleep``);
  an object exported by several modules is one document (ties: the module it comes from, then the name).
- ``metadata``: ``path`` (the doc_id), ``title`` (the doc_id), ``kind`` (``module``, ``class``,
  ``function``, ``method``), ``module``, and ``lead``: the ``[start, end)`` span of the docstring's first
  paragraph (the one after the signature line), when the text has more than that paragraph and is longer
  than :data:`LEAD_MIN_CHARS`. The chunker
  indexes it as one more entry of the document (:meth:`lamina.rag.chunk.Chunker.chunk`): MiniLM mean-pools
  over every token, so a chunk opening with a long signature and going on with details embeds farther from
  a question than its one-line summary does (measured on the shipped questions: dense recall@5
  0.533 -> 0.563 with the lead entries, see the README's RAG section).
- Left out: private names (a leading ``_``), test suites, GUI and side-effect modules (:data:`SKIP`),
  codecs (``encodings.*``), the other OS's path module, objects without a docstring, and modules that fail
  to import or write to stdout/stderr when imported.
- The order is sorted by ``doc_id``, so the corpus is the same on every run of the same Python.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import pkgutil
import re
import sys
import warnings
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import Any

from lamina.rag.types import Document

__all__ = ["LEAD_MIN_CHARS", "SKIP", "lead_span", "module_names", "stdlib_documents"]

# Top-level modules never imported: test suites, GUIs, modules that act when imported (``this`` prints,
# ``antigravity`` opens a browser), Windows/macOS-only modules, deprecated tool packages and codecs.
SKIP = frozenset(
    {
        "test", "idlelib", "tkinter", "turtle", "turtledemo", "this", "antigravity", "lib2to3", "pydoc_data",
        "ensurepip", "distutils", "encodings", "msilib", "winreg", "winsound", "msvcrt", "nt", "ntpath", "posixpath",
        "nturl2path", "_winapi", "__main__", "__phello__", "sre_compile", "sre_constants", "sre_parse",
        "genericpath", "posix",  # re-exported by os.path and os, where users look for them
    }
)  # fmt: skip
_SKIP_PARTS = frozenset({"test", "tests", "idle_test", "__main__"})
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # object reprs in signatures: not the same on every run
_PARAGRAPH = re.compile(r"\n[ \t]*\n")  # a blank line between paragraphs
# documents up to this long get no lead entry: they are little more than their lead already (on the dev
# half of the shipped questions a lead for every document and one past 200 characters measured the same,
# and the 200-character cut embeds 2,173 leads instead of 5,674)
LEAD_MIN_CHARS = 200


def module_names(tops: Iterable[str] | None = None) -> list[str]:
    """The public standard-library modules (only the packages ``tops`` when given), submodules included,
    sorted; a module that fails to import is left out, with its submodules."""
    names: set[str] = set()
    wanted = sorted(sys.stdlib_module_names) if tops is None else sorted({t.split(".")[0] for t in tops})
    for top in wanted:
        if top.startswith("_") or top in SKIP or top not in sys.stdlib_module_names:
            continue
        module = _import(top)
        if module is None:
            continue
        names.add(top)
        if top == "os":
            names.add("os.path")
        if not hasattr(module, "__path__"):
            continue
        for info in pkgutil.walk_packages(module.__path__, prefix=top + ".", onerror=lambda _: None):
            parts = info.name.split(".")
            if any(p.startswith("_") or p in _SKIP_PARTS for p in parts):
                continue
            names.add(info.name)
    return sorted(names)


def stdlib_documents(modules: Iterable[str] | None = None) -> list[Document]:
    """The corpus as documents sorted by ``doc_id``; ``modules`` (``["csv", "json"]``) takes only those
    modules and their submodules (a subset for tests); an unknown or unimportable name is left out."""
    if modules is None:
        names = module_names()
    else:
        wanted = list(modules)
        names = [n for n in module_names(wanted) if any(n == w or n.startswith(w + ".") for w in wanted)]
    loaded = [(name, m) for name in names if (m := _import(name)) is not None]
    # every (public name, object) a module exports; an object exported by several modules is documented
    # under its shortest name (fewest dots, then the module it comes from, then alphabetical)
    best: dict[int, tuple[tuple[int, int, str], str, str, Any]] = {}
    docs: list[Document] = []
    for name, module in loaded:
        if module.__doc__ and module.__doc__.strip():
            docs.append(_document(name, "module", name, inspect.cleandoc(module.__doc__)))
        for attr, obj in _exports(name, module):
            qual = attr if name == "builtins" else f"{name}.{attr}"  # str.split, not builtins.str.split
            home = getattr(obj, "__module__", "") or ""
            key = (qual.count("."), 0 if home == _real(module) or home.startswith(name) else 1, qual)
            if id(obj) not in best or key < best[id(obj)][0]:
                best[id(obj)] = (key, qual, name, obj)
    for _, qual, name, obj in best.values():
        text = _described(qual, obj) or (_undocumented_class(qual, obj) if inspect.isclass(obj) else "")
        if text and inspect.isclass(obj):
            text += _members(obj)
        if text:
            docs.append(_document(qual, "class" if inspect.isclass(obj) else "function", name, text))
        if inspect.isclass(obj):
            docs.extend(_methods(qual, name, obj))
    seen: set[str] = set()
    unique = []
    for d in sorted(docs, key=lambda d: d.doc_id):
        if d.doc_id not in seen:
            seen.add(d.doc_id)
            unique.append(d)
    return unique


def _document(doc_id: str, kind: str, module: str, text: str) -> Document:
    meta: dict[str, Any] = {"path": doc_id, "title": doc_id, "kind": kind, "module": module}
    span = lead_span(text, skip_first=kind != "module") if len(text) > LEAD_MIN_CHARS else None
    hashed = text
    if span is not None:
        meta["lead"] = list(span)
        hashed += f"\0lead {span[0]} {span[1]}"  # an index built before leads existed re-embeds once
    return Document(doc_id, text, hashlib.sha256(hashed.encode("utf-8")).hexdigest(), meta)


def lead_span(text: str, skip_first: bool = True) -> tuple[int, int] | None:
    """The ``(start, end)`` of the first paragraph of ``text`` after its signature paragraph (the first
    one itself with ``skip_first=False``: a module's docstring has no signature); None when that
    paragraph is the whole text, missing, or the ``Members:`` line."""
    bounds = [0] + [m.end() for m in _PARAGRAPH.finditer(text)]
    ends = [m.start() for m in _PARAGRAPH.finditer(text)] + [len(text)]
    at = 1 if skip_first else 0
    if at >= len(bounds):
        return None
    a, b = bounds[at], ends[at]
    if a >= b or text[a:b].startswith("Members:") or (a, b) == (0, len(text)):
        return None
    return a, b


def _real(module: ModuleType) -> str:
    return module.__name__


def _import(name: str) -> ModuleType | None:
    """The module, or None when importing it fails or writes anything to stdout/stderr."""
    if name in sys.modules:
        return sys.modules[name]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module(name)
    except BaseException:  # ImportError, SystemExit, platform errors: leave the module out
        return None
    return None if out.getvalue() else module


def _documentable(obj: Any) -> bool:
    return inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)


def _exports(name: str, module: ModuleType) -> Iterator[tuple[str, Any]]:
    """Public classes and functions ``module`` exports: its ``__all__``, else public attributes defined in
    it, in a submodule of it or in a private (C) module (``csv.reader`` comes from ``_csv``)."""
    real = module.__name__
    listed = getattr(module, "__all__", None)
    for attr in sorted(set(listed) if isinstance(listed, (list, tuple)) else dir(module)):
        if not isinstance(attr, str) or attr.startswith("_"):
            continue
        obj = getattr(module, attr, None)
        if not _documentable(obj):
            continue
        if listed is None:
            home = getattr(obj, "__module__", None) or ""
            if not (
                home in (real, name) or home.startswith(real + ".") or home.split(".")[-1].startswith("_")
            ):
                continue
        yield attr, obj


def _methods(qual: str, module: str, cls: type) -> Iterator[Document]:
    """The class's own public methods with a docstring of their own (not inherited from a base)."""
    for attr, raw in sorted(vars(cls).items()):
        if attr.startswith("_"):
            continue
        obj = raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw
        if isinstance(raw, property):
            obj = raw.fget
        if not (inspect.isfunction(obj) or inspect.ismethoddescriptor(obj) or inspect.isbuiltin(obj)):
            continue
        doc = getattr(obj, "__doc__", None)
        if any(
            getattr(b, attr, None) is not None and getattr(getattr(b, attr), "__doc__", None) == doc
            for b in cls.__mro__[1:]
        ):
            continue  # inherited wording (an override that kept its base's docstring): the base documents it
        text = _described(f"{qual}.{attr}", obj)
        if text:
            yield _document(f"{qual}.{attr}", "method", module, text)


def _public_members(cls: type) -> list[str]:
    return sorted(a for a in vars(cls) if not a.startswith("_"))


def _members(cls: type) -> str:
    """A line naming the class's own public methods and attributes (links the class to its methods)."""
    names = _public_members(cls)
    return f"\n\nMembers: {', '.join(names)}." if names else ""


def _undocumented_class(qual: str, cls: type) -> str:
    """A class without a docstring (``csv.DictReader`` has none): its signature, its ``__init__``'s
    docstring when it has one, and the module it belongs to."""
    init = vars(cls).get("__init__")
    doc = inspect.cleandoc(init.__doc__) if inspect.isfunction(init) and init.__doc__ else ""
    try:
        sig = _ADDRESS.sub("", str(inspect.signature(cls)))
    except Exception:  # no signature
        sig = ""
    module = qual.rsplit(".", 1)[0] if "." in qual else "builtins"
    return f"{qual}{sig}\n\nClass {qual.rsplit('.', 1)[-1]} of the {module} module." + (
        f"\n\n{doc}" if doc else ""
    )


def _described(qual: str, obj: Any) -> str:
    """``qual(signature)`` then the cleaned docstring; empty when the object has no docstring of its own."""
    doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
    if not doc or not doc.strip():
        return ""
    doc = inspect.cleandoc(doc)
    try:
        sig = str(inspect.signature(obj))
    except Exception:  # no signature (C objects, defaults that fail to evaluate)
        sig = ""
    head = qual + _ADDRESS.sub("", sig)
    if doc.startswith(qual.rsplit(".", 1)[-1] + "("):  # C functions open their docstring with a signature
        head = qual.rsplit(".", 1)[0] + "."
        return (head + doc) if "." in qual else doc
    return f"{head}\n\n{doc}"
