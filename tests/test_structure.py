"""Structure the architecture promises, kept true by walking lamina's imports with ``ast``:

- no import circle among lamina's modules through imports that run when a module is imported (module level,
  ``if TYPE_CHECKING:`` blocks excluded); circles closed only by imports inside functions (lazy) are
  reported as a warning, not failed;
- ``lamina/model`` never imports generate, train, serve or cli (data flows one way);
- ``import lamina`` pulls in none of the heavy optional extras.

An edge goes to the module an import names: ``from lamina.a import b`` is ``lamina.a.b`` when that is a
module, else ``lamina.a``. Parent packages are not edges (Python has them half-initialised already).
"""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "lamina"
HEAVY = (
    "fastapi",
    "uvicorn",
    "matplotlib",
    "tensorboard",
    "transformers",
    "sentence_transformers",
    "pydantic",
)
MODEL_MUST_NOT_IMPORT = ("lamina.generate", "lamina.train", "lamina.serve", "lamina.cli")


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported lamina module
    kind: str  # "module" (runs at import time), "lazy" (inside a function) or "typing" (TYPE_CHECKING)
    line: int


@cache
def modules() -> dict[str, Path]:
    """Every lamina module name -> its file (a package is its __init__.py)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _target(name: str) -> str | None:
    """The lamina module an import of ``name`` runs: the longest prefix that is a module."""
    known = modules()
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in known:
            return ".".join(parts[:n])
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, kind: str) -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, kind
        elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from _walk(child, "lazy" if kind == "module" else kind)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), "typing")
            for stmt in child.orelse:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), kind)
        else:
            yield from _walk(child, kind)


@cache
def imports() -> tuple[Import, ...]:
    """Every import of a lamina module by a lamina module, static (``importlib`` calls are not seen)."""
    out = []
    for module, path in modules().items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node, kind in _walk(ast.parse(path.read_text(), str(path)), "module"):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                names = [f"{base}.{a.name}" if _target(f"{base}.{a.name}") == f"{base}.{a.name}" else base
                         for a in node.names]  # fmt: skip
            for name in names:
                target = _target(name) if name == "lamina" or name.startswith("lamina.") else None
                if target is not None and target != module:
                    out.append(Import(module, target, kind, node.lineno))
    first = {(i.source, i.target, i.kind): i for i in reversed(out)}  # one per edge and kind, first line
    return tuple(sorted(first.values(), key=lambda i: (i.source, i.line, i.target)))


def _graph(kinds: set[str]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in modules()}
    for imp in imports():
        if imp.kind in kinds:
            graph[imp.source].add(imp.target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest circle per strongly connected component of more than one module (Tarjan, then BFS)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:  # recursion depth <= number of modules (~100)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    circles = []
    for comp in components:
        start = min(comp)
        prev: dict[str, str] = {}
        queue = deque([start])
        while queue:
            v = queue.popleft()
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    circles.append([*reversed(path), start])
                    queue.clear()
                    break
                if w not in prev:
                    prev[w] = v
                    queue.append(w)
    return sorted(circles)


def _describe(circle: list[str], kinds: set[str]) -> str:
    steps = []
    for a, b in itertools.pairwise(circle):
        how = next(i for i in imports() if i.source == a and i.target == b and i.kind in kinds)
        steps.append(f"{a} -({how.kind}, line {how.line})->")
    return " ".join([*steps, circle[-1]])


def test_the_walk_sees_the_imports_it_should() -> None:
    """The walker and the circle finder themselves, so that a passing structure test means something."""
    snippet = """
import a
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    import b
else:
    import c
try:
    import d
except ImportError:
    pass
class K:
    import e
    def f(self):
        import g
def h():
    if TYPE_CHECKING:
        import i
    return lambda: 0
"""
    kinds = {
        n.names[0].name: kind for n, kind in _walk(ast.parse(snippet), "module") if isinstance(n, ast.Import)
    }
    assert kinds == {"a": "module", "b": "typing", "c": "module", "d": "module", "e": "module", "g": "lazy",
                     "i": "typing"}  # fmt: skip
    found = {(i.source, i.target, i.kind) for i in imports()}
    assert ("lamina.checkpoint.load", "lamina.checkpoint.registry", "module") in found
    assert ("lamina", "lamina.checkpoint.load", "typing") in found  # lamina's public names are lazy
    assert ("lamina.checkpoint.hf", "lamina.tokenizer", "typing") in found
    assert len(modules()) > 30 and "lamina.model" in modules()
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}) == [
        ["a", "b", "c", "a"]
    ]


def test_no_import_circle_at_module_level() -> None:
    kinds = {"module"}
    circles = _cycles(_graph(kinds))
    assert not circles, "import circles among lamina's modules (module-level imports):\n" + "\n".join(
        _describe(c, kinds) for c in circles
    )


def test_import_circles_through_lazy_imports_are_reported() -> None:
    """Circles that exist only through function-level or TYPE_CHECKING imports do not break importing, but
    they mark a layering to fix: listed as a warning."""
    kinds = {"module", "lazy", "typing"}
    eager = {frozenset(c) for c in _cycles(_graph({"module"}))}
    lazy = [c for c in _cycles(_graph(kinds)) if frozenset(c) not in eager]
    if lazy:
        warnings.warn(
            "import circles through lazy / TYPE_CHECKING imports:\n"
            + "\n".join(_describe(c, kinds) for c in lazy),
            stacklevel=1,
        )


def test_model_never_imports_the_layers_above_it() -> None:
    bad = [
        f"{i.source} imports {i.target} ({i.kind}, line {i.line})"
        for i in imports()
        if (i.source == "lamina.model" or i.source.startswith("lamina.model."))
        and (i.target == "lamina" or i.target.startswith(MODEL_MUST_NOT_IMPORT))
    ]
    assert not bad, "lamina/model reaches up the flow:\n" + "\n".join(bad)


def test_import_lamina_pulls_in_no_heavy_extra() -> None:
    code = f"import sys, lamina; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert out.stdout.strip() == "", f"`import lamina` imports {out.stdout.strip()}"


def test_test_modules_have_unique_names() -> None:
    """The tests folders are not packages (pytest's default import mode), so two test files with the same
    name in different folders stop the whole run at collection ("import file mismatch")."""
    tests = Path(__file__).resolve().parent
    seen: dict[str, list[str]] = {}
    for path in tests.rglob("test_*.py"):
        seen.setdefault(path.name, []).append(str(path.relative_to(tests)))
    clashes = {name: paths for name, paths in seen.items() if len(paths) > 1}
    assert not clashes, f"test files with the same name (rename one): {clashes}"
