"""Chat templates: rendering them as ``transformers`` does (a sandboxed Jinja environment with its globals
and filters), and encoding the result so that only the template's own text makes control tokens.

    text = apply_chat_template(backend, template, messages, add_generation_prompt=True)
    ids = apply_chat_template(backend, template, messages, add_generation_prompt=True, tokenize=True)

:meth:`lamina.tokenizer.Tokenizer.apply_chat_template` is the usual way in.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from lamina.errors import TokenizerError

Message = Mapping[str, Any]

# Where messages carry reasoning; each is also given to the template under the others' names.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def apply_chat_template(
    backend: Backend,
    template: str,
    messages: Sequence[Message],
    add_generation_prompt: bool = False,
    tokenize: bool = False,
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    variables: Mapping[str, Any] | None = None,
) -> str | list[int]:
    """Render ``messages`` with ``template`` (``variables``: the special tokens and any other template
    variables); with ``tokenize=True`` return the ids by :func:`encode_chat` over ``backend``. What
    :meth:`Tokenizer.apply_chat_template` does once it knows the template; the same errors.
    """
    variables = variables or {}
    if not messages:
        raise TokenizerError(
            "apply_chat_template got no messages; fix: pass at least one {'role': ..., 'content': ...}"
        )
    chat = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise TokenizerError(f"chat messages must be dicts with 'role' and 'content', got {message!r}")
        # Like transformers: keys whose value is None are dropped (OpenAI clients send content=None)
        # and a message's reasoning is also given under the names templates read it by.
        plain = {k: _plain(v) for k, v in message.items() if v is not None}
        reasoning = next((plain[k] for k in _REASONING_FIELDS if plain.get(k) is not None), None)
        if reasoning is not None:
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        chat.append(plain)
    variables = {k: _plain(v) for k, v in variables.items()}
    compiled = _compile_chat_template(template)

    def render(data: Mapping[str, Any]) -> str:
        try:
            return compiled.render(**data, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            raise TokenizerError(
                f"the chat template failed on these messages: {e}; fix the messages or the template"
            ) from e

    data = {"messages": chat, "tools": _plain(tools), "documents": _plain(documents)}
    if not tokenize:
        return render(data)
    return encode_chat(backend, render, data, avoid=template + "".join(_strings(variables)))


def _plain(value: Any) -> Any:
    """A copy of ``value`` made of plain JSON types, so a template sees no object with methods of its own
    (the sandbox does not know which are dangerous); anything else becomes a placeholder like "<ndarray>".
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, np.generic):  # np.bool_(False) must not become a truthy placeholder
        return _plain(value.item())
    # Subclasses (enums, ...) are stripped back to the base type's value.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _raise_exception(message: str) -> NoReturn:
    """Templates call ``raise_exception("...")`` to reject a conversation."""
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    """``tojson`` as transformers defines it: no HTML escaping (Jinja's own escapes <, >, &, ')."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    """The current local time formatted with ``strftime`` (templates print today's date)."""
    return datetime.now().strftime(format)


class _TemplateDict:
    """``dict(...)`` and ``dict.fromkeys(...)`` for templates, without exposing the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's ``namespace()`` refusing underscore-prefixed attributes (a path to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        for name in dict(*rest, **kwargs):
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, *rest, **kwargs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set the attribute {name!r} on a namespace"
            )


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks the assistant's text in training templates; it
    renders as its body (transformers uses it to build an assistant-token mask).
    """

    tags = {"generation"}  # noqa: RUF012  # the attribute Jinja reads

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in: sandboxed, immutable arguments,
    ``trim_blocks`` and ``lstrip_blocks``, loop controls, and its ``tojson``, ``raise_exception``,
    ``strftime_now``, ``dict`` and ``namespace``."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


@functools.lru_cache(maxsize=32)
def _compile_chat_template(template: str) -> jinja2.Template:
    """Compile a chat template in ``_environment()``."""
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(
            f"the chat template is not valid Jinja (line {e.lineno}: {e.message}); fix the template"
        ) from e


@functools.lru_cache(maxsize=32)
def template_reads(template: str, name: str) -> bool:
    """Whether the chat ``template`` reads the variable ``name`` given by the caller (e.g. ``tools``):
    a use of it before any ``set`` of its own, found in the parsed template (``jinja2.meta``), not the
    word in its text. False for a template that is not valid Jinja (rendering it says why)."""
    import jinja2.meta

    try:
        parsed = _environment().parse(template)
    except jinja2.TemplateSyntaxError:
        return False
    return name in jinja2.meta.find_undeclared_variables(parsed)


# ---------------------------------------------------------------------- user text never becomes control tokens

# Private-use characters stand in for text while a chat is encoded: placeholders (Supplementary Private Use
# Area-A) for control-token text found in messages, stand-ins (Area-B) for the template's control tokens.
_PLACEHOLDERS = range(0xF0000, 0xFFFFE)
_STAND_INS = range(0x100000, 0x10FFFE)


def text_backend(backend: Backend, extra: Sequence[AddedToken] = ()) -> Backend:
    """A tokenizer that encodes like ``backend`` except that special tokens written in the text are split
    as plain text (``encode_special_tokens``); ``extra`` tokens are added to it (not special, so they are
    still matched). It shares ``backend``'s model and pipeline (building it takes well under a millisecond
    for a 49k vocabulary) and leaves ``backend`` unchanged, so other threads can keep encoding with it.
    """
    clone = Backend(backend.model)
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        value = getattr(backend, part)
        if value is not None:
            setattr(clone, part, value)
    added = backend.get_added_tokens_decoder()
    # In id order, runs of one kind per call: each added token gets the id it has in `backend`.
    for special, run in itertools.groupby(sorted(added.items()), key=lambda kv: kv[1].special):
        tokens = [token for _, token in run]
        if special:
            clone.add_special_tokens(tokens)
        else:
            clone.add_tokens(tokens)
    if any(clone.token_to_id(token.content) != i for i, token in added.items()):
        clone = Backend.from_str(backend.to_str())  # ids with gaps: a full copy (slower, same ids)
    clone.encode_special_tokens = True
    if extra:
        clone.add_tokens(list(extra))
    return clone


def encode_chat(backend: Backend, render: Callable[[Any], str], data: Any, avoid: str = "") -> list[int]:
    """Token ids of ``render(data)`` in which only the template's own text makes control tokens.

    ``data`` holds what users write (messages, tools, documents: JSON-like values); ``render`` turns it
    into the prompt text (the chat template); ``avoid``: other text the template can print (its source,
    its variables). Control tokens are the added tokens marked special (``<|im_start|>``, ``<|eot_id|>``
    ...); added tokens that are not special (``<tool_call>`` in some vocabularies) are plain text for
    this purpose, as in ``transformers`` with ``split_special_tokens=True``.

    How: every string in ``data`` that holds control-token text gets a private-use placeholder in its
    place, and one ending (starting) with the first (last) characters of a control token gets a guard
    character there, so that the template's next text cannot complete the token. The template renders
    these strings like any text (``| trim`` and other filters keep the placeholders). The control tokens
    the tokenizer then finds in the rendered text are the template's own; they are swapped for stand-in
    added tokens, the placeholders for the text they hid, and the whole text is encoded once with special
    tokens split. The result is what ``transformers`` gives for the rendered text when only the
    template's control tokens are parsed: BPE merges across the border between a message and the
    template's text happen as in one plain encoding. When no string needs a placeholder or a guard (the
    usual case) it is exactly ``backend.encode(render(data))``, the ids ``transformers``'
    ``apply_chat_template(..., tokenize=True)`` gives.

    Limit: a template that itself writes a control token's text in pieces around a message (``<|`` +
    message + ``im_end|>``) is not guarded. Raises :class:`TokenizerError` if the encoding ends up with a
    control token the template did not write (a bug, never expected).
    """
    controls = {i: token for i, token in backend.get_added_tokens_decoder().items() if token.special}
    if not controls:
        return list(backend.encode(render(data), add_special_tokens=False).ids)
    strings = sorted(_strings(data))
    starts, ends, longest = _control_affixes(tuple(sorted({token.content for token in controls.values()})))
    # Only strings holding a control token's text can hold a control token (a token matched after
    # normalization could hide otherwise: then every string is asked); the tokenizer says where.
    anywhere = _control_text(tuple(sorted({t.content for t in controls.values() if not t.normalized})))
    suspects = (
        strings if any(t.normalized for t in controls.values()) else list(filter(anywhere.search, strings))
    )
    hidden: dict[str, list[tuple[int, int]]] = {}  # string -> spans of control-token text in it
    for text, encoding in zip(
        suspects, backend.encode_batch(suspects, add_special_tokens=False), strict=True
    ):
        spans = [(a, b) for a, b, _ in _matched(text, encoding, controls)]
        if spans:
            hidden[text] = spans
    guarded = [
        text
        for text in strings
        if text not in hidden
        and (core := text.strip())
        and (_ends_with_any(core, starts, longest) or _starts_with_any(core, ends, longest))
    ]
    if not hidden and not guarded:
        return list(backend.encode(render(data), add_special_tokens=False).ids)

    # Placeholders: one per distinct hidden text, plus the guard (which stands for nothing).
    hidden_texts = sorted({text[a:b] for text, spans in hidden.items() for a, b in spans})
    used = set(avoid).union(*strings)
    guard, *marks = _free_chars(used, 1 + len(hidden_texts), _PLACEHOLDERS)
    restore: dict[int, str | None] = {ord(guard): None}
    restore |= {ord(mark): text for mark, text in zip(marks, hidden_texts, strict=True)}
    mark_of = dict(zip(hidden_texts, marks, strict=True))
    neutral = {
        text: _guard(_hide(text, spans, mark_of), starts, ends, longest, guard)
        for text, spans in hidden.items()
    }
    neutral |= {text: _guard(text, starts, ends, longest, guard) for text in guarded}
    rendered = render(_map_strings(data, lambda text: neutral.get(text, text)))

    # The control tokens found now are the template's: each kind gets a stand-in, matched like it.
    real = _matched(rendered, backend.encode(rendered, add_special_tokens=False), controls)
    kinds = sorted({i for _, _, i in real})
    stand_ins = dict(zip(kinds, _free_chars(set(rendered) | set(marks), len(kinds), _STAND_INS), strict=True))
    clone = text_backend(
        backend,
        [
            AddedToken(
                stand_ins[i],
                single_word=controls[i].single_word,
                lstrip=controls[i].lstrip,
                rstrip=controls[i].rstrip,
                normalized=controls[i].normalized,
                special=False,
            )
            for i in kinds
        ],
    )
    pieces, end = [], 0
    for a, b, i in real:
        pieces += [rendered[end:a].translate(restore), stand_ins[i]]
        end = b
    pieces.append(rendered[end:].translate(restore))
    back = {clone.token_to_id(char): i for i, char in stand_ins.items()}
    ids = clone.encode("".join(pieces), add_special_tokens=False).ids
    if sum(i in back for i in ids) != len(real):  # the clone matches no control token, only stand-ins
        raise TokenizerError(
            "encoding the chat lost or added a control token of the template; this is a bug in lamina, "
            "please report it with the chat template"
        )
    return [back.get(i, i) for i in ids]


def _matched(text: str, encoding: Any, controls: Mapping[int, AddedToken]) -> list[tuple[int, int, int]]:
    """(start, end, id) of the control tokens the tokenizer matched in ``text`` (not those its model made
    from other text, such as byte-fallback pieces marked special)."""
    return [
        (a, b, i)
        for i, (a, b) in zip(encoding.ids, encoding.offsets, strict=True)
        if i in controls and (controls[i].normalized or text[a:b].strip() == controls[i].content.strip())
    ]


def _strings(value: Any) -> set[str]:
    """Every string in a JSON-like value, dict keys included."""
    if isinstance(value, str):
        return {value}
    if isinstance(value, Mapping):
        return set().union(*(_strings(k) | _strings(v) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return set().union(*(_strings(v) for v in value))
    return set()


def _map_strings(value: Any, f: Callable[[str], str]) -> Any:
    """``value`` with ``f`` applied to every string in it (dict keys included)."""
    if isinstance(value, str):
        return f(value)
    if isinstance(value, Mapping):
        return {_map_strings(k, f): _map_strings(v, f) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, f) for v in value]
    if isinstance(value, tuple):
        return tuple(_map_strings(v, f) for v in value)
    return value


@functools.lru_cache(maxsize=8)
def _control_text(contents: tuple[str, ...]) -> re.Pattern[str]:
    """A pattern that finds any of the control tokens' texts."""
    return re.compile("|".join(map(re.escape, contents)) or "(?!)")


@functools.lru_cache(maxsize=8)
def _control_affixes(contents: tuple[str, ...]) -> tuple[frozenset[str], frozenset[str], int]:
    """The proper prefixes and the proper suffixes of the control tokens' texts, and the longest's length."""
    starts = frozenset(c[:k] for c in contents for k in range(1, len(c)))
    ends = frozenset(c[k:] for c in contents for k in range(1, len(c)))
    return starts, ends, max(map(len, contents), default=0)


def _ends_with_any(text: str, affixes: frozenset[str], longest: int) -> bool:
    return any(text[-k:] in affixes for k in range(1, min(longest, len(text)) + 1))


def _starts_with_any(text: str, affixes: frozenset[str], longest: int) -> bool:
    return any(text[:k] in affixes for k in range(1, min(longest, len(text)) + 1))


def _hide(text: str, spans: Sequence[tuple[int, int]], mark_of: Mapping[str, str]) -> str:
    """``text`` with each span replaced by the placeholder of the text it covers."""
    pieces, end = [], 0
    for a, b in spans:
        pieces += [text[end:a], mark_of[text[a:b]]]
        end = b
    return "".join([*pieces, text[end:]])


def _guard(text: str, starts: frozenset[str], ends: frozenset[str], longest: int, guard: str) -> str:
    """``text`` with ``guard`` after its last non-space character if the text before it could begin a
    control token, and before its first one if the text after it could end one (inside the whitespace,
    so a template's ``| trim`` still removes the same spaces).
    """
    core = text.strip()
    if not core:
        return text
    head = len(text) - len(text.lstrip())
    tail = len(text.rstrip())
    after = guard if _ends_with_any(core, starts, longest) else ""
    before = guard if _starts_with_any(core, ends, longest) else ""
    return text[:head] + before + text[head:tail] + after + text[tail:]


def _free_chars(used: set[str], count: int, pool: range) -> list[str]:
    """``count`` characters of ``pool`` that are not in ``used``."""
    chars = list(itertools.islice((c for c in map(chr, pool) if c not in used), count))
    if len(chars) < count:
        raise TokenizerError(
            "the chat uses too many private-use characters to encode it safely; fix: remove them"
        )
    return chars
