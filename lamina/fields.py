"""Config fields from text: one path for run YAML files, CLI flags and Python keywords.

A config is a dataclass (``ModelConfig``, ``TrainConfig``, ``GenerationConfig``, ``ServeConfig``, ...)
or the keyword parameters of a library function. Each field has one name, one type annotation, one
default and one help text (the comment on its line in the source, or ``metadata={"help": ...}``).
Everything else is derived from that:

- ``coerce(text, annotation)`` reads a value written as text (a flag's argument, or a YAML scalar read
  as text) by the field's type: ``--choices '[yes, no]'`` stays two strings for a ``list[str]`` field
  (plain YAML would read booleans), ``--logit-bias '{50256: -100}'`` becomes ``{50256: -100.0}`` for a
  ``dict[int, float]`` field, ``null``/``none``/``~`` is None where None is allowed, ``3e-4`` is a float.
- ``read_yaml(path)`` reads a run config file with every scalar kept as text, so a file goes through the
  same ``coerce`` as a flag.
- ``build(cls, data)`` makes the dataclass from a mapping: unknown keys are errors naming the nearest
  field, text values are coerced, and the class's own rules run first (``cls.resolve_dict(data)``: a
  preset filling defaults, "setting epochs clears max_steps"), then its ``__post_init__`` validation.

``lamina.cli.flags`` turns the same fields into ``argparse`` flags.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import os
import re
import textwrap
import tokenize
import types
import typing
from collections import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from lamina.errors import ConfigError

T = TypeVar("T")

NONE_WORDS = ("null", "none", "~", "")
TRUE_WORDS = ("true", "yes", "on", "1", "y")
FALSE_WORDS = ("false", "no", "off", "0", "n")
ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
"""Other spellings of a choice, read wherever that choice is allowed: torch's dtype names
(``--dtype float16`` is ``fp16``, ``precision: bfloat16`` is ``bf16``)."""


@dataclass(frozen=True)
class Field:
    """One settable field of a config: its name, type annotation, default and help text.

    ``default`` is ``dataclasses.MISSING`` for a required field. ``parse`` (from
    ``metadata={"parse": fn}``) reads the field's text form when the type alone cannot (sizes such as
    ``200K``).
    """

    name: str
    type: Any
    default: Any
    help: str = ""
    parse: Callable[[str], Any] | None = None

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING


def fields_of(source: Any, skip: tuple[str, ...] = ()) -> list[Field]:
    """The settable fields of a config dataclass, or the keyword parameters of a function.

    For a function, parameters without an annotation, ``*args``/``**kwargs`` and those in ``skip`` are
    left out; help comes from ``name: text`` lines of its docstring's ``Args:`` section.
    """
    if dataclasses.is_dataclass(source):
        hints = typing.get_type_hints(source)
        docs = _comment_docs(source)  # type: ignore[arg-type]
        out = []
        for f in dataclasses.fields(source):
            if f.name in skip or not f.init or f.name.startswith("_"):
                continue
            default = (
                f.default
                if f.default is not dataclasses.MISSING
                else f.default_factory()
                if f.default_factory is not dataclasses.MISSING
                else dataclasses.MISSING
            )
            out.append(
                Field(f.name, hints[f.name], default, f.metadata.get("help") or docs.get(f.name, ""),
                      f.metadata.get("parse"))
            )  # fmt: skip
        return out
    docs = _docstring_args(inspect.getdoc(source) or "")
    out = []
    for p in inspect.signature(source).parameters.values():
        if p.name in skip or p.annotation is p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        tp = _annotation(source, p.annotation)
        if tp is None:  # a type only checkers see (a model object): not settable from text
            continue
        default = p.default if p.default is not p.empty else dataclasses.MISSING
        out.append(Field(p.name, tp, default, docs.get(p.name, "")))
    return out


def _annotation(func: Any, annotation: Any) -> Any:
    """A parameter's annotation evaluated in its function's module (one at a time: another parameter's
    type may exist only for type checkers)."""
    if not isinstance(annotation, str):
        return annotation
    try:
        return eval(annotation, vars(inspect.getmodule(func)))
    except NameError:
        return None


def parse_size(text: str) -> int:
    """``"50M"`` -> 50_000_000: a count of bytes or tokens with an optional suffix (K, M, G are powers of
    1000; KiB, MiB, GiB of 1024). Raises ``ValueError`` for anything else."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?(?:[eE]\d+)?)\s*([KMG]i?)?B?\s*", text, re.IGNORECASE)
    if m is None:
        raise ValueError("is not a size: use a number, optionally with K, M or G (e.g. 50M)")
    unit = (m.group(2) or "").upper()
    base = 1024 if unit.endswith("I") else 1000
    return int(float(m.group(1)) * base ** {"": 0, "K": 1, "M": 2, "G": 3}[unit[:1]])


SIZE = {"parse": parse_size}
"""``field(metadata=SIZE)``: the field's text form may be a size such as ``50M`` or ``4MiB``."""


# -- text -> typed values --------------------------------------------------------------------------------
def coerce(value: Any, tp: Any, name: str = "value", parse: Callable[[str], Any] | None = None) -> Any:
    """``value`` read as type ``tp``: text is parsed by the type, typed values pass through (checked later).

    Raises ``ConfigError`` naming ``name`` when text cannot be read as ``tp``.
    """
    if isinstance(value, str) and parse is not None and value.strip().lower() not in NONE_WORDS:
        try:
            return parse(value)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{name}={value!r}: {e}") from None
    try:
        return _coerce(value, tp)
    except _CoerceError as e:
        raise ConfigError(f"{name}={value!r} {e}") from None


class _CoerceError(ValueError):
    pass


def _coerce(value: Any, tp: Any) -> Any:
    if tp is Any or tp is object:
        return parse_text(value) if isinstance(value, str) else value
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union or origin is types.UnionType:
        if isinstance(value, str) and type(None) in args and value.strip().lower() in NONE_WORDS:
            return None
        options = [a for a in args if a is not type(None)]
        if not isinstance(value, str | list | dict):
            return value
        errors = []
        for option in sorted(options, key=_try_order):  # str last: "3" is an int before it is a string
            try:
                return _coerce(value, option)
            except _CoerceError as e:
                errors.append(str(e))
        raise _CoerceError(" or ".join(errors))
    if origin is Literal:
        if not isinstance(value, str):
            return value
        for choice in args:
            if isinstance(choice, str) and choice in (value, ALIASES.get(value)):
                return choice
        for choice in args:  # non-string literals (numbers, booleans) written as text
            if not isinstance(choice, str):
                try:
                    if _coerce(value, type(choice)) == choice:
                        return choice
                except _CoerceError:
                    pass
        aliases = [k for k, v in ALIASES.items() if v in args]
        hint = did_you_mean(value, [a for a in args if isinstance(a, str)] + aliases)
        also = f" (or torch's names {', '.join(repr(a) for a in aliases)})" if aliases else ""
        raise _CoerceError(
            f"is not one of {', '.join(repr(a) for a in args)}{also}{hint if '(' in hint else ''}"
        )
    if origin in (list, tuple, set, abc.Sequence):
        (item,) = args[:1] or (Any,)
        if isinstance(value, str):
            text = value.strip()
            # one item needs no brackets; its \n, \t, \\ are read as llama.cpp reads them (--stop '\n')
            value = _load_text(text) if text.startswith("[") else [_unescape(value)]
        if not isinstance(value, list | tuple):
            raise _CoerceError(f"must be a list, e.g. '[a, b]'")  # noqa: F541
        return [_coerce(v, item) for v in value]
    if origin is dict:
        key_tp, val_tp = args or (Any, Any)
        if isinstance(value, str):
            value = _load_text(value)
        if not isinstance(value, dict):
            raise _CoerceError("must be a mapping, e.g. '{key: value}'")
        return {_coerce(k, key_tp): _coerce(v, val_tp) for k, v in value.items()}
    if not isinstance(value, str):
        return value
    text = value.strip()
    if tp is bool:
        if text.lower() in TRUE_WORDS:
            return True
        if text.lower() in FALSE_WORDS:
            return False
        raise _CoerceError("must be true or false")
    if tp is int:
        if re.fullmatch(r"[+-]?\d[\d_]*", text):
            return int(text)
        if re.fullmatch(r"[+-]?\d+(\.0*)?[eE]\+?\d+", text) and float(text).is_integer():
            return int(float(text))  # 1e6
        raise _CoerceError("must be an integer")
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise _CoerceError("must be a number") from None
    if tp is str:
        return value
    if isinstance(tp, type) and issubclass(tp, os.PathLike | Path):
        return Path(value)
    raise _CoerceError(f"cannot be read as {tp}")


def _unescape(text: str) -> str:
    """``\\n``, ``\\t``, ``\\r``, ``\\\\``, ``\\"`` and ``\\'`` as the characters they name (llama.cpp's
    ``--escape``); any other backslash stays."""
    table = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'"}
    return re.sub(r"\\(.)", lambda m: table.get(m.group(1), m.group(0)), text)


def _try_order(tp: Any) -> int:
    return 2 if tp is str else 1 if get_origin(tp) in (list, dict) else 0


class _TextLoader(yaml.SafeLoader):
    """YAML with every scalar kept as text: types come from the field, not from YAML's guesses."""


# Only the plain scalar resolvers go: quoted strings, lists and mappings are read as usual.
_TextLoader.yaml_implicit_resolvers = {}


def _load_text(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_TextLoader)
    except yaml.YAMLError as e:
        raise _CoerceError(f"is not valid YAML ({str(e).splitlines()[0]})") from None


def parse_text(text: str) -> Any:
    """YAML text with YAML's own types (for fields typed ``Any``)."""
    return parse_yaml(text)


class _YAMLLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` as a float (YAML 1.1 wants ``1.0e-5``), as people write it."""


_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """Parse YAML text safely (no Python objects), reading ``1e-5`` as a float."""
    return yaml.load(text, Loader=_YAMLLoader)


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A run config file as a mapping whose scalars are text (``coerce`` gives them their field's type).

    Raises ``ConfigError`` if the file is missing, is not YAML, or is not a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_TextLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of field: value, got {type(data).__name__}")
    return data


# -- mapping -> dataclass --------------------------------------------------------------------------------
def build(cls: type[T], data: Mapping[str, Any] | None = None, where: str | None = None) -> T:
    """The config ``cls`` from ``data`` (field name -> typed value or text).

    Order: unknown keys are refused (naming the nearest field); text values are coerced by the field's
    type; ``cls.resolve_dict(data)`` applies the class's rules between fields (presets, exclusive
    fields); then the dataclass is made and validates itself. Raises ``ConfigError``.
    """
    if data is None:
        data = {}
    label = where or cls.__name__
    if not isinstance(data, Mapping):
        raise ConfigError(f"{label} must be a mapping of field: value, got {type(data).__name__}")
    extra = tuple(getattr(cls, "EXTRA_KEYS", ()))  # keys the class's resolve_dict consumes ("preset")
    specs = {f.name: f for f in fields_of(cls)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in extra:
            values[key] = value
            continue
        if key not in specs:
            raise ConfigError(f"unknown {label} field {key!r}{did_you_mean(key, [*specs, *extra])}")
        spec = specs[key]
        values[key] = coerce(value, spec.type, f"{label}.{key}" if where else key, spec.parse)
    resolve = getattr(cls, "resolve_dict", None)
    if resolve is not None:
        values = resolve(values)
    try:
        return cls(**values)
    except TypeError as e:  # a required field missing
        raise ConfigError(f"cannot build {label}: {e}") from None


def did_you_mean(key: str, choices: Any) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, else ``; valid: ...`` (short lists only)."""
    choices = list(choices)
    close = difflib.get_close_matches(key, choices, n=3, cutoff=0.5)
    if close:
        return f" (did you mean {', '.join(repr(c) for c in close)}?)"
    return f"; valid: {', '.join(choices)}" if len(choices) <= 12 else ""


# -- help texts from the source ------------------------------------------------------------------------
@cache
def _comment_docs(cls: type) -> dict[str, str]:
    """``{field: text}`` from the comment on each field's line (or the comment lines right above it)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        comments: dict[int, str] = {}
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
        tree = ast.parse(source)
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node in body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                line = node.end_lineno or node.lineno
                text = comments.get(line) or comments.get(node.lineno)
                above: list[str] = []
                n = node.lineno - 1
                while n in comments and not _is_code_line(source, n) and not comments[n].startswith("--"):
                    above.insert(0, comments[n])
                    n -= 1
                docs[node.target.id] = text or " ".join(above)
    return {k: v for k, v in docs.items() if v and not v.startswith(("fmt:", "type:", "noqa"))}


def _is_code_line(source: str, lineno: int) -> bool:
    line = source.splitlines()[lineno - 1].strip()
    return not line.startswith("#")


def _docstring_args(doc: str) -> dict[str, str]:
    """``{name: text}`` from a docstring's ``Args:`` section (``name: text`` lines, indented follow-ups)."""
    out: dict[str, str] = {}
    in_args, current, indent = False, None, None
    for line in doc.splitlines():
        if line.strip() in ("Args:", "Arguments:", "Parameters:"):
            in_args = True
            continue
        if not in_args:
            continue
        if not line.strip():
            current = None
            continue
        depth = len(line) - len(line.lstrip())
        if depth == 0:
            break
        m = re.match(r"\s+(?:``)?(\w+)(?:``)?(?: \([^)]*\))?:\s*(.*)", line)
        if m and (indent is None or depth == indent):
            indent = depth
            current = m.group(1)
            out[current] = m.group(2).strip()
        elif current and indent is not None and depth > indent:
            out[current] += " " + line.strip()
    return out
