"""Constrained decoding: mask the tokens that cannot continue a valid output.

Two layers, so that new kinds of constraint (JSON Schema, regex) are one new class each:

1. An :class:`Automaton` reads the output one **byte** at a time: ``step(state, byte)`` gives the next
   state or None (dead). It knows how far a state is from a complete output (``distance``), whether the
   output may end there (``accepts``) or must (``is_final``), which bytes leave the state unchanged
   (``loop_bytes``, a shortcut for the walker) and which states give equal masks (``mask_key``).
   :class:`JsonAutomaton` (OpenAI ``response_format={"type": "json_object"}``) and
   :class:`ChoiceAutomaton` (vLLM ``guided_choice``) are the two there are.
2. A :class:`TokenMasker` turns any automaton into token masks. It walks a byte trie of the vocabulary
   (:class:`TokenTrie`, built once per tokenizer and cached) from the automaton's state, dropping a
   branch as soon as the automaton dies on it and accepting whole branches at once where every byte below
   them is a ``loop_bytes`` byte (e.g. plain text inside a JSON string). The result is memoised by
   ``mask_key``, so after the first few steps a mask is a dictionary lookup and one comparison.

An :class:`AutomatonConstraint` is one sequence's state over a masker; it implements :class:`Constraint`,
the hook the engine calls::

    constraint = make_constraint(cfg, tokenizer, vocab_size)  # None: unconstrained
    while not constraint.done and budget_left:
        logits[~constraint.allowed(budget_left)] = -inf       # before any other processor
        token = pick(logits)
        constraint.advance(token)

Tokens are handled as their bytes (byte-level BPE tokens may hold part of a UTF-8 character); special
tokens are never allowed inside the output. The output is always the bytes of an accepted text, so
``tokenizer.decode(output)`` is that text.

**Budget.** ``allowed(remaining)`` only lets through tokens after which the output can still be completed
in ``remaining - 1`` tokens (``distance``), so an output cut off by ``max_new_tokens`` is still complete,
as long as the budget was at least ``distance`` of the start state to begin with: 2 tokens for JSON (the
output is then ``{}``), the fewest tokens of any choice for choices (:func:`make_constraint` refuses
smaller budgets). JSON distances are counted in bytes, an upper bound on tokens since every closing byte
is a one-byte token in the vocabularies JSON mode accepts; choice distances are exact token counts.
"""

from __future__ import annotations

import collections
import json
import math
import re
import weakref
from collections.abc import Hashable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from lamina.config import GenerationConfig
from lamina.errors import ConfigError, LaminaError
from lamina.tokenizer import Tokenizer, _bytes_to_unicode

__all__ = [
    "Automaton",
    "AutomatonConstraint",
    "ChoiceAutomaton",
    "Constraint",
    "JsonAutomaton",
    "TokenMasker",
    "TokenTrie",
    "make_constraint",
    "token_bytes",
    "vocab_trie",
]

State = Any  # an automaton state: immutable and hashable (each automaton has its own kind)
JsonState = tuple[int, str, Any]  # (mode, stack of open containers, detail of the mode)
INF = int(np.iinfo(np.int16).max)  # "dead" in the memoised cost arrays
MASK_CACHE_SIZE = 512  # masks memoised per masker (one int16 entry per token each: 96 KiB for SmolLM2)
JSON_MAX_WS_RUN = 2  # longest run of whitespace bytes JSON mode allows (longer ones make models loop)
JSON_MIN_TOKENS = 2  # the shortest JSON output, "{}", in one-byte tokens


class Constraint(Protocol):
    """The hook the engine calls each step for one sequence whose output is constrained."""

    def allowed(self, remaining: int) -> Tensor | None:
        """Bool ``(vocab_size,)``: True for the tokens that may come next (None: no restriction).

        ``remaining``: tokens left in the budget, this one included (>= 1).
        """
        ...

    def check(self, token: int, remaining: int) -> int:
        """The token to emit for the picked ``token``: itself, or one that keeps the output completable
        within ``remaining - 1`` more tokens (the budget rule, where ``allowed`` alone cannot keep it)."""
        ...

    def advance(self, token: int) -> None:
        """Record the token that was generated."""
        ...

    @property
    def done(self) -> bool:
        """The output is complete: the engine stops the sequence (finish_reason "stop")."""
        ...


class Automaton(Protocol):
    """A byte-level acceptor of the outputs a constraint allows (the interface a new constraint implements).

    States are immutable and hashable. ``distance`` must be 0 exactly where ``accepts`` holds, and from any
    other state with a finite distance d some token must lead to a state of distance d - 1 (so the budget
    rule can always close the output).
    """

    def start(self) -> State:
        """The state before any output."""
        ...

    def step(self, state: State, byte: int) -> State | None:
        """The state after ``byte`` (0-255), or None when no valid output continues this way."""
        ...

    def distance(self, state: State) -> int:
        """An upper bound on the tokens needed to reach an accepting state (0: accepting now)."""
        ...

    def accepts(self, state: State) -> bool:
        """The output may end here (an end-of-sequence token is allowed)."""
        ...

    def is_final(self, state: State) -> bool:
        """The output must end here: nothing may follow (the constraint is done)."""
        ...

    def loop_bytes(self, state: State) -> int:
        """Bit mask (bit b set for byte b) of bytes whose ``step`` returns ``state`` itself; 0 if unknown."""
        ...

    def mask_key(self, state: State) -> Hashable:
        """States with equal keys allow the same tokens and change ``distance`` by the same amounts on them
        (the memo key of :class:`TokenMasker`; the state itself is always a valid key)."""
        ...


# ===================================================================================== the vocabulary's bytes

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer: Tokenizer, vocab_size: int | None = None) -> list[bytes | None]:
    """Each token id's bytes in the output text; None for special tokens, the tokens of roles (bos, eos,
    pad, unk, mask) and ids the tokenizer lacks.

    Byte-level vocabularies (GPT-2, Llama-3, SmolLM) spell bytes with GPT-2's printable alphabet, which is
    inverted here; SentencePiece vocabularies give "▁" as a space and ``<0xNN>`` byte-fallback tokens as
    that byte (their decoder's stripping of the text's first space is not modelled: a leading "▁" token
    counts as a space). Added non-special tokens are their text in UTF-8.
    """
    n = tokenizer.vocab_size if vocab_size is None else vocab_size
    backend = tokenizer.backend
    added = backend.get_added_tokens_decoder()
    kinds = _decoder_types(json.loads(backend.decoder.__getstate__())) if backend.decoder else set()
    alphabet = {c: b for b, c in _bytes_to_unicode().items()}
    roles = {tokenizer.token_to_id(t) for t in tokenizer.special_tokens_map.values()}
    out: list[bytes | None] = []
    for i in range(n):
        special = added.get(i)
        piece = backend.id_to_token(i)
        if i in roles:
            out.append(None)
        elif special is not None:
            out.append(None if special.special else special.content.encode("utf-8"))
        elif piece is None:
            out.append(None)
        elif "ByteLevel" in kinds and all(c in alphabet for c in piece):
            out.append(bytes(alphabet[c] for c in piece))
        elif "ByteFallback" in kinds and (m := _BYTE_FALLBACK.fullmatch(piece)):
            out.append(bytes([int(m.group(1), 16)]))
        else:
            out.append(piece.replace("▁", " ").encode("utf-8"))
    return out


def _decoder_types(spec: Any) -> set[str]:
    """Every ``"type"`` in a serialized ``tokenizers`` decoder (a Sequence nests its decoders)."""
    if isinstance(spec, dict):
        own = {spec["type"]} if isinstance(spec.get("type"), str) else set()
        return own | {t for v in spec.values() for t in _decoder_types(v)}
    if isinstance(spec, list):
        return {t for v in spec for t in _decoder_types(v)}
    return set()


class TokenTrie:
    """A byte trie of a vocabulary, laid out for fast walks.

    Nodes are numbered in depth-first preorder (node 0 is the empty prefix); tokens are listed in the same
    order (``order``), so the tokens of a node's subtree are the contiguous slice ``tlo[n]:thi[n]`` of
    ``order`` and the ones ending exactly at the node are its first ``own[n]``. ``below[n]`` is the bit mask
    of every byte on an edge under node n. Tokens without bytes (None or empty) are not in the trie.
    """

    def __init__(self, tokens: Sequence[bytes | None]) -> None:
        """Build the trie of ``tokens`` (index = token id)."""
        self.tokens = list(tokens)
        self.vocab_size = len(self.tokens)
        items = sorted((b, i) for i, b in enumerate(self.tokens) if b)
        children: list[list[tuple[int, int]]] = [[]]
        tlo, own = [0], [0]
        path, prev = [0], b""
        for pos, (b, _) in enumerate(items):
            common = 0
            for x, y in zip(prev, b, strict=False):
                if x != y:
                    break
                common += 1
            del path[common + 1 :]
            for byte in b[common:]:
                node = len(children)
                children.append([])
                tlo.append(pos)
                own.append(0)
                children[path[-1]].append((byte, node))
                path.append(node)
            own[path[-1]] += 1
            prev = b
        size = [0] * len(children)  # tokens in each subtree
        below = [0] * len(children)
        for n in range(len(children) - 1, -1, -1):
            size[n] += own[n]
            for byte, c in children[n]:
                size[n] += size[c]
                below[n] |= below[c] | (1 << byte)
        self.children = [tuple(c) for c in children]
        self.tlo, self.own, self.below = tlo, own, below
        self.thi = [lo + s for lo, s in zip(tlo, size, strict=True)]
        self.order = np.array([i for _, i in items], dtype=np.int64)
        self.max_len = max((len(b) for b, _ in items), default=0)
        self.maskers: collections.OrderedDict[Hashable, TokenMasker] = collections.OrderedDict()

    def __len__(self) -> int:
        """Number of nodes."""
        return len(self.children)

    def max_count(self, byteset: bytes) -> int:
        """The most bytes from ``byteset`` that any one token holds (e.g. brackets in a token)."""
        return max((sum(b.count(x) for x in byteset) for b in self.tokens if b), default=0)

    def has_single(self, byte: int) -> bool:
        """Whether some token is exactly this one byte."""
        child = dict(self.children[0]).get(byte)
        return child is not None and self.own[child] > 0


_TRIES: weakref.WeakKeyDictionary[Tokenizer, dict[int, TokenTrie]] = weakref.WeakKeyDictionary()


def vocab_trie(tokenizer: Tokenizer, vocab_size: int) -> TokenTrie:
    """The :class:`TokenTrie` of ``tokenizer``'s vocabulary padded to ``vocab_size`` ids (cached per
    tokenizer, so masks memoised for one request serve the next)."""
    per_size = _TRIES.setdefault(tokenizer, {})
    if vocab_size not in per_size:
        per_size[vocab_size] = TokenTrie(token_bytes(tokenizer, vocab_size))
    return per_size[vocab_size]


# ===================================================================================== trie walk -> masks


class TokenMasker:
    """Token masks for the states of one automaton over one vocabulary.

    ``costs(state)`` is an int16 array ``(vocab_size,)``: for each token, the automaton's distance after
    it minus the distance before it (``INF`` where the token is not allowed); ``end_ids`` get 0 in
    accepting states. Memoised by ``automaton.mask_key(state)`` (the last ``MASK_CACHE_SIZE`` keys).
    """

    def __init__(self, trie: TokenTrie, automaton: Automaton, end_ids: Sequence[int] = ()) -> None:
        """Masks of ``automaton`` over ``trie``'s vocabulary; ``end_ids``: the tokens that end a sequence."""
        self.trie, self.automaton = trie, automaton
        self.end_ids = sorted({t for t in end_ids if 0 <= t < trie.vocab_size})
        self._memo: collections.OrderedDict[Hashable, np.ndarray] = collections.OrderedDict()
        self.walks = 0  # memo misses, for tests and benchmarks

    def costs(self, state: State) -> np.ndarray:
        """Distance change per token from ``state`` (int16, ``INF`` = not allowed)."""
        key = self.automaton.mask_key(state)
        hit = self._memo.get(key)
        if hit is not None:
            self._memo.move_to_end(key)
            return hit
        costs = self._walk(state)
        self._memo[key] = costs
        if len(self._memo) > MASK_CACHE_SIZE:
            self._memo.popitem(last=False)
        return costs

    def allowed(self, state: State, remaining: int) -> Tensor:
        """Bool ``(vocab_size,)``: tokens after which the output can be completed in ``remaining - 1`` more.

        When none can (the budget was already too small), the tokens that get closest are allowed.
        """
        # numpy, not torch: a 49k-element comparison is microseconds, without waking torch's thread pool
        costs = self.costs(state)
        threshold = remaining - self.automaton.distance(state)  # allowed: distance after < remaining
        mask = costs < np.int16(max(min(threshold, INF), -INF))
        if not mask.any():
            best = costs.min()
            mask = costs == best if best < INF else mask
        return torch.from_numpy(mask)

    def _walk(self, state: State) -> np.ndarray:
        """Walk the trie from ``state``; distance changes in token-id order."""
        trie, A = self.trie, self.automaton
        self.walks += 1
        children, tlo, thi, own, below = trie.children, trie.tlo, trie.thi, trie.own, trie.below
        step, distance, loop_bytes = A.step, A.distance, A.loop_bytes
        base = distance(state)
        cost = np.full(len(trie.order), INF, dtype=np.int16)
        todo: list[tuple[int, State]] = [(0, state)]
        while todo:
            node, s = todo.pop()
            loop = loop_bytes(s)
            d = distance(s)
            if loop and not below[node] & ~loop:  # every token under here stays in s
                cost[tlo[node] : thi[node]] = d - base
                continue
            if own[node] and d < INF:  # (an infinite distance: the output cannot be completed from s)
                cost[tlo[node] : tlo[node] + own[node]] = d - base
            for byte, child in children[node]:
                if loop >> byte & 1:
                    todo.append((child, s))
                elif (s2 := step(s, byte)) is not None:
                    todo.append((child, s2))
        out = np.full(trie.vocab_size, INF, dtype=np.int16)
        out[trie.order] = cost
        if A.accepts(state) and self.end_ids:
            out[self.end_ids] = 0
        return out

    def run(self, state: State, token: int) -> State | None:
        """The state after ``token``'s bytes (None: not allowed; end tokens are not bytes, see
        :class:`AutomatonConstraint`)."""
        data = self.trie.tokens[token] if 0 <= token < self.trie.vocab_size else None
        if not data:
            return None
        s: State | None = state
        for byte in data:
            s = self.automaton.step(s, byte)
            if s is None:
                return None
        return s


class AutomatonConstraint:
    """One sequence's :class:`Constraint` over a :class:`TokenMasker`: the automaton's current state.

    An end token (``masker.end_ids``), allowed where the automaton accepts, makes it done; so does reaching
    a final state.
    """

    def __init__(self, masker: TokenMasker, state: State | None = None) -> None:
        """Start at ``state`` (default: the automaton's start state)."""
        self.masker = masker
        self.state: State = masker.automaton.start() if state is None else state
        self._ended = False

    def allowed(self, remaining: int) -> Tensor:
        """Bool ``(vocab_size,)``: the tokens that keep the output completable within ``remaining`` tokens
        (this one included). Once done, only the end tokens (if any)."""
        return self.masker.allowed(self.state, remaining)

    def check(self, token: int, remaining: int) -> int:
        """``token``: ``allowed`` already keeps the budget exactly."""
        return token

    def advance(self, token: int) -> None:
        """Move past ``token``; raise ``LaminaError`` if the constraint never allowed it."""
        automaton = self.masker.automaton
        if token in self.masker.end_ids and automaton.accepts(self.state):
            self._ended = True
            return
        after = None if self.done else self.masker.run(self.state, token)
        if after is None:
            raise LaminaError(
                f"token {token} cannot continue the constrained output here; the caller must apply "
                "constraint.allowed(...) to the logits before picking a token and stop once it is done"
            )
        self.state = after

    @property
    def done(self) -> bool:
        """The output is complete: a final state, or an end token after an accepted output."""
        return self._ended or self.masker.automaton.is_final(self.state)

    def copy(self) -> AutomatonConstraint:
        """An independent copy at the same state (for beam search or n > 1 forks)."""
        other = AutomatonConstraint(self.masker, self.state)
        other._ended = self._ended
        return other


# ===================================================================================== JSON

# Modes. Structural modes carry the count of whitespace bytes just read; string modes whether the string
# is an object key.
START, OBJ_OPEN, OBJ_KEY, COLON, VALUE, ARR_OPEN, AFTER = range(7)  # x: whitespace run
STR, ESC, HEX, LOW, UTF8 = range(7, 12)  # x: is_key, or (is_key, ...)
NUM, LIT, DONE = range(12, 15)  # x: number part / rest of the literal / 0
# Number parts: those ending in "_" need a digit next.
N_MINUS_, N_ZERO, N_INT, N_DOT_, N_FRAC, N_E_, N_ESIGN_, N_EXP = range(8)
_NEEDS_DIGIT = (1, 0, 0, 1, 0, 1, 1, 0)
_WS = frozenset(b" \t\n\r")
_DIGITS = frozenset(b"0123456789")
_HEX = {b: int(chr(b), 16) for b in b"0123456789abcdefABCDEF"}
_ESCAPES = frozenset(b'"\\/bfnrt')
_STRING_LOOP = sum(1 << b for b in range(0x20, 0x80) if b not in b'"\\')
_DIGIT_LOOP = sum(1 << b for b in _DIGITS)
_LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
# (continuation bytes still needed, range of the next one) after each UTF-8 lead byte (no overlongs, no
# surrogates, nothing above U+10FFFF: exactly what Python's strict UTF-8 decoder accepts)
_UTF8_LEAD = {
    **{b: (1, 0x80, 0xBF) for b in range(0xC2, 0xE0)},
    0xE0: (2, 0xA0, 0xBF),
    **{b: (2, 0x80, 0xBF) for b in range(0xE1, 0xF0)},
    0xED: (2, 0x80, 0x9F),
    0xF0: (3, 0x90, 0xBF),
    **{b: (3, 0x80, 0xBF) for b in range(0xF1, 0xF4)},
    0xF4: (3, 0x80, 0x8F),
}


class JsonAutomaton:
    """One JSON object (RFC 8259), as OpenAI's ``response_format={"type": "json_object"}`` requires.

    State: ``(mode, stack, x)`` with ``stack`` the open containers as a string ("o" object, "a" array; the
    top-level object included) and ``x`` the mode's detail. Rules beyond JSON's: at most ``max_depth``
    nested containers (the top-level object counts 1); at most ``JSON_MAX_WS_RUN`` whitespace bytes in a
    row; no whitespace after the closing brace (the output ends there); strings are valid UTF-8 and
    ``\\u`` escapes pair their surrogates, so every output also survives strict decoders.

    ``lookahead``: the most brackets any one token holds (``TokenTrie.max_count(b"{}[]")``); mask keys
    keep only the part of the stack such a token can reach.
    """

    def __init__(self, max_depth: int = 16, lookahead: int = 8) -> None:
        """A JSON-object acceptor with nesting limited to ``max_depth``."""
        if max_depth < 1:
            raise ConfigError(f"json_max_depth={max_depth} must be >= 1 (the top-level object)")
        self.max_depth, self.lookahead = max_depth, max(1, lookahead)

    def start(self) -> JsonState:
        """Before the top-level object."""
        return (START, "", 0)

    def accepts(self, state: JsonState) -> bool:
        """Only the closed top-level object is a complete output."""
        return state[0] == DONE

    def is_final(self, state: JsonState) -> bool:
        """The closed top-level object: nothing may follow."""
        return state[0] == DONE

    def loop_bytes(self, state: JsonState) -> int:
        """Plain ASCII inside a string; digits inside a number's digit runs."""
        mode, _, x = state
        if mode == STR:
            return _STRING_LOOP
        if mode == NUM and x in (N_INT, N_FRAC, N_EXP):
            return _DIGIT_LOOP
        return 0

    def mask_key(self, state: JsonState) -> Hashable:
        """The mode and detail, the top of the stack that one token can reach, whether there is more of it,
        and how many more containers may open (capped at what one token can open)."""
        mode, stack, x = state
        reach = self.lookahead + 1
        room = min(self.max_depth - len(stack), reach)
        return (mode, x, stack[-reach:], len(stack) > reach, room)

    def distance(self, state: JsonState) -> int:
        """Bytes (one-byte tokens) to the shortest complete output, e.g. ``{"a":[`` -> 2 (``]}``)."""
        mode, stack, x = state
        depth = len(stack)
        if mode == STR:
            return depth + (3 if x else 1)  # '"' (':0' after a key)
        if mode in (AFTER, OBJ_OPEN, ARR_OPEN):
            return depth
        if mode == NUM:
            return depth + _NEEDS_DIGIT[x]
        if mode == VALUE:
            return depth + 1  # "0"
        if mode == COLON:
            return depth + 2  # ":0"
        if mode == OBJ_KEY:
            return depth + 4  # '"":0'
        if mode == LIT:
            return depth + len(x)
        if mode == ESC:
            return depth + (3 if x else 1) + 1
        if mode == HEX:
            is_key, n, value, low = x
            high = not low and n >= 2 and 0xD8 <= value >> (4 * (n - 2)) <= 0xDB
            return depth + (3 if is_key else 1) + 4 - n + (6 if high else 0)
        if mode == LOW:
            is_key, k = x
            return depth + (3 if is_key else 1) + 6 - k
        if mode == UTF8:
            return depth + (3 if x[0] else 1) + x[1]
        if mode == START:
            return JSON_MIN_TOKENS
        return 0  # DONE

    def step(self, state: JsonState, byte: int) -> JsonState | None:
        """The state after ``byte``, or None if no JSON object continues this way."""
        mode, stack, x = state
        if mode == STR:
            if 0x20 <= byte < 0x80:
                if byte == 0x22:  # '"'
                    return (COLON, stack, 0) if x else (AFTER, stack, 0)
                if byte == 0x5C:  # '\'
                    return (ESC, stack, x)
                return state
            lead = _UTF8_LEAD.get(byte)
            return None if lead is None else (UTF8, stack, (x, *lead))
        if mode <= AFTER:
            if byte in _WS:
                return (mode, stack, x + 1) if x < JSON_MAX_WS_RUN else None
            if mode == AFTER:
                top = stack[-1]
                if byte == 0x2C:  # ','
                    return (OBJ_KEY, stack, 0) if top == "o" else (VALUE, stack, 0)
                return self._close(stack, byte)
            if mode in (VALUE, ARR_OPEN):
                if mode == ARR_OPEN and byte == 0x5D:
                    return self._close(stack, byte)
                return self._value(stack, byte)
            if mode in (OBJ_OPEN, OBJ_KEY):
                if byte == 0x22:
                    return (STR, stack, 1)
                return self._close(stack, byte) if mode == OBJ_OPEN else None
            if mode == COLON:
                return (VALUE, stack, 0) if byte == 0x3A else None
            # START
            return (OBJ_OPEN, "o", 0) if byte == 0x7B else None
        if mode == NUM:
            return self._number(stack, x, byte)
        if mode == UTF8:
            is_key, need, lo, hi = x
            if not lo <= byte <= hi:
                return None
            return (STR, stack, is_key) if need == 1 else (UTF8, stack, (is_key, need - 1, 0x80, 0xBF))
        if mode == ESC:
            if byte in _ESCAPES:
                return (STR, stack, x)
            return (HEX, stack, (x, 0, 0, False)) if byte == 0x75 else None  # 'u'
        if mode == HEX:
            return self._hex(stack, x, byte)
        if mode == LOW:
            is_key, k = x
            if byte == (0x5C, 0x75)[k]:  # '\' then 'u'
                return (LOW, stack, (is_key, 1)) if k == 0 else (HEX, stack, (is_key, 0, 0, True))
            return None
        if mode == LIT:
            if byte != x[0]:
                return None
            return (LIT, stack, x[1:]) if len(x) > 1 else (AFTER, stack, 0)
        return None  # DONE: nothing may follow

    def _close(self, stack: str, byte: int) -> JsonState | None:
        """Close the innermost container with ``byte`` if it is its closer."""
        if byte != (0x7D if stack[-1] == "o" else 0x5D):  # '}' / ']'
            return None
        rest = stack[:-1]
        return (AFTER, rest, 0) if rest else (DONE, "", 0)

    def _value(self, stack: str, byte: int) -> JsonState | None:
        """The first byte of a value."""
        if byte == 0x22:
            return (STR, stack, 0)
        if byte in _DIGITS:
            return (NUM, stack, N_ZERO if byte == 0x30 else N_INT)
        if byte == 0x2D:  # '-'
            return (NUM, stack, N_MINUS_)
        if byte == 0x7B or byte == 0x5B:  # '{' '['
            if len(stack) >= self.max_depth:
                return None
            return (OBJ_OPEN, stack + "o", 0) if byte == 0x7B else (ARR_OPEN, stack + "a", 0)
        rest = _LITERALS.get(byte)
        return None if rest is None else (LIT, stack, rest)

    def _number(self, stack: str, part: int, byte: int) -> JsonState | None:
        """``-?(0|[1-9][0-9]*)(\\.[0-9]+)?([eE][+-]?[0-9]+)?``, then whatever may follow a value."""
        digit = byte in _DIGITS
        if part == N_MINUS_:
            return (NUM, stack, N_ZERO if byte == 0x30 else N_INT) if digit else None
        if part in (N_DOT_, N_FRAC) and digit:
            return (NUM, stack, N_FRAC)
        if part in (N_E_, N_ESIGN_, N_EXP) and digit:
            return (NUM, stack, N_EXP)
        if part == N_INT and digit:
            return (NUM, stack, N_INT)
        if part == N_E_ and byte in b"+-":
            return (NUM, stack, N_ESIGN_)
        if _NEEDS_DIGIT[part] or digit:  # a digit after a leading zero
            return None
        if byte == 0x2E and part in (N_ZERO, N_INT):  # '.'
            return (NUM, stack, N_DOT_)
        if byte in b"eE" and part in (N_ZERO, N_INT, N_FRAC):
            return (NUM, stack, N_E_)
        return self.step((AFTER, stack, 0), byte)  # the number ended: ',', a closer or whitespace

    def _hex(self, stack: str, x: tuple[int, int, int, bool], byte: int) -> JsonState | None:
        """One hex digit of ``\\uXXXX``; surrogates must come as a high-low pair."""
        is_key, n, value, low = x
        digit = _HEX.get(byte)
        if digit is None:
            return None
        if n == 0 and low and digit != 0xD:
            return None
        if n == 1 and value == 0xD and (digit >= 0xC) != low:  # a low surrogate alone, or a high one not low
            return None
        value = value << 4 | digit
        if n < 3:
            return (HEX, stack, (is_key, n + 1, value, low))
        if not low and 0xD800 <= value <= 0xDBFF:
            return (LOW, stack, (is_key, 0))
        return (STR, stack, is_key)


# ===================================================================================== choices


class ChoiceAutomaton:
    """The output is exactly one of ``choices`` (vLLM ``guided_choice``); states are nodes of their byte trie.

    Rule: when the output equals a choice that no longer choice extends, it is done; when it equals a
    choice that a longer one extends ("yes" with "yes please"), the model may go on or end with an
    end-of-sequence token. ``distance`` is the exact fewest tokens to a complete choice.
    """

    def __init__(self, choices: Sequence[str], trie: TokenTrie) -> None:
        """The byte trie of ``choices`` and, per node, the fewest tokens of ``trie`` to finish a choice."""
        if not choices or any(not c for c in choices):
            raise ConfigError(f"choices={list(choices)!r} must be a non-empty list of non-empty strings")
        self.choices = list(choices)
        self.children: list[dict[int, int]] = [{}]
        self.ends: dict[int, str] = {}
        for choice in self.choices:
            node = 0
            for byte in choice.encode("utf-8"):
                nxt = self.children[node].get(byte)
                if nxt is None:
                    nxt = len(self.children)
                    self.children.append({})
                    self.children[node][byte] = nxt
                node = nxt
            self.ends[node] = choice
        # Tokens only move deeper, and a child's id is larger than its parent's: fill from the leaves up.
        root = dict(trie.children[0])
        targets = [self._token_targets(trie, root, n) for n in range(len(self.children))]
        self.dist = [math.inf] * len(self.children)
        for n in range(len(self.children) - 1, -1, -1):
            if n in self.ends:
                self.dist[n] = 0
            elif targets[n]:
                self.dist[n] = 1 + min(self.dist[t] for t in targets[n])
        reached, todo = {0}, [0]
        while todo:
            for t in targets[todo.pop()]:
                if t not in reached:
                    reached.add(t)
                    todo.append(t)
        for node, choice in self.ends.items():
            if node not in reached:
                raise ConfigError(
                    f"choices: {choice!r} cannot be written with this tokenizer's (non-special) tokens; "
                    "fix: remove it or spell it with characters the vocabulary has"
                )

    def _token_targets(self, trie: TokenTrie, root: dict[int, int], node: int) -> set[int]:
        """The choice-trie nodes one token leads to from ``node`` (``root``: the vocabulary's first bytes)."""
        out: set[int] = set()
        todo = [(0, node)]
        while todo:
            v, c = todo.pop()
            vocab_children = root if v == 0 else dict(trie.children[v])
            for byte, cc in self.children[c].items():
                vc = vocab_children.get(byte)
                if vc is not None:
                    if trie.own[vc]:
                        out.add(cc)
                    todo.append((vc, cc))
        return out

    def start(self) -> int:
        """The root: nothing written yet."""
        return 0

    def step(self, state: int, byte: int) -> int | None:
        """The child along ``byte``, if some choice continues with it."""
        return self.children[state].get(byte)

    def distance(self, state: int) -> int:
        """The fewest tokens that complete a choice from here."""
        d = self.dist[state]
        return INF if d == math.inf else int(d)

    def accepts(self, state: int) -> bool:
        """The output equals a choice."""
        return state in self.ends

    def is_final(self, state: int) -> bool:
        """The output equals a choice that no other choice extends."""
        return state in self.ends and not self.children[state]

    def loop_bytes(self, state: int) -> int:
        """No byte leaves a node unchanged."""
        return 0

    def mask_key(self, state: int) -> Hashable:
        """The node itself."""
        return state


# ===================================================================================== from a config

# Bytes JSON mode needs as one-byte tokens, so that every state has a token that closes in on the end.
_JSON_ONE_BYTE_TOKENS = bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0xC0))


def make_constraint(
    cfg: GenerationConfig, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Sequence[int] = ()
) -> Constraint | None:
    """The constraint ``cfg`` asks for, or None: ``response_format="json_object"`` and ``choices`` here (the
    byte automata measured faster than llguidance on what they cover), ``json_schema``, ``regex`` and
    ``grammar`` through :mod:`lamina.generate.grammar` (llguidance).

    ``vocab_size``: the model's (its logits' last dimension; ids the tokenizer lacks are never allowed).
    The sequence may end where the output is complete with any end-of-generation id: the model's
    ``eos_token_ids`` (eos, end of turn, end of message: ``lamina.checkpoint.eos``), ``cfg.eos_token_ids``
    and the tokenizer's eos (none of them with ``cfg.ignore_eos``), or ``cfg.stop_token_ids``. Masks are memoised per tokenizer, so later requests with the same
    settings reuse them. Raises ``ConfigError`` for requests that cannot be met: a choice the vocabulary
    cannot spell, a vocabulary without the one-byte tokens JSON mode needs, ``max_new_tokens`` below the
    shortest output (2 for JSON; the fewest tokens of any choice).
    """
    if not cfg.constrained:
        return None
    eos = [] if cfg.ignore_eos else [*eos_token_ids, *cfg.eos_token_ids, *tokenizer.eos_token_ids]
    end_ids = tuple(sorted({*cfg.stop_token_ids, *(i for i in eos if 0 <= i < vocab_size)}))
    if cfg.json_schema is not None or cfg.regex or cfg.grammar:
        from lamina.generate.grammar import make_grammar_constraint

        return make_grammar_constraint(cfg, tokenizer, vocab_size, end_ids)
    trie = vocab_trie(tokenizer, vocab_size)
    if cfg.choices:
        key: Hashable = ("choices", tuple(cfg.choices), end_ids)
    else:
        key = ("json", cfg.json_max_depth, end_ids)
    masker = trie.maskers.get(key)
    if masker is None:
        automaton: Automaton
        if cfg.choices:
            automaton = ChoiceAutomaton(cfg.choices, trie)
            prefixes = [c for c in cfg.choices if any(o != c and o.startswith(c) for o in cfg.choices)]
            if prefixes and not end_ids:
                raise ConfigError(
                    f"choices: {prefixes[0]!r} is the start of a longer choice, so only an end-of-sequence "
                    "token can end it, and there is none (ignore_eos=True and no stop_token_ids); fix: "
                    "allow eos or add a stop token id"
                )
        else:
            missing = [b for b in _JSON_ONE_BYTE_TOKENS if not trie.has_single(b)]
            if missing:
                raise ConfigError(
                    f'response_format="json_object" needs a one-byte token for each of {bytes(missing)[:20]!r} '
                    "(byte-level BPE and byte-fallback vocabularies have them all); this tokenizer lacks them"
                )
            automaton = JsonAutomaton(cfg.json_max_depth, lookahead=trie.max_count(b"{}[]"))
        masker = TokenMasker(trie, automaton, end_ids)
        trie.maskers[key] = masker
        if len(trie.maskers) > 16:
            trie.maskers.popitem(last=False)
    trie.maskers.move_to_end(key)
    shortest = masker.automaton.distance(masker.automaton.start())
    if cfg.max_new_tokens < shortest:
        what = "the shortest JSON object, {}," if not cfg.choices else "the shortest choice"
        raise ConfigError(
            f"max_new_tokens={cfg.max_new_tokens} is too small: {what} needs {shortest} tokens; "
            f"fix: max_new_tokens >= {shortest}"
        )
    return AutomatonConstraint(masker)
