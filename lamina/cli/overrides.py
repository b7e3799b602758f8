"""``--section.field value`` flags: any config field set from the command line.

``lamina pretrain --config run.yaml --train.lr 3e-4 --model.n_layers 4`` merges the flags over the
YAML file; values are read as YAML (``3e-4``, ``null``, ``[0.9, 0.95]``, ``true``). Unknown sections and
fields are errors that name the nearest valid ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from lamina.config import parse_yaml
from lamina.errors import ConfigError


def parse_overrides(argv: Sequence[str], sections: Mapping[str, type | None]) -> dict[str, dict[str, Any]]:
    """``["--train.lr", "3e-4", "--model.n_layers=4"]`` -> ``{"train": {"lr": 3e-4}, "model": {"n_layers": 4}}``.

    ``sections`` maps a section name to its dataclass (checked for field names) or None (not checked).
    """
    out: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(
                f"unexpected argument {arg!r}: overrides look like --SECTION.FIELD VALUE, e.g. --train.lr 3e-4"
            )
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"{arg} needs a value, e.g. {arg} 3e-4")
            value = argv[i + 1]
            i += 1
        i += 1
        section, _, name = key.partition(".")
        name = name.replace("-", "_")
        if section not in sections:
            raise ConfigError(f"unknown config section {section!r} in {arg}{_near(section, sections)}")
        cls = sections[section]
        # a config class with presets also takes `preset` (``--model.preset small``)
        valid = (
            {f.name for f in dataclasses.fields(cls)} | ({"preset"} if hasattr(cls, "preset") else set())
            if cls
            else set()
        )
        if cls is not None and name not in valid:
            names = [f.name for f in dataclasses.fields(cls)]
            raise ConfigError(f"unknown {section} field {name!r} in {arg}{_near(name, names)}")
        out.setdefault(section, {})[name] = parse_yaml(value) if value != "" else ""
    return out


def merge(base: Mapping[str, Any], overrides: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``base`` (a run YAML as a dict of sections) with ``overrides`` applied field by field."""
    merged: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for section, values in overrides.items():
        current = merged.get(section)
        if current is not None and not isinstance(current, dict):
            raise ConfigError(f"cannot set {section}.* fields: {section} is {current!r} in the config file")
        merged[section] = {**(current or {}), **values}
    return merged


def _near(key: str, choices: Any) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(choices), n=3, cutoff=0.5)
    return (
        f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else f"; valid: {', '.join(choices)}"
    )
