"""Chat and instruction data for supervised fine-tuning: read, render with a chat template, mask, pack.

    data = read_chat("chat.jsonl")                       # conversations + what was skipped, by file line
    examples = encode_chats(tokenizer, data, max_seq_len=512)
    batches = ChatBatches(examples.examples, batch_size=8, max_seq_len=512, seed=0, packing=True)
    batch = batches.batch(0)    # input_ids, targets, attention_mask, position_ids, segment_ids (B, T)

Shapes of a JSONL line (``format="auto"`` tells them apart by their keys, line by line):

- OpenAI ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``, multi-turn;
- ``{"prompt": "...", "completion": "..."}`` (strings, or lists of messages as TRL's conversational
  prompt-completion): a user turn and an assistant turn;
- Alpaca ``{"instruction": "...", "input": "...", "output": "..."}``: the user turn is the instruction,
  followed by a blank line and the input when there is one; the assistant turn is the output.

Masking. The loss counts the tokens of each assistant turn's content and the end-of-turn token the
template writes after it (``<|im_end|>``, ``<|eot_id|>``, ``</s>`` ...), found from the rendered text
itself, so any template works without ``{% generation %}`` markers. For assistant turn ``i`` the
conversation up to it is rendered with the generation prompt (``messages[:i]``,
``add_generation_prompt=True``): the answer starts where that text ends (what the model writes after a
generation prompt is what it learns; a token across that border, where BPE joins the prompt's last
whitespace with the answer, carries no loss). It ends at the first control
token after that start (the end-of-turn token, included), and at the latest where the rendering of
``messages[:i + 1]`` ends. Encoding is :meth:`Tokenizer.apply_chat_template` with ``tokenize=True``, so text
in the messages never becomes a control token: the first control token after an answer's start is the
template's own. ``loss_on="all"`` counts every token instead (each predicted from the ones before).

Packing puts several conversations into one row of at most ``max_seq_len`` tokens (first fit, longest
first): ``position_ids`` restart at 0 for each conversation and ``segment_ids`` number them (1, 2, ...;
0 for padding), so a model that takes ``segment_ids`` keeps attention within a conversation; no target
crosses a border (the last token of each conversation predicts nothing).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lamina.data.rows import iter_jsonl, split_indices
from lamina.errors import DataError, LaminaError
from lamina.tokenizer import Tokenizer

IGNORE = -100  # the target of a position that carries no loss

ChatFormat = Literal["auto", "messages", "prompt_completion", "alpaca"]
LossOn = Literal["assistant", "all"]


@dataclass
class Problem:
    """A line or conversation that was not used as it is: ``where`` (``FILE line N``), ``what`` was wrong
    and what was ``done`` ("skipped" or "truncated")."""

    where: str
    what: str
    done: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}; {self.done}"


@dataclass
class ChatData:
    """Conversations (lists of ``{"role", "content"}`` messages) as read, where each came from, and the
    lines that were skipped while reading."""

    conversations: list[list[dict[str, Any]]] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.conversations)

    def split(self, fraction: float, seed: int) -> tuple[ChatData, ChatData]:
        """A random (train, held-out) split with ``fraction`` of the conversations held out (at least one
        each when there are two or more); the problems stay with the training part."""
        keep, held = split_indices(len(self), fraction, seed)
        return self.subset(sorted(keep), self.problems), self.subset(sorted(held), [])

    def subset(self, rows: Sequence[int], problems: list[Problem]) -> ChatData:
        """The conversations ``rows``, in that order."""
        return ChatData([self.conversations[i] for i in rows], [self.where[i] for i in rows], problems)


def read_chat(path: str | Path, format: ChatFormat = "auto", messages_field: str = "messages") -> ChatData:
    """Read a JSONL file of conversations in any of the module's shapes.

    A line that is not JSON, not an object, or not in the shape asked for is skipped and recorded in
    ``problems`` with its line number; blank lines are ignored. Raises ``DataError`` if the file is
    missing.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"chat data file {str(p)!r} not found; pass a JSONL file of conversations")
    data = ChatData()
    for n, row in iter_jsonl(p, _skip_bad_json(data.problems, p.name), errors="replace"):
        where = f"{p.name} line {n}"
        try:
            data.conversations.append(to_messages(row, format, messages_field))
            data.where.append(where)
        except _Skip as e:
            data.problems.append(Problem(where, str(e), "skipped"))
    return data


def _skip_bad_json(problems: list[Problem], name: str) -> Callable[[int, json.JSONDecodeError], None]:
    """``iter_jsonl``'s ``bad_json`` for the readers that skip bad rows: a line of file ``name`` that is
    not JSON is recorded in ``problems`` (``FILE line N: not JSON (...)``) and skipped."""
    return lambda n, e: problems.append(Problem(f"{name} line {n}", f"not JSON ({e.msg})", "skipped"))


class _Skip(LaminaError):
    """One example cannot be used; the message says why (the reader records it and goes on)."""


def to_messages(
    row: Any, format: ChatFormat = "auto", messages_field: str = "messages"
) -> list[dict[str, Any]]:
    """The messages of one JSON row in any of the module's shapes (see the module docstring)."""
    if not isinstance(row, Mapping):
        raise _Skip(f"a JSON {type(row).__name__}, not an object")
    if format == "auto":
        if messages_field in row:
            format = "messages"
        elif "prompt" in row and "completion" in row:
            format = "prompt_completion"
        elif "instruction" in row and "output" in row:
            format = "alpaca"
        else:
            raise _Skip(
                f"no {messages_field!r}, 'prompt' + 'completion' or 'instruction' + 'output' keys "
                f"(keys: {', '.join(map(str, row)) or 'none'})"
            )
    if format == "messages":
        return _messages(row.get(messages_field), messages_field)
    if format == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) and isinstance(completion, list):
            return _messages(prompt + completion, "prompt + completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise _Skip("'prompt' and 'completion' must both be strings (or both lists of messages)")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    instruction, extra, output = row.get("instruction"), row.get("input") or "", row.get("output")
    if not isinstance(instruction, str) or not isinstance(output, str) or not isinstance(extra, str):
        raise _Skip("'instruction', 'input' and 'output' must be strings")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    system = [{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) else []
    return [*system, {"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _messages(value: Any, name: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise _Skip(f"{name!r} must be a non-empty list of messages")
    for m in value:
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise _Skip(f"every message in {name!r} needs a 'role' (a string), got {m!r:.60}")
        if not isinstance(m.get("content"), str):
            raise _Skip(f"a {m['role']!r} message has no text 'content'")
    return [dict(m) for m in value]


# ---------------------------------------------------------------------------------------- rendering and masks


@dataclass
class Example:
    """One conversation as tokens: ``ids`` and ``loss[t]`` (token ``t`` is predicted with loss), where it
    came from, and for sampling the ``prompt`` (the ids up to its last answer, with the generation prompt)
    and that answer's text (``reference``)."""

    ids: list[int]
    loss: list[bool]
    where: str
    prompt: list[int] = field(default_factory=list)
    reference: str = ""


@dataclass
class Encoded:
    """The examples of a split and what happened to the others."""

    examples: list[Example]
    problems: list[Problem]
    truncated: int = 0

    @property
    def skipped(self) -> int:
        """Conversations or lines dropped."""
        return sum(p.done == "skipped" for p in self.problems)


def encode_chats(
    tokenizer: Tokenizer,
    data: ChatData,
    max_seq_len: int,
    chat_template: str | None = None,
    loss_on: LossOn = "assistant",
    truncate: bool = True,
) -> Encoded:
    """Render, encode and mask every conversation of ``data``.

    A conversation the template rejects (``raise_exception``, a role it does not know), one with no
    assistant turn (``loss_on="assistant"``), or one longer than ``max_seq_len`` tokens without
    ``truncate`` is skipped; a longer one with ``truncate`` is cut to ``max_seq_len`` tokens (skipped if no
    answer token is left). Each is recorded in ``problems`` (after those of ``data``). ``chat_template``
    overrides the tokenizer's.
    """
    out = Encoded([], list(data.problems))
    for messages, where in zip(data.conversations, data.where, strict=True):
        try:
            ids, loss = encode_conversation(tokenizer, messages, chat_template, loss_on)
            prompt, reference = _sample_prompt(tokenizer, messages, chat_template)
        except _Skip as e:
            out.problems.append(Problem(where, str(e), "skipped"))
            continue
        if len(ids) > max_seq_len:
            long = f"{len(ids)} tokens, longer than max_seq_len={max_seq_len}"
            if not truncate:
                out.problems.append(Problem(where, long, "skipped"))
                continue
            ids, loss = ids[:max_seq_len], loss[:max_seq_len]
            if not any(loss[1:]):
                out.problems.append(
                    Problem(where, f"{long}, no answer token in the first {max_seq_len}", "skipped")
                )
                continue
            out.problems.append(Problem(where, long, f"truncated to {max_seq_len}"))
            out.truncated += 1
        out.examples.append(Example(ids, loss, where, prompt, reference))
    return out


def encode_conversation(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    chat_template: str | None = None,
    loss_on: LossOn = "assistant",
) -> tuple[list[int], list[bool]]:
    """The token ids of ``messages`` rendered with the chat template and, per token, whether it carries
    loss (see the module docstring). Raises ``_Skip`` (a ``LaminaError``) when the template rejects the
    conversation or, for ``loss_on="assistant"``, when it has no assistant turn after another turn."""
    ids = _encode(tokenizer, messages, False, chat_template)
    if loss_on == "all":
        return ids, [False] + [True] * (len(ids) - 1)
    controls = _control_ids(tokenizer)
    loss = [False] * len(ids)
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0]
    if not answers:
        raise _Skip("no assistant turn (after a user or system turn) to learn from")
    for i in answers:
        start = _answer_start(tokenizer, ids, _encode(tokenizer, messages[:i], True, chat_template))
        bound = _common_prefix(ids, _encode(tokenizer, messages[: i + 1], False, chat_template))
        end = next((t + 1 for t in range(start, bound) if ids[t] in controls), bound)
        for t in range(start, end):
            loss[t] = True
    if not any(loss):
        raise _Skip("the template printed no token of the assistant turns")
    return ids, loss


def _encode(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], generation_prompt: bool, template: str | None
) -> list[int]:
    try:
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=True, chat_template=template
        )
    except LaminaError as e:
        raise _Skip(f"the chat template rejected it ({e.__cause__ or e})") from e


def _sample_prompt(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], template: str | None
) -> tuple[list[int], str]:
    """The ids of the conversation before its last assistant turn, with the generation prompt, and that
    turn's content (what a sample of the model is compared with)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    if last == 0:
        return [], ""
    reference = messages[last]["content"] if last < len(messages) else ""
    return _encode(tokenizer, messages[:last], True, template), reference


def _answer_start(tokenizer: Tokenizer, ids: Sequence[int], prompt: Sequence[int]) -> int:
    """The index of the first token of ``ids`` after the text of ``prompt`` (the conversation up to an
    answer, with the generation prompt). Usually ``prompt`` is a prefix of ``ids``; where the encoding of
    the whole conversation joins or splits tokens across the prompt's end differently (``"\\n\\n"`` one
    token at the end of a prompt, two before a letter), the prompt's remaining text is matched by
    decoding, and a token that holds text of both sides is left to the prompt (no loss)."""
    common = _common_prefix(ids, prompt)
    if common == len(prompt):
        return common
    rest = len(tokenizer.decode(list(prompt[common:])))
    for k in range(common + 1, len(ids) + 1):
        if len(tokenizer.decode(list(ids[common:k]))) >= rest:
            return k
    return len(ids)


def _control_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """The ids of the tokenizer's control (special added) tokens."""
    return frozenset(i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def read_template(value: str | None) -> str | None:
    """A chat template given as Jinja text or as the path of a file holding it (None: the tokenizer's)."""
    if value is None or "{{" in value or "{%" in value:
        return value
    p = Path(value)
    if not p.is_file():
        raise DataError(f"chat template file {value!r} not found; pass a Jinja file or the template text")
    return p.read_text(encoding="utf-8")


def targets_of(example: Example) -> list[int]:
    """Next-token targets of one example: ``targets[t] = ids[t + 1]`` where token ``t + 1`` carries loss,
    else ``IGNORE``; the last position predicts nothing."""
    ids, loss = example.ids, example.loss
    return [ids[t + 1] if loss[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


# ----------------------------------------------------------------------------------------------------- batches


class ChatBatches:
    """Batches of encoded conversations by index: ``{"input_ids", "targets", "attention_mask",
    "position_ids"}`` and, with packing, ``"segment_ids"``, each (B, T), right-padded to the batch's
    longest row.

    Without packing a row is one conversation; with ``packing`` a row holds several (first fit, longest
    first, at most ``max_seq_len`` tokens), positions restarting at 0 and ``segment_ids`` 1, 2, ... for
    each (0 for padding). ``batch(i)`` is a pure function of ``i``: epoch ``i // steps_per_epoch`` shuffles
    the rows with (seed, epoch); an epoch's last short batch is dropped (``eval_batches`` keeps all).
    """

    def __init__(
        self,
        examples: Sequence[Example],
        batch_size: int,
        max_seq_len: int,
        seed: int,
        packing: bool = False,
        pad_id: int = 0,
    ) -> None:
        if not examples:
            raise DataError("no conversation to batch")
        self.examples = list(examples)
        self.batch_size, self.seed, self.pad, self.packing = batch_size, seed, pad_id, packing
        self.rows = (
            pack([len(e.ids) for e in examples], max_seq_len)
            if packing
            else [[i] for i in range(len(examples))]
        )
        self.steps_per_epoch = max(1, len(self.rows) // batch_size)

    def __len__(self) -> int:
        return len(self.rows)

    def collate(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        """The batch of rows ``rows`` (indices into ``self.rows``)."""
        lengths = [sum(len(self.examples[i].ids) for i in self.rows[r]) for r in rows]
        B, T = len(rows), max(lengths)
        x = torch.full((B, T), self.pad, dtype=torch.long)
        y = torch.full((B, T), IGNORE, dtype=torch.long)
        pos = torch.zeros((B, T), dtype=torch.long)
        seg = torch.zeros((B, T), dtype=torch.long)
        for b, r in enumerate(rows):
            at = 0
            for k, i in enumerate(self.rows[r], 1):
                e = self.examples[i]
                n = len(e.ids)
                x[b, at : at + n] = torch.tensor(e.ids)
                y[b, at : at + n] = torch.tensor(targets_of(e))
                pos[b, at : at + n] = torch.arange(n)
                seg[b, at : at + n] = k
                at += n
        out = {"input_ids": x, "targets": y, "attention_mask": (seg > 0).long(), "position_ids": pos}
        if self.packing:
            out["segment_ids"] = seg
        return out

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """Training batch ``index`` (rows shuffled per epoch)."""
        epoch, k = divmod(index, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
        return self.collate(order[k * self.batch_size : (k + 1) * self.batch_size].tolist())

    def eval_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Every row once, in order."""
        for start in range(0, len(self.rows), self.batch_size):
            yield self.collate(range(start, min(start + self.batch_size, len(self.rows))))

    def n_eval_batches(self) -> int:
        """How many batches ``eval_batches`` yields."""
        return math.ceil(len(self.rows) / self.batch_size)


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of total length <= ``capacity``: first fit, longest first
    (ties by index), each bin's items in index order; deterministic. A length over ``capacity`` gets a
    bin of its own."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = next((b for b, r in enumerate(room) if r >= lengths[i]), None)
        if k is None:
            bins.append([i])
            room.append(capacity - lengths[i])
        else:
            bins[k].append(i)
            room[k] -= lengths[i]
    return [sorted(b) for b in bins]
