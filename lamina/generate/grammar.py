"""Grammar-backed constraints: JSON Schema, regular expressions and context-free grammars (llguidance).

`llguidance <https://github.com/guidance-ai/llguidance>`_ (the engine behind llama.cpp's and vLLM's
``guidance`` backend) compiles a JSON Schema, a regex or a Lark grammar (GBNF is converted to Lark) into
an Earley parser over a lexer, and computes token masks for any ``tokenizers`` vocabulary on the CPU. It was
chosen over xgrammar 0.2.9 after measuring both (llguidance 1.9.1) on SmolLM2's tokenizer (issue 18's
note has the numbers): schemas compile in about 1-3 ms against xgrammar's 13-65 ms, masks take 15-30 us a
step (xgrammar's 1-7 us; both are far below a SmolLM2 forward of tens of ms), it names the JSON Schema keywords it does not implement (xgrammar compiled ``not`` and
``uniqueItems`` without a word) and it depends on nothing (xgrammar pulls torch, triton and transformers).
Its masks are computed from the lexer state with its own caches (token-trie slices), so lamina adds none.

The budget rule, which llguidance lacks: an output must be complete before ``max_new_tokens`` runs out.
For that each state gets a **closing path**, a byte string that completes the output, found greedily
(closers first, then a zero, then the byte used least so far, forced bytes in one go), written in the
tokenizer's tokens (one token per byte where the grammar does not take those). Its length bounds the
tokens still needed. While the budget is far (more than ``KEEP_SLACK`` tokens beyond the path), a step
keeps the previous state's path (less the token just taken, when it was the path's first) if it still
closes the output from the new state, checked without consuming (``validate_tokens`` with an end token:
about 2 us, where a new search is 50-150 us, most of a row's constraint work per step). A kept path
still closes the output, so the rule stays sound, and where it does not fit the search runs as before,
so no token is refused that a new search would allow; within ``KEEP_SLACK`` of the budget, and without
an end token, every step searches afresh. The engine asks ``check(token, remaining)`` after it
picks a token: a token after which the output can no longer be closed within the budget is replaced by the
first token of the current closing path (whose rest then still fits). A request whose start state's closing
path does not fit ``max_new_tokens`` is refused up front, as is every JSON Schema keyword llguidance does
not implement (by name). The vocabulary needs a one-byte token for each byte (byte-level BPE and
byte-fallback vocabularies have them).
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lamina.config import GenerationConfig
from lamina.errors import ConfigError, LaminaError
from lamina.tokenizer import Tokenizer

__all__ = ["GrammarConstraint", "compile_grammar", "grammar_kind", "make_grammar_constraint"]

MAX_CLOSING_BYTES = 2048  # longest closing path searched; a state needing more counts as unclosable
_FIRST = b'"}])'  # closers first ('"' ends the string the path is in, or opens the shortest value: "")
_SHORT = b"0"  # then the shortest number
_PRINTABLE = bytes(range(0x21, 0x7F)) + b" \n"
KEEP_SLACK = 4  # tokens: farther than this from the budget, check() keeps a closing path that still closes


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise ConfigError(
            "JSON Schema, regex and grammar constraints need llguidance; fix: pip install 'lamina[structured]'"
        ) from None
    return llguidance


def grammar_kind(cfg: GenerationConfig) -> str | None:
    """Which grammar-backed constraint ``cfg`` asks for: "json_schema", "regex", "grammar" or None."""
    if cfg.json_schema is not None:
        return "json_schema"
    if cfg.regex:
        return "regex"
    if cfg.grammar:
        return "grammar"
    return None


class _Vocab:
    """A tokenizer as llguidance sees it, with its one-byte token ids (built once per tokenizer and eos set)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, end_ids: Sequence[int]) -> None:
        from lamina.generate.constrain import token_bytes

        llg = _llguidance()
        self.vocab_size = vocab_size
        self.end_ids = tuple(end_ids)
        # llguidance reads the tokenizers JSON itself; eos: ours (it allows them where the output may end)
        self.ll = llg.LLTokenizer(
            tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=list(end_ids) or None
        )
        one: dict[int, int] = {}
        for i, b in enumerate(token_bytes(tokenizer, vocab_size)):
            if b is not None and len(b) == 1 and b[0] not in one:
                one[b[0]] = i
        self.one_byte = one  # byte -> a token that is exactly that byte
        self.grammars: dict[tuple[str, str], str] = {}  # (kind, source) -> checked llguidance grammar


_VOCABS: weakref.WeakKeyDictionary[Tokenizer, dict[tuple[int, tuple[int, ...]], _Vocab]] = (
    weakref.WeakKeyDictionary()
)
_LOCK = threading.Lock()


def _vocab(tokenizer: Tokenizer, vocab_size: int, end_ids: Sequence[int]) -> _Vocab:
    key = (vocab_size, tuple(end_ids))
    with _LOCK:
        per = _VOCABS.setdefault(tokenizer, {})
        if key not in per:
            per[key] = _Vocab(tokenizer, vocab_size, end_ids)
        return per[key]


def compile_grammar(kind: str, source: Any) -> str:
    """An llguidance grammar for ``kind`` ("json_schema": a schema dict; "regex": a pattern matched in full;
    "grammar": Lark or GBNF text), checked. Raises ``ConfigError`` naming the field and the problem, e.g.
    the JSON Schema keywords that are not supported (never silently ignored)."""
    llg = _llguidance()
    M = llg.LLMatcher
    try:
        if kind == "json_schema":
            if not isinstance(source, dict):
                raise ConfigError(f"json_schema must be a JSON object (a dict), got {type(source).__name__}")
            # compact separators: the output is what the model writes, without padding runs
            grammar = M.grammar_from_json_schema(source, overrides={"whitespace_flexible": False})
        elif kind == "regex":
            grammar = M.grammar_from_regex(source)
        elif kind == "grammar":
            grammar = M.grammar_from_lark(llg.gbnf_to_lark.any_to_lark(source))
        else:
            raise ValueError(kind)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{kind}: cannot be read: {e}") from None
    failed, messages = M.validate_grammar_with_warnings(grammar)
    if failed or messages:
        # one line: llguidance's messages quote the source under a caret on indented lines; keep the rest
        lines = [ln.strip() for m in messages for ln in m.splitlines() if ln.strip() and not ln[0].isspace()]
        what = " ".join(lines)[:400] or "invalid"
        if kind == "json_schema":
            raise ConfigError(
                f"{kind} is not supported as given: {what}; fix: remove or rewrite those keywords"
            )
        raise ConfigError(f"{kind} is invalid: {what}; fix the {kind}")
    return grammar


class _Closer:
    """Closing paths from matcher states (the greedy search of the module docstring)."""

    def __init__(self, vocab: _Vocab) -> None:
        self.vocab = vocab
        bits = np.zeros(vocab.vocab_size, dtype=bool)
        self.one_ids = np.array([vocab.one_byte[b] for b in sorted(vocab.one_byte)], dtype=np.int64)
        self.one_bytes = np.array(sorted(vocab.one_byte), dtype=np.int64)
        self._bits = bits

    def path(self, matcher: Any) -> list[int] | None:
        """Tokens that take ``matcher``'s state to an accepting one ([] if it accepts), or None if the greedy
        search finds none within ``MAX_CLOSING_BYTES``: the closing bytes in the tokenizer's own tokens
        where the grammar takes them, else one token per byte. ``matcher`` is not changed."""
        data = self.path_bytes(matcher)
        if not data:
            return None if data is None else []
        tokens = self.vocab.ll.tokenize_bytes(data)
        if matcher.validate_tokens(tokens) == len(tokens):
            return list(tokens)
        return [self.vocab.one_byte[b] for b in data]

    def path_bytes(self, matcher: Any) -> bytes | None:
        """The closing bytes (the greedy search); None if none is found within ``MAX_CLOSING_BYTES``."""
        if matcher.is_accepting() or matcher.is_stopped():
            return b""
        m = matcher.deep_copy()
        out = bytearray()
        used = np.zeros(256, dtype=np.int64)
        one = self.vocab.one_byte
        while len(out) <= MAX_CLOSING_BYTES:
            if m.is_error():
                return None
            if m.is_accepting():
                return bytes(out)
            forced = m.compute_ff_bytes()
            if forced:
                if not all(b in one for b in forced) or not m.consume_tokens([one[b] for b in forced]):
                    return None
                out += forced
                continue
            # a closer or a zero when the grammar takes one (tried one token each: no full mask)
            byte = next(
                (b for b in _FIRST + _SHORT if b in one and m.try_consume_tokens([one[b]]) == 1), None
            )
            if byte is None:
                bits = np.frombuffer(m.compute_bitmask(), dtype=np.uint8)  # only the one-byte tokens' bits
                allowed = ((bits[self.one_ids >> 3] >> (self.one_ids & 7)) & 1).astype(bool)
                ok = set(self.one_bytes[allowed].tolist())
                if not ok:
                    return None
                candidates = [b for b in _PRINTABLE if b in ok] or sorted(ok)
                byte = min(candidates, key=lambda b: used[b])  # the least used: walks out of loops
                if not m.consume_token(one[byte]):
                    return None
            used[byte] += 1
            out.append(byte)
        return None


def _unpack(bitmask: bytes, vocab_size: int) -> np.ndarray:
    """llguidance's bit-per-token mask as bool ``(vocab_size,)``."""
    bits = np.unpackbits(np.frombuffer(bitmask, dtype=np.uint8), bitorder="little")[:vocab_size]
    return bits.view(bool)  # 0/1 bytes are valid bools: no copy


class GrammarConstraint:
    """One sequence's :class:`lamina.generate.constrain.Constraint` over an llguidance matcher.

    ``closing`` is the current closing path (token ids); the invariant is ``len(closing) <= remaining`` at
    every step, which ``check`` keeps.
    """

    def __init__(self, vocab: _Vocab, matcher: Any, closer: _Closer, closing: list[int]) -> None:
        self.vocab, self.matcher, self.closer = vocab, matcher, closer
        self.closing = closing
        self._ended = False
        self._pending: tuple[int, Any, list[int]] | None = None  # check's result for the token it let through
        self.replaced = 0  # tokens replaced by the budget rule (tests, benchmarks)

    def allowed(self, remaining: int) -> Tensor:
        """Bool ``(vocab_size,)``: the tokens the grammar allows next (end tokens where the output may end)."""
        if self._ended or self.matcher.is_stopped():
            mask = np.zeros(self.vocab.vocab_size, dtype=bool)
            mask[list(self.vocab.end_ids)] = True
            return torch.from_numpy(mask)
        return torch.from_numpy(_unpack(self.matcher.compute_bitmask(), self.vocab.vocab_size))

    def check(self, token: int, remaining: int) -> int:
        """``token`` if the output can still be completed in ``remaining - 1`` tokens after it, else the
        first token of the current closing path (which can)."""
        if token in self.vocab.end_ids or self._ended:
            return token
        m = self.matcher.deep_copy()
        if m.consume_token(token):
            path = self._kept(m, token, remaining)
            if path is None:
                path = self.closer.path(m)
            if path is not None and len(path) <= remaining - 1:
                self._pending = (token, m, path)
                return token
        if not self.closing:  # accepting: end the output (any end id) instead of a token that cannot fit
            if self.vocab.end_ids:
                return self.vocab.end_ids[0]
            return token
        self.replaced += 1
        first = self.closing[0]
        m = self.matcher.deep_copy()
        m.consume_token(first)
        self._pending = (first, m, self.closing[1:])
        return first

    def _kept(self, m: Any, token: int, remaining: int) -> list[int] | None:
        """The current closing path (less its first token when that is ``token``) if it still closes the
        output from ``m``, the state after ``token``, with more than ``KEEP_SLACK`` tokens of the budget
        to spare; else None (search afresh). Checked with ``validate_tokens`` (no state change): the path
        then an end token, which llguidance allows only where the output may end."""
        if not self.vocab.end_ids:
            return None
        path = self.closing[1:] if self.closing[:1] == [token] else self.closing
        if len(path) + KEEP_SLACK >= remaining - 1:
            return None
        if m.validate_tokens([*path, self.vocab.end_ids[0]]) != len(path) + 1:
            return None
        return path

    def advance(self, token: int) -> None:
        """Move past ``token``; raise ``LaminaError`` if the grammar never allowed it."""
        if token in self.vocab.end_ids and (self.matcher.is_accepting() or self.matcher.is_stopped()):
            self._ended = True
            return
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == token:
            self.matcher, self.closing = pending[1], pending[2]
            return
        if self.done or not self.matcher.consume_token(token):
            raise LaminaError(
                f"token {token} cannot continue the constrained output here; the caller must apply "
                "constraint.allowed(...) to the logits before picking a token and stop once it is done"
            )
        path = self.closer.path(self.matcher)
        self.closing = path if path is not None else self.closing[1:]

    @property
    def done(self) -> bool:
        """The output is complete: the grammar allows nothing more, or an end token came where it may end."""
        return self._ended or self.matcher.is_stopped()

    def copy(self) -> GrammarConstraint:
        """An independent copy at the same state."""
        other = GrammarConstraint(self.vocab, self.matcher.deep_copy(), self.closer, self.closing)
        other._ended = self._ended
        return other


def make_grammar_constraint(
    cfg: GenerationConfig, tokenizer: Tokenizer, vocab_size: int, end_ids: Sequence[int]
) -> GrammarConstraint:
    """The JSON Schema, regex or grammar constraint of ``cfg`` (see :func:`grammar_kind`).

    Compiled grammars are cached per tokenizer. Raises ``ConfigError`` up front for an unsupported schema
    keyword (named), an unreadable regex or grammar, a vocabulary without the one-byte tokens, and a
    ``max_new_tokens`` below the tokens the shortest output needs (counted as one-byte tokens).
    """
    kind = grammar_kind(cfg)
    if kind is None:
        raise ConfigError("no json_schema, regex or grammar given")
    vocab = _vocab(tokenizer, vocab_size, end_ids)
    if len(vocab.one_byte) < 256:
        missing = bytes(sorted(set(range(256)) - set(vocab.one_byte)))
        if any(b in missing for b in _PRINTABLE):
            raise ConfigError(
                f"{kind} constraints need a one-byte token for each byte ({missing[:12]!r} are missing); "
                "byte-level BPE and byte-fallback vocabularies have them"
            )
    source = {"json_schema": cfg.json_schema, "regex": cfg.regex, "grammar": cfg.grammar}[kind]
    key = (kind, json.dumps(source, sort_keys=True) if kind == "json_schema" else str(source))
    grammar = vocab.grammars.get(key)
    if grammar is None:
        grammar = compile_grammar(kind, source)
        vocab.grammars[key] = grammar
        if len(vocab.grammars) > 64:
            vocab.grammars.pop(next(iter(vocab.grammars)))
    llg = _llguidance()
    matcher = llg.LLMatcher(vocab.ll, grammar, log_level=0)
    if matcher.is_error():
        raise ConfigError(f"{kind}: {matcher.get_error()}")
    closer = _Closer(vocab)
    closing = closer.path(matcher)
    if closing is None:
        raise ConfigError(
            f"{kind}: no output of at most {MAX_CLOSING_BYTES} bytes was found for it; "
            "fix: bound the grammar (e.g. fewer required fields or smaller minItems)"
        )
    if cfg.max_new_tokens < len(closing):
        raise ConfigError(
            f"max_new_tokens={cfg.max_new_tokens} is too small: the shortest {kind} output found, "
            f"{vocab.ll.decode_str(closing)!r}, needs {len(closing)} tokens; "
            f"fix: max_new_tokens >= {len(closing)}"
        )
    return GrammarConstraint(vocab, matcher, closer, closing)
