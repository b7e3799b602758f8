"""Which token ids end generation for a checkpoint: every end-of-sequence id it names, in any of its files.

A checkpoint can name several: Llama-3's config.json lists ``[<|end_of_text|>, <|eom_id|>, <|eot_id|>]``;
a GGUF file has ``tokenizer.ggml.eos_token_id`` and, apart from it, ``eot_token_id`` (end of turn) and
``eom_token_id`` (end of message, after a tool call); and a chat template closes every assistant turn with
its own marker (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``), which is often not the tokenizer's
eos. Stopping at only one of them lets a chat reply run on into an invented next turn, so lamina stops at
all of them (as llama.cpp does with its end-of-generation set). A GGUF file's three ids are read by
``lamina.checkpoint.gguf.gguf_eos_token_ids`` (into the ``eos_token_id`` of the config it converts to).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lamina.tokenizer import Tokenizer

_MARK = "lamina-end-of-turn-probe"  # plain text no template changes, so it can be found in the rendering
_PROBES: tuple[Sequence[Mapping[str, str]], ...] = (  # the first that renders answers
    ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": _MARK}),  # user first (Gemma)
    ({"role": "assistant", "content": _MARK},),
)


def as_id_list(value: Any) -> list[int]:
    """An ``eos_token_id`` value as HF files hold it (None, an int, or a list of ints) -> a list of ints."""
    if value is None:
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def end_of_turn_id(tokenizer: Tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant message, or None.

    Found by rendering a short conversation whose assistant message is a marker and taking the first
    special token after it (whitespace between is allowed): ``<|im_end|>`` for ChatML, ``<|eot_id|>`` for
    Llama 3, ``<end_of_turn>`` for Gemma, ``</s>`` for Llama 2. None when the tokenizer has no template,
    the template fails on the probe, or plain text follows the message (``"\\n\\nUser:"`` templates).
    """
    if tokenizer.chat_template is None:
        return None
    rendered = None
    for messages in _PROBES:
        try:
            rendered = tokenizer.apply_chat_template(messages)
            break
        except Exception:  # a probe: a template that raises (role order, variables) gives no answer
            continue
    if rendered is None or _MARK not in rendered:
        return None
    suffix = rendered[rendered.rindex(_MARK) + len(_MARK) :]
    special = {i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special}
    for token_id in tokenizer.encode(suffix, add_special_tokens=False):
        if token_id in special:
            return token_id
        if tokenizer.decode([token_id]).strip():
            return None
    return None


def eos_token_ids(*sources: Any, tokenizer: Tokenizer | None = None) -> list[int]:
    """Every end-of-generation id: those of ``sources`` (each None, an id or a list of ids, in order), then
    the tokenizer's eos and its chat template's end of turn (:func:`end_of_turn_id`), without repeats."""
    ids = [i for s in sources for i in as_id_list(s)]
    if tokenizer is not None:
        ids += [*tokenizer.eos_token_ids, *as_id_list(end_of_turn_id(tokenizer))]
    return unique(ids)


def unique(ids: Iterable[int]) -> list[int]:
    """``ids`` without repeats, first occurrences kept in order."""
    return list(dict.fromkeys(ids))
