"""Preference pairs for reward models and DPO: read, render with a chat template, batch.

    data = read_preferences("prefs.jsonl")        # pairs + what was skipped, by file line
    enc = encode_preferences(tokenizer, data, max_seq_len=512)
    batches = PreferenceBatches(enc.pairs, batch_size=8, seed=0, pad_id=0)
    batch = batches.batch(0)   # input_ids, attention_mask, completion_mask (2B, T): B chosen rows, then B rejected

A JSONL line is ``{"prompt": ..., "chosen": ..., "rejected": ...}`` (TRL's explicit-prompt preference
shape, optional ``"margin"`` for reward models). Each value is a string or a list of ``{"role",
"content"}`` messages (TRL's conversational shape). With a chat template (the tokenizer's or
``chat_template``) a string prompt is a user turn and a string completion an assistant turn; the prompt is
rendered with the generation prompt, the completion is what follows it in the rendering of prompt +
completion, up to and including the template's end-of-turn token (as ``lamina.data.chat`` masks an
answer). Without a template the texts are joined as they are and the completion ends with the eos token
(TRL's non-conversational rule).

The prompt's tokens are stored once per pair; a batch puts ``prompt + chosen`` and ``prompt + rejected``
in rows ``b`` and ``B + b`` (the layout of TRL's ``DataCollatorForPreference``), right-padded, and
``completion_mask`` marks the completion tokens: the only ones the losses count.

Bad rows are skipped and named (``FILE line N``): not JSON, a missing or empty prompt/chosen/rejected,
chosen equal to rejected (nothing to prefer), a pair longer than ``max_seq_len`` with no completion
token left after truncation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lamina.data.chat import (
    Problem,
    _answer_start,
    _common_prefix,
    _control_ids,
    _encode,
    _messages,
    _Skip,
    _skip_bad_json,
)
from lamina.data.rows import iter_jsonl, split_indices
from lamina.errors import ConfigError, DataError
from lamina.tokenizer import Tokenizer

Text = str | list[dict[str, Any]]  # a string or a list of messages


@dataclass
class PreferenceData:
    """Pairs as read: ``prompts``, ``chosen``, ``rejected`` (strings or message lists), optional
    ``margins``, where each came from, and the lines skipped while reading."""

    prompts: list[Text] = field(default_factory=list)
    chosen: list[Text] = field(default_factory=list)
    rejected: list[Text] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    def split(self, fraction: float, seed: int) -> tuple[PreferenceData, PreferenceData]:
        """A random (train, held-out) split with ``fraction`` of the pairs held out (at least one each
        when there are two or more); the problems stay with the training part."""
        keep, held = split_indices(len(self), fraction, seed)
        return self.subset(sorted(keep), self.problems), self.subset(sorted(held), [])

    def subset(self, rows: Sequence[int], problems: list[Problem]) -> PreferenceData:
        """The pairs ``rows``, in that order."""
        return PreferenceData(
            [self.prompts[i] for i in rows], [self.chosen[i] for i in rows], [self.rejected[i] for i in rows],
            [self.margins[i] for i in rows], [self.where[i] for i in rows], problems,
        )  # fmt: skip


def read_preferences(path: str | Path) -> PreferenceData:
    """Read a JSONL file of ``prompt``/``chosen``/``rejected`` rows (see the module docstring).

    A bad line is skipped and recorded in ``problems`` with its line number; blank lines are ignored.
    Raises ``DataError`` if the file is missing.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(
            f"preference data file {str(p)!r} not found; pass a JSONL file of prompt/chosen/rejected"
        )
    data = PreferenceData()
    for n, row in iter_jsonl(p, _skip_bad_json(data.problems, p.name), errors="replace"):
        where = f"{p.name} line {n}"
        try:
            prompt, chosen, rejected, margin = to_pair(row)
        except _Skip as e:
            data.problems.append(Problem(where, str(e), "skipped"))
            continue
        data.prompts.append(prompt)
        data.chosen.append(chosen)
        data.rejected.append(rejected)
        data.margins.append(margin)
        data.where.append(where)
    return data


def to_pair(row: Any) -> tuple[Text, Text, Text, float]:
    """(prompt, chosen, rejected, margin) of one JSON row; raises ``_Skip`` naming what is wrong."""
    if not isinstance(row, Mapping):
        raise _Skip(f"a JSON {type(row).__name__}, not an object")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
    if missing:
        raise _Skip(f"no {', '.join(map(repr, missing))} key (keys: {', '.join(map(str, row)) or 'none'})")
    out: list[Text] = []
    for key in ("prompt", "chosen", "rejected"):
        v = row[key]
        if isinstance(v, str):
            if not v.strip():
                raise _Skip(f"{key!r} is empty")
            out.append(v)
        elif isinstance(v, list):
            msgs = _messages(v, key)
            if key != "prompt" and not any(m["content"].strip() for m in msgs):
                raise _Skip(f"{key!r} is empty")
            out.append(msgs)
        else:
            raise _Skip(f"{key!r} must be a string or a list of messages, got {type(v).__name__}")
    if isinstance(out[0], str) != isinstance(out[1], str) or isinstance(out[1], str) != isinstance(
        out[2], str
    ):
        raise _Skip("prompt, chosen and rejected must all be strings or all lists of messages")
    if out[1] == out[2]:
        raise _Skip("chosen equals rejected: nothing to prefer")
    margin = row.get("margin", 0.0)
    if not isinstance(margin, int | float) or isinstance(margin, bool) or not math.isfinite(margin):
        raise _Skip(f"'margin' must be a finite number, got {margin!r}")
    return out[0], out[1], out[2], float(margin)


@dataclass
class Pair:
    """One pair as tokens: the shared ``prompt`` ids, each completion's ids and, per completion token,
    whether it counts (``*_mask``: False only for a token that holds text of both prompt and completion)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    chosen_mask: list[bool]
    rejected_mask: list[bool]
    where: str
    margin: float = 0.0


@dataclass
class EncodedPairs:
    """The pairs of a split and what happened to the others."""

    pairs: list[Pair]
    problems: list[Problem]
    truncated: int = 0

    @property
    def skipped(self) -> int:
        """Pairs or lines dropped."""
        return sum(p.done == "skipped" for p in self.problems)


def encode_preferences(
    tokenizer: Tokenizer,
    data: PreferenceData,
    max_seq_len: int,
    chat_template: str | None = None,
    truncate: bool = True,
) -> EncodedPairs:
    """Render and encode every pair of ``data`` (see the module docstring).

    A pair whose prompt + completion is longer than ``max_seq_len`` is cut to it with ``truncate`` (the
    completion's end goes; skipped if no completion token is left) or skipped without. A pair whose two
    completions encode to the same tokens, or to none, or that the template rejects, is skipped. Each is
    recorded in ``problems`` (after those of ``data``). ``chat_template`` overrides the tokenizer's.
    """
    out = EncodedPairs([], list(data.problems))
    templated = chat_template is not None or tokenizer.chat_template is not None
    for prompt, chosen, rejected, margin, where in zip(
        data.prompts, data.chosen, data.rejected, data.margins, data.where, strict=True
    ):
        try:
            pair = encode_pair(tokenizer, prompt, chosen, rejected, chat_template if templated else None,
                               templated, where, margin)  # fmt: skip
        except _Skip as e:
            out.problems.append(Problem(where, str(e), "skipped"))
            continue
        n = len(pair.prompt) + max(len(pair.chosen), len(pair.rejected))
        if n > max_seq_len:
            long = f"{n} tokens, longer than max_seq_len={max_seq_len}"
            keep = max_seq_len - len(pair.prompt)
            if not truncate or keep < 1:
                out.problems.append(Problem(where, long, "skipped"))
                continue
            pair.chosen, pair.chosen_mask = pair.chosen[:keep], pair.chosen_mask[:keep]
            pair.rejected, pair.rejected_mask = pair.rejected[:keep], pair.rejected_mask[:keep]
            if not any(pair.chosen_mask) or not any(pair.rejected_mask):
                out.problems.append(Problem(where, f"{long}, no completion token left", "skipped"))
                continue
            out.problems.append(Problem(where, long, f"truncated to {max_seq_len}"))
            out.truncated += 1
        out.pairs.append(pair)
    return out


def encode_pair(
    tokenizer: Tokenizer,
    prompt: Text,
    chosen: Text,
    rejected: Text,
    chat_template: str | None = None,
    templated: bool = True,
    where: str = "",
    margin: float = 0.0,
) -> Pair:
    """One pair as tokens (see the module docstring); raises ``_Skip`` (a ``LaminaError``) for a pair the
    template rejects, an empty completion or two completions with the same tokens."""
    if not templated and not (
        isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str)
    ):
        raise ConfigError(
            "conversational pairs (message lists) need a chat template and this tokenizer has none: "
            "pass --dpo.chat_template FILE (--reward.chat_template for a reward model) or give the pairs as strings"
        )
    fulls, spans = [], []
    for c in (chosen, rejected):
        ids, start, end = render_completion(tokenizer, prompt, c, chat_template, templated)
        fulls.append(ids)
        spans.append((start, end))
    # the shared prompt: what both renderings have in common before either completion starts
    shared = min(spans[0][0], spans[1][0], _common_prefix(fulls[0], fulls[1]))
    comps = [ids[shared:end] for ids, (_, end) in zip(fulls, spans, strict=True)]
    masks = [[shared + k >= start for k in range(end - shared)] for (start, end) in spans]
    for name, mask in zip(("chosen", "rejected"), masks, strict=True):
        if not any(mask):
            raise _Skip(f"{name!r} encodes to no completion token")
    if comps[0] == comps[1]:
        raise _Skip("chosen and rejected encode to the same tokens: nothing to prefer")
    return Pair(fulls[0][:shared], comps[0], comps[1], masks[0], masks[1], where, margin)


def render_completion(
    tokenizer: Tokenizer,
    prompt: Text,
    completion: Text,
    chat_template: str | None = None,
    templated: bool = True,
) -> tuple[list[int], int, int]:
    """``(ids, start, end)``: the rendering of prompt + completion and where the completion's tokens start
    and end (after the template's end-of-turn token; without a template, after the eos appended to the
    joined texts). What a reward model is trained on and scores (``ids[:end]``). Raises ``_Skip`` for a
    conversation the template rejects."""
    if templated:
        p_msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        p_ids = _encode(tokenizer, p_msgs, True, chat_template)
        c_msgs = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
        ids = _encode(tokenizer, [*p_msgs, *c_msgs], False, chat_template)
        start = _answer_start(tokenizer, ids, p_ids)
        controls = _control_ids(tokenizer)
        end = next((t + 1 for t in range(start, len(ids)) if ids[t] in controls), len(ids))
        return ids, start, end
    assert isinstance(prompt, str) and isinstance(completion, str)
    # user text is encoded as text (a "</s>" in it stays characters); eos is appended as its id
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    p_ids = tokenizer.encode(prompt, split_special_tokens=True)
    ids = tokenizer.encode(prompt + completion, split_special_tokens=True) + eos
    return ids, _answer_start(tokenizer, ids, p_ids), len(ids)


def encode_prompt(tokenizer: Tokenizer, prompt: Text, chat_template: str | None = None) -> list[int]:
    """A prompt's ids for generation: with a chat template (``chat_template`` or the tokenizer's) a string is
    a user turn, rendered with the generation prompt; without one, the text as it is. Raises ``_Skip`` for a
    prompt the template rejects, ``ConfigError`` for messages without a template."""
    if chat_template is not None or tokenizer.chat_template is not None:
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return _encode(tokenizer, msgs, True, chat_template)
    if not isinstance(prompt, str):
        raise ConfigError(
            "conversational prompts (message lists) need a chat template and this tokenizer has none: "
            "pass --grpo.chat_template FILE or give the prompts as strings"
        )
    return tokenizer.encode(prompt, split_special_tokens=True)


@dataclass
class PromptData:
    """Prompts as read (strings or message lists), the other keys of each line (passed on to reward
    functions, as TRL passes a dataset's other columns), where each came from, the lines skipped."""

    prompts: list[Text] = field(default_factory=list)
    extra: list[dict[str, Any]] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)


def read_prompts(path: str | Path, prompt_field: str = "prompt") -> PromptData:
    """Read a JSONL file of prompts: each line an object whose ``prompt_field`` is a non-empty string or a
    list of ``{"role", "content"}`` messages (TRL's prompt-only shape). A bad line is skipped and recorded
    with its line number. Raises ``DataError`` if the file is missing."""
    p = Path(path)
    if not p.is_file():
        raise DataError(
            f"prompt file {str(p)!r} not found; pass a JSONL file with a {prompt_field!r} key per line"
        )
    data = PromptData()
    for n, row in iter_jsonl(p, _skip_bad_json(data.problems, p.name), errors="replace"):
        where = f"{p.name} line {n}"
        try:
            if not isinstance(row, Mapping) or prompt_field not in row:
                raise _Skip(f"no {prompt_field!r} key")
            v = row[prompt_field]
            if isinstance(v, str):
                if not v.strip():
                    raise _Skip(f"{prompt_field!r} is empty")
                prompt: Text = v
            elif isinstance(v, list):
                prompt = _messages(v, prompt_field)
            else:
                raise _Skip(
                    f"{prompt_field!r} must be a string or a list of messages, got {type(v).__name__}"
                )
        except _Skip as e:
            data.problems.append(Problem(where, str(e), "skipped"))
            continue
        data.prompts.append(prompt)
        data.extra.append({k: x for k, x in row.items() if k != prompt_field})
        data.where.append(where)
    return data


class PreferenceBatches:
    """Batches of pairs by index: ``{"input_ids", "attention_mask", "completion_mask"}`` (2B, T), rows
    ``0..B-1`` prompt + chosen and ``B..2B-1`` prompt + rejected, right-padded; ``"margin"`` (B,).

    ``batch(i)`` is a pure function of ``i``: epoch ``i // steps_per_epoch`` shuffles the pairs with
    (seed, epoch); an epoch's last short batch is dropped (``eval_batches`` keeps all).
    """

    def __init__(self, pairs: Sequence[Pair], batch_size: int, seed: int, pad_id: int = 0) -> None:
        if not pairs:
            raise DataError("no preference pair to batch")
        self.pairs = list(pairs)
        self.batch_size, self.seed, self.pad = batch_size, seed, pad_id
        self.steps_per_epoch = max(1, len(self.pairs) // batch_size)

    def __len__(self) -> int:
        return len(self.pairs)

    def collate(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        """The batch of pairs ``rows``."""
        ps = [self.pairs[r] for r in rows]
        seqs = [(p.prompt + p.chosen, p.chosen_mask) for p in ps] + [
            (p.prompt + p.rejected, p.rejected_mask) for p in ps
        ]
        plens = [len(p.prompt) for p in ps] * 2
        T = max(len(ids) for ids, _ in seqs)
        x = torch.full((len(seqs), T), self.pad, dtype=torch.long)
        att = torch.zeros((len(seqs), T), dtype=torch.long)
        comp = torch.zeros((len(seqs), T), dtype=torch.long)
        for b, ((ids, mask), pl) in enumerate(zip(seqs, plens, strict=True)):
            x[b, : len(ids)] = torch.tensor(ids)
            att[b, : len(ids)] = 1
            comp[b, pl : len(ids)] = torch.tensor(mask, dtype=torch.long)
        margin = torch.tensor([p.margin for p in ps], dtype=torch.float)
        return {"input_ids": x, "attention_mask": att, "completion_mask": comp, "margin": margin}

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """Training batch ``index`` (pairs shuffled per epoch)."""
        epoch, k = divmod(index, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))
        return self.collate(order[k * self.batch_size : (k + 1) * self.batch_size].tolist())

    def eval_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Every pair once, in order."""
        for start in range(0, len(self.pairs), self.batch_size):
            yield self.collate(range(start, min(start + self.batch_size, len(self.pairs))))

    def n_eval_batches(self) -> int:
        """How many batches ``eval_batches`` yields."""
        return math.ceil(len(self.pairs) / self.batch_size)
