"""What the engine hands out per sequence (``Sequence_``, ``Delta``, ``TokenLogprob``) and its state of one
live sequence (``Running``: sampler, stopping, text deltas that never split a character or a stop string).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from lamina.generate.sampling import Sampler, greedy_is_argmax, min_new_tokens_stops
from lamina.tokenizer import DecodeStream, Tokenizer

if TYPE_CHECKING:  # constrain.py defines the protocol; imported only when a request needs it
    from lamina.generate.constrain import Constraint


@dataclass
class TokenLogprob:
    """A token's log-probability under the raw model distribution, its rank and the top alternatives."""

    token: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), most likely first


@dataclass
class Sequence_:
    """One generated sequence: its prompt, its new tokens, and why it stopped.

    When a stop string ends it, ``tokens`` keeps the token that completed the stop string and ``text`` is
    the output cut at the stop string. ``text`` is set when the engine has a tokenizer.
    """

    prompt_index: int  # the request's index (its position in ``generate_ids``' prompts)
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (eos, stop token or string, JSON), "length", "abort", "error"
    text: str | None = None
    stop_str: str | None = None  # the stop string that ended it
    index: int = 0  # which of the request's n sequences
    logprobs: list[TokenLogprob] | None = None  # per generated token, with cfg.logprobs
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token (None for the first)
    prompt_tokens: int = 0
    error: str | None = None  # why it stopped, with finish_reason "error"
    stop_token: int | None = None  # the eos / stop token that ended it (not in ``tokens``)
    stop_logprob: TokenLogprob | None = None  # its logprob, with cfg.logprobs
    score: float | None = None  # a beam's length-penalised summed logprob (HF's sequences_scores)


@dataclass
class Delta:
    """What one step produced for one sequence: a token (None when it only finished) and new text."""

    seq: Sequence_
    token: int | None
    text: str
    logprob: TokenLogprob | None = None
    finished: bool = field(init=False)  # whether this is the sequence's last delta (fixed when made)

    def __post_init__(self) -> None:
        # a snapshot, not a view of seq.finish_reason: the engine goes on stepping while a server reads the
        # deltas it handed out, and a step may hold two deltas of one sequence (its first token at
        # admission, then one decoded); read later, both would count as its last one
        self.finished = self.seq.finish_reason is not None


class Running:
    """Engine-side state of one live sequence."""

    def __init__(
        self,
        seq: Sequence_,
        sampler: Sampler,
        budget: int,
        stops: set[int],
        tokenizer: Tokenizer | None,
        prompt: Sequence[int],
        constraint: Constraint | None,
    ) -> None:
        self.seq, self.sampler, self.budget, self.stops = seq, sampler, budget, stops
        self.cfg = sampler.cfg
        self.constraint = constraint
        self.decoder: DecodeStream | None = (
            tokenizer.decode_stream(skip_special_tokens=True, prompt_ids=prompt) if tokenizer else None
        )
        self.text = ""  # decoded so far (cut at a stop string once one is found)
        self.sent = 0  # characters of text already handed out in deltas
        self.hold = max((len(s) for s in self.cfg.stop), default=1) - 1
        self.plain = constraint is None and greedy_is_argmax(self.cfg)
        # greedy with only min_new_tokens on: the argmax once the stop ids are banned (as its processor does)
        # (a sampled row never is: no replace(), whose validation costs ~1 ms a sequence)
        self.argmax = (
            constraint is None
            and not self.cfg.sampling
            and greedy_is_argmax(replace(self.cfg, min_new_tokens=0))
        )
        self.min_new_bans = min_new_tokens_stops(self.cfg)
        self.spec = False  # decoded speculatively (a greedy row of an engine with a draft)
        self.feed = -1  # the token to feed the model at the next decode step

    def delta(self, token: int, logprob: TokenLogprob | None) -> Delta:
        """Record a chosen token and what it means for the sequence, as a ``Delta``."""
        n = len(self.seq.tokens)
        text = self.add(token)
        if len(self.seq.tokens) == n:  # a stop token: not part of the output, kept with its logprob
            self.seq.stop_token, self.seq.stop_logprob = token, logprob
            return Delta(self.seq, None, text, logprob)
        if logprob is not None:
            self.seq.logprobs = (self.seq.logprobs or []) + [logprob]
        return Delta(self.seq, token, text, logprob)

    def add(self, token: int) -> str:
        """Record a chosen token, decide whether the sequence ends; return the text delta."""
        seq, cfg = self.seq, self.cfg
        if token in self.stops:
            seq.finish_reason = "stop"
            return self._flush()
        seq.tokens.append(token)
        if self.constraint is not None:
            self.constraint.advance(token)
        if self.decoder is not None:
            before = len(self.text)
            self.text += self.decoder.step(token)
            if cfg.stop and (hit := self._stop_string(before)) is not None:
                seq.finish_reason, seq.stop_str = "stop", hit
                return self._flush(decode_rest=False)
        if self.constraint is not None and self.constraint.done:
            seq.finish_reason = "stop"
        elif len(seq.tokens) >= self.budget:
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            return self._flush()
        end = len(self.text) - self.hold
        if end <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : end], end
        return delta

    def _stop_string(self, before: int) -> str | None:
        start = max(0, before - max(len(s) for s in self.cfg.stop) + 1)  # where a new match can begin
        hits = [(i, s) for s in self.cfg.stop if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return None
        i, s = min(hits)
        self.text = self.text[: i + len(s)] if self.cfg.include_stop_str_in_output else self.text[:i]
        return s

    def _flush(self, decode_rest: bool = True) -> str:
        """The sequence ended: the rest of its text."""
        if self.decoder is None:
            return ""
        if decode_rest:
            self.text += self.decoder.finish()
        self.seq.text = self.text
        delta, self.sent = self.text[self.sent :], len(self.text)
        return delta
