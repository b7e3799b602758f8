"""Flags from config fields: every verb builds its flags here, so a field's name, type, default, choices
and help live once, on the field (``lamina.fields``).

The naming rule: a flag is its field's name. A verb with one config takes ``--field-name`` (the
underscore spelling is accepted too); a verb with sections takes ``--section.field_name``. Booleans take
``--x`` / ``--no-x`` (or ``--x false``). Lists and mappings are written as YAML (``--stop '[".", "!"]'``,
``--logit-bias '{50256: -100}'``); a list of one item needs no brackets. Values are read by the field's
type, exactly as the same key in a ``--config`` YAML file is.

Flags default to "not given" (``argparse.SUPPRESS``): a verb sees only what the user set, merges it over
the ``--config`` file, and the dataclass supplies every other default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections import abc
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from lamina.fields import FALSE_WORDS, TRUE_WORDS, Field, fields_of, read_yaml

_DEST = "cfg:"  # argparse dest prefix of config flags: "cfg:train.lr", "cfg:top_k"


def flag_name(name: str, section: str | None = None) -> str:
    """``--top-k`` for a field of a one-config verb, ``--train.lr`` for a field of a section."""
    return f"--{section}.{name}" if section else "--" + name.replace("_", "-")


class HelpFormatter(argparse.HelpFormatter):
    """argparse's wrapping for descriptions; an epilog of several lines (examples) is kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "\n".join(indent + line for line in text.splitlines())
        return super()._fill_text(text, width, indent)


def add_fields(
    parser: argparse.ArgumentParser,
    source: Any,
    section: str | None = None,
    title: str | None = None,
    description: str | None = None,
    skip: Sequence[str] = (),
    defaults: Mapping[str, Any] | None = None,
    partial: bool = False,
) -> list[Field]:
    """Add one flag per field of ``source`` (a config dataclass or a function's keyword parameters).

    ``section`` names the ``--section.field`` prefix (None: ``--field-name``). The flags land in an
    argument group titled ``title`` (default: the section, or the class's name). ``defaults`` are the
    defaults to show in ``--help`` where the verb starts from other values than the class (a preset).
    ``partial``: the verb passes only the fields given on to a library that fills the rest itself (the
    model's own decoding defaults), so ``--print-config`` shows only those. Returns the fields.
    """
    name = getattr(source, "__name__", str(source))
    group = parser.add_argument_group(title or (f"{section} ({name})" if section else name), description)
    fields = fields_of(source, tuple(skip))
    if defaults:
        fields = [dataclasses.replace(f, default=defaults.get(f.name, f.default)) for f in fields]
    bools: set[str] = getattr(parser, "_lamina_bools", set())
    numeric: set[str] = getattr(parser, "_lamina_numeric_bools", set())
    for f in fields:
        flag = flag_name(f.name, section)
        dest = _DEST + (f"{section}.{f.name}" if section else f.name)
        if _is_bool(f.type):
            group.add_argument(flag, dest=dest, default=argparse.SUPPRESS, metavar="[BOOL]", help=_help(f))
            group.add_argument(
                "--no-" + flag[2:], dest=dest, action="store_const", const="false",
                default=argparse.SUPPRESS, help=argparse.SUPPRESS,
            )  # fmt: skip
            bools.add(flag)
            if f.parse is not None:  # it reads numbers itself (to refuse them: logprobs)
                numeric.add(flag)
        else:
            group.add_argument(flag, dest=dest, default=argparse.SUPPRESS, metavar=_metavar(f), help=_help(f))
    if "preset" in getattr(source, "EXTRA_KEYS", ()):
        names = source.preset_names()
        group.add_argument(
            flag_name("preset", section), dest=_DEST + (f"{section}.preset" if section else "preset"),
            default=argparse.SUPPRESS, metavar="{" + ",".join(names) + "}",
            help="start from this named set of fields; the other flags override it",
        )  # fmt: skip
    parser._lamina_bools = bools  # type: ignore[attr-defined]
    parser._lamina_numeric_bools = numeric  # type: ignore[attr-defined]
    if section is None:  # a one-config verb may combine several sources: values() sorts them out
        sources = [*(parser.get_default("_lamina_sources") or []), source]
        parser.set_defaults(_lamina_sources=sources)
        parser.set_defaults(
            _lamina_skips={**(parser.get_default("_lamina_skips") or {}), source: tuple(skip)}
        )
        if partial:
            parser.set_defaults(_lamina_partial=[*(parser.get_default("_lamina_partial") or []), source])
    return fields


def values(args: argparse.Namespace, source: Any) -> dict[str, Any]:
    """The fields of ``source`` set by ``--config`` and flags on a one-config verb, read by type.

    A file key that is a field of none of the verb's sources is a ``ConfigError`` naming the nearest.
    """
    from lamina.errors import ConfigError
    from lamina.fields import coerce, did_you_mean

    sources = getattr(args, "_lamina_sources", [])
    specs = {f.name: f for f in _fields(args, source)}
    known = {f.name for s in sources for f in _fields(args, s)}
    out: dict[str, Any] = {}
    for key, value in merged(args).items():
        if key not in known:
            where = f" in {args.config}" if getattr(args, "config", None) else ""
            raise ConfigError(f"unknown field {key!r}{where}{did_you_mean(key, sorted(known))}")
        if key in specs:
            out[key] = coerce(value, specs[key].type, key, specs[key].parse)
    return out


def add_alias(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    flag: str,
    source: Any,
    name: str,
    section: str | None = None,
    help: str | None = None,
    metavar: str | None = None,
    append: bool = False,
) -> None:
    """A short flag for one field (``--out`` for ``train.out_dir``): same field, type and help.

    ``append``: for a list field, each use of the flag adds one item (``--api-key A --api-key B``).
    """
    (f,) = [f for f in fields_of(source) if f.name == name]
    dest = _DEST + (f"{section}.{name}" if section else name)
    full = flag_name(name, section)
    if append:  # each use adds one item to the field's list (--api-key A --api-key B)
        parser.add_argument(flag, dest=dest, action="append", default=argparse.SUPPRESS, metavar=metavar,
                            help=help or f"one item of {full}; repeat for several")  # fmt: skip
        return
    parser.add_argument(
        flag, dest=dest, default=argparse.SUPPRESS, metavar=metavar or _metavar(f),
        help=help or f"= {full}: {_help(f)}",
    )  # fmt: skip


def add_top_level(parser: argparse.ArgumentParser, flag: str, name: str, help: str, metavar: str) -> None:
    """A top-level key of a sectioned run config (``--init MODEL`` is the file's ``init: MODEL``)."""
    parser.add_argument(flag, dest=_DEST + name, default=argparse.SUPPRESS, metavar=metavar, help=help)


def add_config_file(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` (YAML of the same fields; flags win) and ``--print-config``."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="a YAML file of the same fields (flags given too win over it)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config as YAML and exit (a file --config reads back)",
    )


def given(args: argparse.Namespace, section: str | None = None) -> dict[str, Any]:
    """The fields of ``section`` (None: a one-config verb's) set on the command line, as text."""
    out: dict[str, Any] = {}
    for key, value in vars(args).items():
        if not key.startswith(_DEST):
            continue
        sec, _, name = key[len(_DEST) :].rpartition(".")
        if (sec or None) == section:
            out[name] = value
    return out


def merged(args: argparse.Namespace, sections: Mapping[str, Any] | Sequence[str] = ()) -> dict[str, Any]:
    """The ``--config`` file (if any) with the flags set over it, field by field.

    For a one-config verb (``sections`` empty) a flat ``{field: value}``; else ``{section: {...}, ...}``
    plus any top-level keys of the file. Values from the file and flags are text until ``build`` reads
    them by type. When ``sections`` maps names to config classes, a class's ``EXCLUSIVE`` pairs apply
    across the layers: a flag that sets ``epochs`` drops the file's ``max_steps`` (and the other way
    round), as setting one in Python clears the other. A section written as ``null`` is left out.
    """
    from lamina.errors import ConfigError
    from lamina.fields import NONE_WORDS

    data = dict(_config_file(args))
    if not sections:
        return {**data, **given(args)}
    data.update(given(args))  # top-level keys (init)
    classes = sections if isinstance(sections, Mapping) else dict.fromkeys(sections)
    for section, cls in classes.items():
        current = data.get(section)
        if isinstance(current, str) and current.strip().lower() in NONE_WORDS:
            data.pop(section)
            current = None
        flags = given(args, section)
        if current is not None and not isinstance(current, dict):
            raise ConfigError(
                f"{section} in {args.config} must be a mapping of field: value, got {current!r}"
            )
        base = dict(current or {})
        for a, b in getattr(cls, "EXCLUSIVE", ()):
            for one, other in ((a, b), (b, a)):
                if one in flags and other not in flags:
                    base.pop(other, None)
        if flags or current is not None:
            data[section] = {**base, **flags}
    return data


def _config_file(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--config`` file's mapping, read once per command (every source of a verb asks for it)."""
    if not getattr(args, "config", None):
        return {}
    if getattr(args, "_lamina_file", None) is None:
        args._lamina_file = read_yaml(args.config)
    return args._lamina_file


def resolved(args: argparse.Namespace, source: Any) -> dict[str, Any]:
    """Every field of ``source`` as it will be used: given values (file + flags) over the defaults.

    A source the verb marked partial (``partial=True`` in ``add_fields``: decoding controls whose unset
    fields take the model's defaults) gives only the fields given; a field marked
    ``metadata={"secret": True}`` (API keys) appears only when given.
    """
    from lamina.fields import build

    given_values = values(args, source)
    if source in (getattr(args, "_lamina_partial", None) or []):
        return given_values
    if dataclasses.is_dataclass(source):
        out = dataclasses.asdict(build(source, given_values))  # type: ignore[arg-type]
        secret = {f.name for f in dataclasses.fields(source) if f.metadata.get("secret")}
        return {k: v for k, v in out.items() if k not in secret or k in given_values}
    out = {f.name: (None if f.required else f.default) for f in _fields(args, source)}
    return {**out, **given_values}


def _fields(args: argparse.Namespace, source: Any) -> list[Field]:
    """The fields of ``source`` the verb made flags of (its ``skip`` left out)."""
    return fields_of(source, (getattr(args, "_lamina_skips", None) or {}).get(source, ()))


def print_flat_config(args: argparse.Namespace) -> None:
    """``--print-config`` of a one-config verb: every source's resolved fields, as one YAML mapping."""
    data: dict[str, Any] = {}
    notes = []
    for source in args._lamina_sources:
        data.update(resolved(args, source))
        if source in (getattr(args, "_lamina_partial", None) or []):
            notes.append(
                f"# {getattr(source, '__name__', source)} fields not listed take the model's defaults"
            )
    for note in notes:
        print(note)
    print_config(data)


def print_config(data: Any) -> None:
    """Print a resolved config (a dataclass or a mapping of them) as YAML that ``--config`` reads back."""
    print(yaml.safe_dump(_plain(data), sort_keys=False, allow_unicode=True), end="")


def _plain(data: Any) -> Any:
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        return {f.name: _plain(getattr(data, f.name)) for f in dataclasses.fields(data) if f.init}
    if isinstance(data, dict):
        return {k: _plain(v) for k, v in data.items()}
    if isinstance(data, list | tuple | frozenset | set):
        return [_plain(v) for v in data]
    if hasattr(data, "__fspath__"):
        return str(data)
    return data


def normalize_argv(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``argv`` as the parser expects it: ``--top_k`` -> ``--top-k``, ``--train.out-dir`` ->
    ``--train.out_dir``, and a boolean flag without a value gets ``=true`` (``--compile MODEL`` must not
    read MODEL as the flag's value; ``--compile false`` still works). A boolean whose field parses its
    own text takes a number after it as its value, for the field to judge (``--logprobs 5`` is refused
    as ambiguous, not read as ``--logprobs`` and a stray ``5``)."""
    out: list[str] = []
    bools: set[str] = getattr(parser, "_lamina_bools", set())
    numeric: set[str] = getattr(parser, "_lamina_numeric_bools", set())
    bare: set[int] = set()  # where a boolean flag given without a value got =true (unknown_arguments)
    current = parser
    i = 0
    argv = list(argv)
    while i < len(argv):
        tok = argv[i]
        i += 1
        if tok == "--":
            out += argv[i - 1 :]
            break
        sub = _subparser(current, tok)
        if sub is not None:
            current = sub
            bools = getattr(sub, "_lamina_bools", set())
            numeric = getattr(sub, "_lamina_numeric_bools", set())
            out.append(tok)
            continue
        if not tok.startswith("--") or len(tok) == 2:
            out.append(tok)
            continue
        name, eq, value = tok[2:].partition("=")
        if "." in name:
            section, _, field = name.partition(".")
            name = f"{section}.{field.replace('-', '_')}"
        elif _known(current, "--" + name.replace("_", "-")):
            name = name.replace("_", "-")
        tok = f"--{name}{eq}{value}"
        flag = "--" + name
        if flag in bools and not eq:
            nxt = argv[i] if i < len(argv) else None
            if nxt is not None and (
                nxt.lower() in TRUE_WORDS + FALSE_WORDS
                or (flag in numeric and re.fullmatch(r"[+-]?\d+", nxt))
            ):
                tok, i = f"{flag}={nxt}", i + 1
            else:
                tok = f"{flag}=true"
                bare.add(len(out))
        out.append(tok)
    parser._lamina_bare_bools = bare  # type: ignore[attr-defined]
    return out


def could_be_bool(word: str) -> bool:
    """Whether ``word``, right after a boolean flag given bare, may be meant as the flag's (misspelt)
    value: one short word of letters, or a number (``maybe``, ``ture``, ``2``). A word with spaces,
    punctuation, or letters and digits mixed (a prompt, ``smollm2``, ``gpt/last``) cannot be one."""
    return len(word) <= 8 and re.fullmatch(r"[A-Za-z]+|[+-]?\d+", word) is not None


def bool_typos(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[int]:
    """Where in ``argv`` (``normalize_argv``'s output) a boolean flag given bare is followed by a word that
    could be its value (``could_be_bool``): that word must stay left over for ``unknown_arguments`` to
    name, not fill a positional (PROMPT)."""
    bare: set[int] = getattr(parser, "_lamina_bare_bools", set())
    return [j for j in sorted(bare) if j + 1 < len(argv) and could_be_bool(argv[j + 1])]


def verb_parser(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser of the verb (and action) that ``argv`` names: the one whose flags and positionals it
    fills (``parser`` itself when it names none)."""
    current = parser
    for tok in argv:
        current = _subparser(current, tok) or current
    return current


def unknown_arguments(parser: argparse.ArgumentParser, argv: Sequence[str], extra: Sequence[str]) -> None:
    """Exit (2) with the verb's own usage and "did you mean" for each unknown flag in ``extra``; a word
    left over right after a boolean flag given without a value, that could be its value (``--pad-shapes
    maybe``: ``could_be_bool``), is named as that flag's value: one line saying which values it takes and,
    where the verb takes an optional positional, how to give the word as that instead."""
    import difflib

    current = verb_parser(parser, argv)
    for j in bool_typos(parser, argv):
        word = argv[j + 1]
        if word in extra:
            flag = argv[j].partition("=")[0]
            optional = [str(a.metavar or a.dest.upper()) for a in current._actions
                        if not a.option_strings and a.nargs in ("?", "*", "+")]  # fmt: skip
            meant = f"; if {word!r} is the {' or '.join(optional)}, put it before {flag} or write {flag}=true"
            current.error(
                f"{flag} {word!r}: the flag is true or false (yes/no, on/off, 1/0; {flag} alone means "
                f"true){meant if optional else ''}"
            )
    hints = []
    for tok in extra:
        if tok.startswith("-"):
            near = difflib.get_close_matches(tok.partition("=")[0], list(current._option_string_actions), n=1)
            hints.append(f"{tok} (did you mean {near[0]}?)" if near else tok)
            if not near and "." in tok:  # a misspelt section: suggest the section
                sections = sorted({f.split(".")[0] for f in current._option_string_actions if "." in f})
                close = difflib.get_close_matches(tok.split(".")[0], sections, n=1)
                hints[-1] += f" (did you mean {close[0]}.?)" if close else ""
        else:
            hints.append(repr(tok))
    current.error("unrecognized arguments: " + ", ".join(hints))


def _known(parser: argparse.ArgumentParser, flag: str) -> bool:
    return flag in parser._option_string_actions


def _subparser(parser: argparse.ArgumentParser, tok: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and tok in action.choices:
            return action.choices[tok]
    return None


def _is_bool(tp: Any) -> bool:
    if tp is bool:
        return True
    args = get_args(tp)
    return get_origin(tp) in (Union, type(int | None)) and bool in args and len(args) == 2


_PATH_WORDS = ("path", "dir", "file", "folder", "out", "data", "tokenizer", "lora")
"""A text field whose name ends in one of these words (``out_dir``, ``val_data``, ``merge_lora``) names a
file, a folder or a URL path: its metavar is PATH, as is that of a field typed as a path."""


def _metavar(f: Field) -> str:
    tp = f.type
    args = [a for a in get_args(tp) if a is not type(None)]
    union = get_origin(tp) in (Union, type(int | None))
    if any(isinstance(a, type) and issubclass(a, os.PathLike) for a in [tp, *args]) or (
        (tp is str or (union and str in args)) and f.name.rpartition("_")[2] in _PATH_WORDS
    ):
        return "PATH"
    if union and str in args:
        return "TEXT"
    core = args[0] if get_origin(tp) in (Union, type(int | None)) and len(args) == 1 else tp
    origin = get_origin(core)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in get_args(core)) + "}"
    if origin in (list, tuple, abc.Sequence):
        return "LIST"
    if origin is dict:
        return "MAP"
    return {int: "N", float: "X", str: "TEXT"}.get(core, "V")


def _help(f: Field) -> str:
    text = f.help.rstrip(".")
    if f.required:
        return (text + "; " if text else "") + "required"
    default = f.default
    shown = (
        "none" if default is None else repr(default) if isinstance(default, str | list | dict) else default
    )
    if isinstance(default, list | dict) and len(repr(default)) > 100:
        shown = repr(default)[:97] + "..."
    if default == "" or (default is None and re.search(r"\b[Nn]one\b\s*(given\s*)?[:=]", text)):
        return text.replace("%", "%%")  # an empty default, or one the help explains ("None: all")
    return f"{text} (default: {shown})".replace("%", "%%") if text else f"default: {shown}".replace("%", "%%")
