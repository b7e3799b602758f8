"""Sampling: logits processors in a fixed, documented order; per-sequence samplers; log-probabilities.

Three layers, each usable on its own:

1. **Processors**: small functions on a batch of logits ``(B, V)`` float32 that return new logits. A token
   stays a *candidate* while its logit is finite; truncation samplers set the others to ``-inf``.
   Token histories are ``(B, L)`` long tensors left-padded with ``PAD`` (-1) (``pad_left`` builds them).
   Where ``transformers`` has the same processor, the output is equal to it (``tests/generate``).
2. ``process_logits`` / ``sample``: the whole chain of one ``GenerationConfig`` on rows that share it
   (the batched path).
3. ``Sampler``: one sequence's state (config, prompt and output ids, its own ``torch.Generator`` seeded
   from ``cfg.seed``, mirostat's running ``mu``); ``sample_batch`` samples a running batch whose rows
   may each have a different config, grouping rows with equal settings onto the batched path. A row's
   tokens depend only on its own logits, config and generator: never on the other rows of the batch.

The order (see ``GenerationConfig``): logit_bias, bad_words_ids, allowed_token_ids, no_repeat_ngram_size,
min_new_tokens; then ``cfg.samplers`` in order (default ``penalties, dry, top_n_sigma, top_k, typical_p,
top_p, min_p, xtc, temperature``); then a draw from the softmax (or mirostat v1/v2). Greedy decoding runs
only the first stage, "penalties" and "dry", and takes the argmax.

Randomness per row and step, in this order: one uniform for the XTC coin (when XTC is on), one uniform
for the draw (inverse CDF). Log-probabilities (``token_logprobs``) are taken from whatever logits the
caller passes: the engine passes the raw model logits (OpenAI / vLLM semantics); ``Sampler.process``
gives the processed ones for those who want the distribution actually sampled from.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Protocol

import torch
from torch import Tensor

from lamina.config import LOGITS_PROCESSORS, PICK_FIELDS, GenerationConfig
from lamina.errors import ConfigError

PAD = -1  # padding in token histories: never a token id
NEG_INF = float("-inf")
PENALTY_SAMPLERS = tuple(p.name for p in LOGITS_PROCESSORS if p.stage == "penalty")  # also run when greedy
TRUNCATION_SAMPLERS = tuple(p.name for p in LOGITS_PROCESSORS if p.stage == "truncation")  # not with mirostat
MIROSTAT_M = 100  # llama.cpp: tokens used to estimate the Zipf exponent in Mirostat v1
_FLOAT_MAX_LOG = 88.7228391  # log(float32 max): DRY clamps its exponent below it (llama.cpp)

Rows = Sequence[Sequence[int]]  # one token-id list per row


# ===================================================================================== histories


def pad_left(rows: Rows, device: torch.device | str | None = None) -> Tensor:
    """``(B, L)`` long tensor of token-id ``rows``, left-padded with ``PAD``: the layout processors take."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            out[i, width - len(r) :] = torch.as_tensor(list(r), dtype=torch.long)
    return out.to(device) if device is not None else out


def token_counts(ids: Tensor, vocab_size: int) -> Tensor:
    """``(B, V)`` float: how often each token occurs in each row of ``ids`` (``PAD`` and ids >= V ignored)."""
    idx = torch.where((ids >= 0) & (ids < vocab_size), ids, vocab_size)  # spare column for the ignored
    counts = torch.zeros(ids.shape[0], vocab_size + 1, device=ids.device)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=counts.dtype))
    return counts[:, :vocab_size]


def _check_ids(name: str, ids: Sequence[int], vocab_size: int) -> None:
    bad = sorted({t for t in ids if t >= vocab_size})
    if bad:
        raise ConfigError(
            f"{name} names token ids {bad[:5]} but the model's vocabulary has {vocab_size} tokens (0..{vocab_size - 1})"
        )


# ===================================================================================== stage 1: constraints


def apply_logit_bias(logits: Tensor, bias: Mapping[int, float]) -> Tensor:
    """Add ``bias[token]`` to that token's logit (-inf bans it): OpenAI / vLLM / llama.cpp ``logit_bias``."""
    if not bias:
        return logits
    _check_ids("logit_bias", list(bias), logits.shape[-1])
    vec = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
    vec[list(bias)] = torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    return logits + vec


def apply_sequence_bias(logits: Tensor, ids: Tensor, biases: Mapping[tuple[int, ...], float]) -> Tensor:
    """Bias the last token of each sequence in ``biases`` in the rows whose history ends with the rest of it.

    A one-token sequence is biased everywhere. Equals ``transformers``' ``SequenceBiasLogitsProcessor``.
    """
    if not biases:
        return logits
    V = logits.shape[-1]
    _check_ids("sequence bias", [t for seq in biases for t in seq], V)
    bias = torch.zeros_like(logits)
    single = {seq[0]: b for seq, b in biases.items() if len(seq) == 1}
    if single:
        length_1 = torch.zeros(V, dtype=torch.float, device=logits.device)
        length_1[list(single)] = torch.tensor(list(single.values()), device=logits.device)
        bias += length_1
    by_prefix_len: dict[int, list[tuple[tuple[int, ...], float]]] = {}
    for seq, b in biases.items():
        if len(seq) > 1:
            by_prefix_len.setdefault(len(seq) - 1, []).append((seq, b))
    for n, group in by_prefix_len.items():
        if n > ids.shape[1]:  # the history is shorter than the prefix
            continue
        prefixes = torch.tensor([seq[:-1] for seq, _ in group], device=ids.device)  # (G, n)
        last = torch.tensor([seq[-1] for seq, _ in group], device=logits.device)  # (G,)
        values = torch.tensor([b for _, b in group], dtype=torch.float, device=logits.device)
        matching = (ids[:, None, -n:] == prefixes).all(dim=-1)  # (B, G)
        bias.index_add_(1, last, torch.where(matching, values, 0.0).to(bias.dtype))
    return logits + bias


def apply_bad_words(logits: Tensor, ids: Tensor, bad_words_ids: Sequence[Sequence[int]]) -> Tensor:
    """Ban the last token of each bad sequence where the history ends with the rest of it.

    Equals ``transformers``' ``NoBadWordsLogitsProcessor`` (given no eos to exempt).
    """
    return apply_sequence_bias(logits, ids, {tuple(seq): NEG_INF for seq in bad_words_ids})


def apply_allowed_tokens(logits: Tensor, allowed_token_ids: Sequence[int]) -> Tensor:
    """Ban every token not in ``allowed_token_ids`` (vLLM ``allowed_token_ids``)."""
    _check_ids("allowed_token_ids", allowed_token_ids, logits.shape[-1])
    banned = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
    banned[list(allowed_token_ids)] = False
    return logits.masked_fill(banned, NEG_INF)


def apply_no_repeat_ngram(logits: Tensor, ids: Tensor, ngram_size: int) -> Tensor:
    """Ban every token that would complete an n-gram already in the history.

    Equals ``transformers``' ``NoRepeatNGramLogitsProcessor``; n-grams that touch padding do not count.
    """
    B, L = ids.shape
    V = logits.shape[-1]
    if ngram_size <= 0 or L < ngram_size:
        return logits
    # an n-gram is completed by the next token only if its first n-1 tokens equal the current suffix
    prefix = ids[:, L + 1 - ngram_size :]  # (B, n-1)
    windows = ids.unfold(dimension=1, size=ngram_size, step=1)  # (B, L-n+1, n)
    matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1) & (windows >= 0).all(dim=-1)
    banned = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device)  # spare column: no ban
    last = windows[..., -1]
    banned.scatter_(1, torch.where(matches & (last < V), last, V), True)
    return logits.masked_fill(banned[:, :V], NEG_INF)


def apply_min_new_tokens(
    logits: Tensor, n_generated: int | Tensor, min_new_tokens: int, stop_token_ids: Sequence[int]
) -> Tensor:
    """Ban ``stop_token_ids`` (eos and friends) in rows that have generated fewer than ``min_new_tokens``.

    Equals ``transformers``' ``MinNewTokensLengthLogitsProcessor`` with n_generated = length - prompt length.
    """
    if min_new_tokens <= 0 or not stop_token_ids:
        return logits
    V = logits.shape[-1]
    stop = torch.zeros(V, dtype=torch.bool, device=logits.device)
    stop[[t for t in stop_token_ids if t < V]] = True
    n = torch.as_tensor(n_generated, device=logits.device).reshape(-1, 1)  # (B, 1) or (1, 1)
    return logits.masked_fill(stop & (n < min_new_tokens), NEG_INF)


def min_new_tokens_stops(cfg: GenerationConfig) -> list[int]:
    """The ids ``min_new_tokens`` bans until that many tokens are out: the eos ids (none with
    ``ignore_eos``), then ``stop_token_ids``. The sampler's processor and the engine's batched greedy
    path both ban these."""
    return [*([] if cfg.ignore_eos else cfg.eos_token_ids), *cfg.stop_token_ids]


# ===================================================================================== penalties


def apply_repetition_penalty(logits: Tensor, ids: Tensor, penalty: float) -> Tensor:
    """CTRL / HF repetition penalty on every token in ``ids``: positive logits / penalty, negative * penalty.

    Equals ``transformers``' ``RepetitionPenaltyLogitsProcessor`` (pass the window of history to penalize).
    """
    if penalty == 1.0 or ids.shape[1] == 0:
        return logits
    seen = token_counts(ids, logits.shape[-1]) > 0
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def apply_frequency_presence_penalty(
    logits: Tensor, counts: Tensor, frequency: float, presence: float
) -> Tensor:
    """OpenAI penalties: ``logit - frequency * count - presence * (count > 0)``, counts ``(B, V)``.

    ``counts`` are of the *generated* tokens (``token_counts(outputs, V)``), as OpenAI and vLLM define them.
    """
    if frequency == 0 and presence == 0:
        return logits
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def dry_penalties(
    tokens: Sequence[int],
    multiplier: float,
    base: float,
    allowed_length: int,
    last_n: int = -1,
    breakers: Sequence[Sequence[int]] = (),
) -> dict[int, float]:
    """DRY for one sequence: token -> amount to subtract from its logit (llama.cpp / koboldcpp semantics).

    For each earlier place in the last ``last_n`` tokens (-1: all) whose preceding tokens repeat the end of
    the context for L >= ``allowed_length`` tokens, the token that came next there would extend the
    repetition: it loses ``multiplier * base ** (L - allowed_length)`` (L: its longest such repetition).
    A repetition never reaches back across the latest sequence breaker (token-id sequences, e.g. from
    ``dry_breaker_ids``), and a one-token breaker is never penalized.
    """
    if multiplier == 0 or base < 1 or last_n == 0:
        return {}
    window = list(tokens) if last_n < 0 else list(tokens)[-last_n:]
    N = len(window)
    if N <= allowed_length:
        return {}
    tails: dict[int, list[tuple[int, ...]]] = {}
    for seq in breakers:
        tails.setdefault(seq[0], []).append(tuple(seq[1:]))
    # 1. the latest complete sequence breaker limits how long a repetition can be
    rep_limit = N
    for i in range(N):  # i tokens back from the end
        longest = -1
        for tail in tails.get(window[N - 1 - i], ()):
            if longest < len(tail) <= i and all(t == window[N - i + o] for o, t in enumerate(tail)):
                longest = len(tail)
        if longest >= 0:
            rep_limit = i - longest
            break
    if rep_limit < allowed_length:
        return {}
    # 2. z[k]: how many tokens before (and including) position N-1-k equal the end of the context
    z = _z_function(window[::-1])
    # 3. the token after each such earlier occurrence would extend the repetition
    longest_for: dict[int, int] = {}
    for k in range(1, N):
        length = min(z[k], rep_limit)
        if length >= allowed_length:
            token = window[N - k]
            longest_for[token] = max(longest_for.get(token, 0), length)
    # 4. penalties, the exponent clamped so the power stays a float32
    single_breakers = {seq[0] for seq in breakers if len(seq) == 1}
    max_exponent = int(_FLOAT_MAX_LOG / math.log(base)) if base > 1.000001 else 0
    out = {}
    for token, length in longest_for.items():
        if token not in single_breakers:
            exponent = length - allowed_length
            if max_exponent > 0:
                exponent = min(exponent, max_exponent)
            out[token] = multiplier * base**exponent
    return out


def _z_function(s: Sequence[int]) -> list[int]:
    """z[k] = length of the longest common prefix of s and s[k:] (z[0] = len(s)), in O(len(s))."""
    n = len(s)
    z = [0] * n
    if n:
        z[0] = n
    left = right = 0
    for k in range(1, n):
        if k < right:
            z[k] = min(right - k, z[k - left])
        while k + z[k] < n and s[z[k]] == s[k + z[k]]:
            z[k] += 1
        if k + z[k] > right:
            left, right = k, k + z[k]
    return z


def apply_dry(
    logits: Tensor,
    histories: Rows,
    multiplier: float,
    base: float,
    allowed_length: int,
    last_n: int = -1,
    breakers: Sequence[Sequence[int]] = (),
) -> Tensor:
    """Subtract ``dry_penalties`` of each row's history (prompt + output) from its logits."""
    if multiplier == 0:
        return logits
    out = logits.clone()
    V = logits.shape[-1]
    for row, tokens in enumerate(histories):
        pen = {
            t: p
            for t, p in dry_penalties(tokens, multiplier, base, allowed_length, last_n, breakers).items()
            if t < V
        }
        if pen:
            idx = torch.tensor(list(pen), device=logits.device)
            out[row, idx] -= torch.tensor(list(pen.values()), dtype=logits.dtype, device=logits.device)
    return out


class _TokenizerLike(Protocol):  # lamina.Tokenizer or a transformers tokenizer
    def __hash__(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


@functools.lru_cache(maxsize=8)
def dry_breaker_ids(
    tokenizer: _TokenizerLike, breakers: tuple[str, ...], max_tail_len: int = 20
) -> list[list[int]]:
    """DRY's string sequence breakers as token-id sequences (llama.cpp ``get_overlapping_token_sequences``).

    ``[t]`` for every token whose text contains a breaker; ``[t, *tail]`` for a token whose text ends with
    the start of a breaker, ``tail`` being the tokenization of the rest (at most ``max_tail_len`` ids).
    Decodes every token once: cached per (tokenizer, breakers).
    """
    texts = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
    out: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    for breaker in breakers:
        breaker = breaker[:40]  # llama.cpp's limit
        for token, word in enumerate(texts):
            found: list[tuple[int, ...]] = []
            if breaker in word:
                found.append((token,))
            else:
                for pos in (p for p, ch in enumerate(word) if ch == breaker[0]):
                    n = len(word) - pos  # the word ends with breaker[:n]?
                    if n < len(breaker) and word[pos:] == breaker[:n]:
                        tail = tokenizer.encode(breaker[n:], add_special_tokens=False)[:max_tail_len]
                        found.append((token, *tail))
            for seq in found:
                if seq not in seen:
                    seen.add(seq)
                    out.append(list(seq))
    return out


# ===================================================================================== truncation


def top_n_sigma(logits: Tensor, n: float) -> Tensor:
    """Keep the candidates whose logit is >= max - n * std of the candidates' logits (llama.cpp)."""
    if n <= 0:
        return logits
    finite = torch.isfinite(logits)
    count = finite.sum(-1, keepdim=True).clamp(min=1)
    mean = torch.where(finite, logits, 0.0).sum(-1, keepdim=True) / count
    var = torch.where(finite, (logits - mean) ** 2, 0.0).sum(-1, keepdim=True) / count
    top = logits.max(-1, keepdim=True).values
    return logits.masked_fill(logits < top - n * var.sqrt(), NEG_INF)


def top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits (and ties with the k-th). Equals ``transformers``' ``TopKLogitsWarper``."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus: keep the most likely tokens up to probability mass ``p``, at least one.

    Equals ``transformers``' ``TopPLogitsWarper``: a token goes when the mass of the tokens less likely
    than or as likely as it is <= 1 - p.
    """
    if p >= 1:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - p)
    remove[..., -1:] = False  # keep the most likely token
    return logits.masked_fill(remove.scatter(1, order, remove), NEG_INF)


def min_p(logits: Tensor, p: float) -> Tensor:
    """Keep tokens with probability >= ``p`` * the top probability. Equals ``transformers``' ``MinPLogitsWarper``."""
    if p <= 0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    remove = probs < p * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(remove, NEG_INF)


def typical_p(logits: Tensor, p: float) -> Tensor:
    """Locally typical sampling: keep the tokens whose surprise is closest to the entropy, up to mass ``p``.

    Equals ``transformers``' ``TypicalLogitsWarper``.
    """
    if p >= 1:
        return logits
    logp = torch.log_softmax(logits, dim=-1)
    entropy = -(logp * logp.exp()).nansum(-1, keepdim=True)
    shifted = torch.abs(-logp - entropy)
    sorted_shifted, order = torch.sort(shifted, descending=False)
    cumulative = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < p).sum(dim=1).clamp_(max=logits.shape[-1] - 1)
    remove = sorted_shifted > sorted_shifted.gather(1, last.view(-1, 1))
    remove[..., :1] = False
    return logits.masked_fill(remove.scatter(1, order, remove), NEG_INF)


def xtc(logits: Tensor, threshold: float, apply: Tensor | bool = True) -> Tensor:
    """XTC (llama.cpp): remove every candidate with probability >= ``threshold`` except the least likely.

    Only in rows where ``apply`` (a ``(B,)`` bool: the coin came up, with probability xtc_probability)
    and there are at least two candidates; a threshold above 0.5 never removes anything. Tokens as likely
    as the least likely one above the threshold all stay (llama.cpp keeps one of them, by sort order).
    """
    if threshold > 0.5:
        return logits
    probs = torch.softmax(logits, dim=-1)
    above = probs >= threshold
    last = torch.where(above, probs, math.inf).amin(dim=-1, keepdim=True)  # least likely above threshold
    ok = torch.as_tensor(apply, device=logits.device).reshape(-1, 1) & (above.sum(-1, keepdim=True) >= 2)
    return logits.masked_fill((probs > last) & ok, NEG_INF)


# ===================================================================================== temperature


def apply_temperature(
    logits: Tensor, temperature: float, dynatemp_range: float = 0.0, dynatemp_exponent: float = 1.0
) -> Tensor:
    """Divide by ``temperature`` (> 0); with ``dynatemp_range`` r > 0, llama.cpp's dynamic temperature.

    Dynamic: t' = lo + (hi - lo) * (H / log n) ** exponent with lo = max(0, t - r), hi = t + r, H the
    entropy of the candidates' distribution and n their number; rows with one candidate are left alone,
    and t' = 0 keeps only the most likely token. Equals ``transformers``' ``TemperatureLogitsWarper``
    when r = 0.
    """
    if dynatemp_range <= 0:
        return logits if temperature == 1.0 else logits / temperature
    lo, hi = max(0.0, temperature - dynatemp_range), temperature + dynatemp_range
    count = torch.isfinite(logits).sum(-1, keepdim=True)
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, 0.0).sum(-1, keepdim=True)
    normalized = entropy / count.clamp(min=2).float().log()
    t = lo + (hi - lo) * normalized.pow(dynatemp_exponent)  # (B, 1)
    greedy = logits.masked_fill(logits < logits.max(-1, keepdim=True).values, NEG_INF)
    scaled = torch.where(t > 0, logits / t.clamp(min=1e-30), greedy)
    return torch.where(count > 1, scaled, logits)


# ===================================================================================== drawing tokens


def draw(probs: Tensor, uniforms: Tensor) -> Tensor:
    """Inverse-CDF draw: for each row, the token where the cumulative probability passes ``u * total``.

    ``probs`` (B, V) need not be normalized; ``uniforms`` (B,) in [0, 1). Never returns a zero-probability
    token.
    """
    cdf = probs.double().cumsum(-1)
    target = uniforms.to(cdf) * cdf[:, -1]
    idx = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)
    # idx < V has cdf[idx] > cdf[idx - 1]: a token of nonzero probability; only idx = V (rounding put the
    # target at the total) needs the last possible token (one check instead of three passes over probs)
    if not bool((idx >= probs.shape[-1]).any()):
        return idx
    last_possible = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)
    return torch.minimum(idx, last_possible)


@dataclass
class MirostatState:
    """Mirostat's running target ``mu`` (in bits) for one sequence; starts at 2 * tau."""

    mu: float


def mirostat_v1(
    logits: Tensor,
    states: Sequence[MirostatState],
    uniforms: Tensor,
    tau: float,
    eta: float,
    m: int = MIROSTAT_M,
) -> Tensor:
    """Mirostat v1 (llama.cpp): estimate the Zipf exponent s from the top ``m`` probabilities, keep the
    top k tokens that make the expected surprise mu, draw one, then ``mu -= eta * (surprise - tau)``.
    """
    V = logits.shape[-1]
    probs, order = torch.sort(torch.softmax(logits, dim=-1), dim=-1, descending=True)
    n_cand = (probs > 0).sum(-1)
    M = max(1, min(m - 1, V - 1))
    i = torch.arange(M, device=logits.device, dtype=torch.float32)
    t = torch.log((i + 2) / (i + 1))
    b = torch.log(probs[:, :M] / probs[:, 1 : M + 1])
    valid = i[None] < (n_cand - 1)[:, None]  # p[i + 1] > 0
    s_hat = torch.where(valid, t * b, 0.0).sum(-1).double() / torch.where(valid, t * t, 0.0).sum(-1).double()
    mu = torch.tensor([s.mu for s in states], dtype=torch.float64, device=logits.device)
    eps = s_hat - 1
    k = ((eps * 2**mu) / (1 - V ** (-eps))) ** (1 / s_hat)
    k = torch.nan_to_num(k, nan=1.0, posinf=float(V)).clamp(1, V).long()
    keep = torch.arange(V, device=logits.device)[None] < k[:, None]
    return _draw_sorted_and_update(probs * keep, order, states, uniforms, tau, eta)


def mirostat_v2(
    logits: Tensor, states: Sequence[MirostatState], uniforms: Tensor, tau: float, eta: float
) -> Tensor:
    """Mirostat v2 (llama.cpp): keep the tokens with surprise -log2 p <= mu (at least one), draw, update mu."""
    probs, order = torch.sort(torch.softmax(logits, dim=-1), dim=-1, descending=True)
    mu = torch.tensor([s.mu for s in states], dtype=probs.dtype, device=logits.device)
    keep = -torch.log2(probs) <= mu[:, None]  # a prefix: surprise grows down the sorted list
    keep[:, 0] = True
    return _draw_sorted_and_update(probs * keep, order, states, uniforms, tau, eta)


def _draw_sorted_and_update(
    kept: Tensor, order: Tensor, states: Sequence[MirostatState], uniforms: Tensor, tau: float, eta: float
) -> Tensor:
    kept = kept / kept.sum(-1, keepdim=True)
    pos = draw(kept, uniforms)
    surprise = -torch.log2(kept.gather(1, pos[:, None]).squeeze(1))
    for state, s in zip(states, surprise.tolist(), strict=True):
        state.mu -= eta * (s - tau)
    return order.gather(1, pos[:, None]).squeeze(1)


# ===================================================================================== the chain


def active_samplers(cfg: GenerationConfig) -> list[str]:
    """The chain samplers that run for ``cfg``, in order: all of ``cfg.samplers`` when sampling; only
    the penalties when greedy; penalties and temperature before mirostat."""
    if not cfg.sampling:
        return [s for s in cfg.samplers if s in PENALTY_SAMPLERS]
    if cfg.mirostat:
        return [s for s in cfg.samplers if s not in TRUNCATION_SAMPLERS]
    return list(cfg.samplers)


def xtc_on(cfg: GenerationConfig) -> bool:
    """Whether XTC runs (and draws its coin each step) for ``cfg``."""
    return cfg.xtc_probability > 0 and cfg.xtc_threshold <= 0.5 and "xtc" in active_samplers(cfg)


@dataclass
class StepContext:
    """What a processing step may read besides the logits and the config: each row's prompt and output
    ids, DRY's breakers as token ids, XTC's coins (B,) (drawn from torch's global generator when None)."""

    prompts: list[Sequence[int]]
    outputs: list[Sequence[int]]
    dry_breakers: Sequence[Sequence[int]] = ()
    xtc_coins: Tensor | None = None
    device: torch.device | str | None = None

    @functools.cached_property
    def contexts(self) -> list[list[int]]:
        """Each row's prompt + output."""
        return [[*p, *o] for p, o in zip(self.prompts, self.outputs, strict=True)]

    @functools.cached_property
    def ids(self) -> Tensor:
        """``contexts`` as a left-padded ``(B, L)`` tensor (``pad_left``)."""
        return pad_left(self.contexts, self.device)


# One step function per ``LOGITS_PROCESSORS`` entry (its ``apply``): (logits, cfg, context) -> logits.


def _step_logit_bias(logits: Tensor, cfg: GenerationConfig, ctx: StepContext) -> Tensor:
    return apply_logit_bias(logits, cfg.logit_bias)


def _step_bad_words(logits: Tensor, cfg: GenerationConfig, ctx: StepContext) -> Tensor:
    return apply_bad_words(logits, ctx.ids, cfg.bad_words_ids)


def _step_allowed_tokens(logits: Tensor, cfg: GenerationConfig, ctx: StepContext) -> Tensor:
    assert cfg.allowed_token_ids is not None
    return apply_allowed_tokens(logits, cfg.allowed_token_ids)


def _step_no_repeat_ngram(logits: Tensor, cfg: GenerationConfig, ctx: StepContext) -> Tensor:
    return apply_no_repeat_ngram(logits, ctx.ids, cfg.no_repeat_ngram_size)


def _step_min_new_tokens(logits: Tensor, cfg: GenerationConfig, ctx: StepContext) -> Tensor:
    n_generated = torch.tensor([len(o) for o in ctx.outputs], device=logits.device)
    return apply_min_new_tokens(logits, n_generated, cfg.min_new_tokens, min_new_tokens_stops(cfg))


def _step_penalties(logits: Tensor, cfg: GenerationConfig, ctx: StepContext) -> Tensor:
    n = cfg.repetition_penalty_last_n
    if cfg.repetition_penalty != 1 and n != 0:
        window = ctx.ids if n < 0 else pad_left([c[-n:] for c in ctx.contexts], logits.device)
        logits = apply_repetition_penalty(logits, window, cfg.repetition_penalty)
    if cfg.frequency_penalty != 0 or cfg.presence_penalty != 0:
        counts = token_counts(pad_left(ctx.outputs, logits.device), logits.shape[-1])
        logits = apply_frequency_presence_penalty(logits, counts, cfg.frequency_penalty, cfg.presence_penalty)
    return logits


def _step_dry(logits: Tensor, cfg: GenerationConfig, ctx: StepContext) -> Tensor:
    return apply_dry(
        logits, ctx.contexts, cfg.dry_multiplier, cfg.dry_base, cfg.dry_allowed_length,
        cfg.dry_penalty_last_n, ctx.dry_breakers,
    )  # fmt: skip


def _step_top_n_sigma(logits: Tensor, cfg: GenerationConfig, ctx: StepContext) -> Tensor:
    return top_n_sigma(logits, cfg.top_n_sigma or -1.0)


def _step_top_k(logits: Tensor, cfg: GenerationConfig, ctx: StepContext) -> Tensor:
    return top_k(logits, cfg.top_k)


def _step_typical_p(logits: Tensor, cfg: GenerationConfig, ctx: StepContext) -> Tensor:
    return typical_p(logits, cfg.typical_p)


def _step_top_p(logits: Tensor, cfg: GenerationConfig, ctx: StepContext) -> Tensor:
    return top_p(logits, cfg.top_p)


def _step_min_p(logits: Tensor, cfg: GenerationConfig, ctx: StepContext) -> Tensor:
    return min_p(logits, cfg.min_p)


def _step_xtc(logits: Tensor, cfg: GenerationConfig, ctx: StepContext) -> Tensor:
    if not xtc_on(cfg):
        return logits
    coins = ctx.xtc_coins if ctx.xtc_coins is not None else torch.rand(logits.shape[0], dtype=torch.float64)
    return xtc(logits, cfg.xtc_threshold, coins.to(logits.device) <= cfg.xtc_probability)


def _step_temperature(logits: Tensor, cfg: GenerationConfig, ctx: StepContext) -> Tensor:
    return apply_temperature(logits, cfg.temperature, cfg.dynatemp_range, cfg.dynatemp_exponent)


_STEPS = {p.name: globals()[p.apply] for p in LOGITS_PROCESSORS}  # a missing step function fails here
_BY_NAME = {p.name: p for p in LOGITS_PROCESSORS}
_FIRST = [p for p in LOGITS_PROCESSORS if p.stage == "first"]


def process_logits(
    logits: Tensor,
    cfg: GenerationConfig,
    *,
    prompt_ids: Rows | None = None,
    output_ids: Rows | None = None,
    dry_breakers: Sequence[Sequence[int]] = (),
    xtc_coins: Tensor | None = None,
) -> Tensor:
    """``cfg``'s processors on logits (B, V) of rows that share ``cfg``: stage 1, then ``active_samplers``.

    ``prompt_ids`` / ``output_ids``: each row's prompt and generated ids so far (default: empty).
    ``xtc_coins``: (B,) uniforms for XTC (drawn from torch's global generator when not given).
    Returns new float32 logits; the input is not modified.
    """
    logits = logits.float()
    B = logits.shape[0]
    prompts = list(prompt_ids) if prompt_ids is not None else [[] for _ in range(B)]
    outputs = list(output_ids) if output_ids is not None else [[] for _ in range(B)]
    if len(prompts) != B or len(outputs) != B:
        raise ValueError(f"{len(prompts)} prompts and {len(outputs)} outputs for {B} rows of logits")
    ctx = StepContext(prompts, outputs, dry_breakers, xtc_coins, logits.device)
    for p in [*_FIRST, *(_BY_NAME[name] for name in active_samplers(cfg))]:
        if p.on(cfg):
            logits = _STEPS[p.name](logits, cfg, ctx)
    return logits


def greedy_is_argmax(cfg: GenerationConfig) -> bool:
    """True when ``cfg`` decodes greedily and nothing changes the logits first (no bias, ban or
    penalty is on): the next token is the bare argmax of the model's logits (the engine's fast path)."""
    if cfg.sampling:
        return False
    return not any(p.on(cfg) for p in [*_FIRST, *(_BY_NAME[name] for name in active_samplers(cfg))])


Generators = torch.Generator | Sequence[torch.Generator | None] | None


def _uniforms(generators: Generators, B: int, device: torch.device) -> Tensor:
    """One uniform in [0, 1) per row, each from its row's generator (a single one serves rows in order).

    Drawn where the generator lives (CPU for ``Sampler``s, so a seed gives the same draws on every
    device), then moved to ``device``.
    """
    gens = generators if isinstance(generators, Sequence) else [generators] * B
    if len(gens) != B:
        raise ValueError(f"{len(gens)} generators for {B} rows")
    values = [
        torch.rand((), dtype=torch.float64, generator=g, device=g.device if g is not None else None)
        for g in gens
    ]
    if not values:
        return torch.zeros(0, dtype=torch.float64, device=device)
    return torch.stack([v.to(device) for v in values])


def sample(
    logits: Tensor,
    cfg: GenerationConfig,
    generator: Generators = None,
    *,
    prompt_ids: Rows | None = None,
    output_ids: Rows | None = None,
    mirostat: Sequence[MirostatState] | None = None,
    dry_breakers: Sequence[Sequence[int]] = (),
) -> Tensor:
    """Next token ids (B,) for logits (B, V) of rows that share ``cfg``.

    Greedy (``cfg.sampling`` False): the argmax after stage 1 and the penalties. Sampling: the full chain,
    then a draw from the softmax, or mirostat (``mirostat``: the rows' states, updated in place; fresh
    ones when not given). ``generator``: one per row, or one for all rows (drawn from in row order), or
    None (torch's global generator). Beam search (num_beams > 1) is the engine's: here it is greedy.
    A row with every token banned is a ``ConfigError``.
    """
    B = logits.shape[0]
    coins = _uniforms(generator, B, logits.device) if cfg.sampling and xtc_on(cfg) else None
    processed = process_logits(
        logits, cfg, prompt_ids=prompt_ids, output_ids=output_ids, dry_breakers=dry_breakers, xtc_coins=coins
    )
    # a row's finite maximum is one of its tokens left: one reduction decides the usual case, where every
    # row has one; only otherwise the exact per-row test (no finite logit at all)
    if (
        not bool(torch.isfinite(processed.amax(-1)).all())
        and (empty := ~torch.isfinite(processed).any(-1)).any()
    ):
        raise ConfigError(
            f"no token is left to generate in row {int(empty.nonzero()[0, 0])}: logit_bias, bad_words_ids, "
            "allowed_token_ids, no_repeat_ngram_size and min_new_tokens together ban every token"
        )
    if not cfg.sampling:
        return processed.argmax(-1)
    uniforms = _uniforms(generator, B, logits.device)
    if cfg.mirostat:
        states = (
            list(mirostat)
            if mirostat is not None
            else [MirostatState(2 * cfg.mirostat_tau) for _ in range(B)]
        )
        fn = mirostat_v1 if cfg.mirostat == 1 else mirostat_v2
        return fn(processed, states, uniforms, cfg.mirostat_tau, cfg.mirostat_eta)
    return draw(torch.softmax(processed, dim=-1), uniforms)


# ===================================================================================== per-sequence samplers


def sequence_seed(seed: int | None, index: int = 0) -> int:
    """The seed of sequence ``index`` of a request: ``seed`` itself for index 0, a distinct mix of it for
    the others (n > 1 samples must differ); a draw from torch's global generator when ``seed`` is None."""
    if seed is None:
        return int(torch.randint(0, 2**62, ()).item())
    if index == 0:
        return seed
    x = (seed + index * 0x9E3779B97F4A7C15) % 2**64  # splitmix64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return (x ^ (x >> 31)) % 2**63


NOT_PROCESSING = frozenset(
    f.name for f in fields(GenerationConfig)
    if f.name not in PICK_FIELDS and not any(f.name in p.fields for p in LOGITS_PROCESSORS)
)  # fmt: skip
"""Fields the sampler never reads (stopping, output, beam search, constraints the engine applies): rows
differing only in these share the batched path. Derived from ``LOGITS_PROCESSORS`` and ``PICK_FIELDS``."""


class Sampler:
    """One sequence's sampling state: config, prompt and output ids, random generator, mirostat ``mu``.

    ``index``: which of the request's ``n`` sequences this is (each gets its own random stream).
    ``dry_breakers``: DRY's sequence breakers as token ids; computed from ``cfg.dry_sequence_breakers``
    with ``tokenizer`` when not given (DRY on without either is an error).
    """

    def __init__(
        self,
        cfg: GenerationConfig,
        prompt_ids: Sequence[int] = (),
        *,
        index: int = 0,
        tokenizer: _TokenizerLike | None = None,
        dry_breakers: Sequence[Sequence[int]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.seed = sequence_seed(cfg.seed, index)
        self.generator = torch.Generator().manual_seed(self.seed)  # CPU: the same draws on every device
        self.mirostat = MirostatState(2 * cfg.mirostat_tau) if cfg.mirostat else None
        if dry_breakers is None and cfg.dry_multiplier > 0 and cfg.dry_sequence_breakers:
            if tokenizer is None:
                raise ConfigError(
                    "dry_multiplier > 0 needs dry_sequence_breakers as token ids: give the Sampler a tokenizer "
                    "or dry_breakers (e.g. dry_breakers=[] for none)"
                )
            dry_breakers = dry_breaker_ids(tokenizer, tuple(cfg.dry_sequence_breakers))
        self.dry_breakers = [list(b) for b in dry_breakers or ()]
        settings = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in NOT_PROCESSING}
        self.batch_key = repr((sorted(settings.items()), self.dry_breakers))

    def accept(self, token: int) -> None:
        """Append a generated token to the history (``sample_batch`` does this for the tokens it picks)."""
        self.output_ids.append(int(token))

    def process(self, logits: Tensor) -> Tensor:
        """The processed logits this sequence samples from (V,) or (1, V): e.g. for processed logprobs.

        XTC is left out (its coin is not drawn) and no state changes.
        """
        row = logits.reshape(1, -1)
        out = process_logits(
            row, self.cfg, prompt_ids=[self.prompt_ids], output_ids=[self.output_ids],
            dry_breakers=self.dry_breakers, xtc_coins=torch.full((1,), math.inf),
        )  # fmt: skip
        return out.reshape(logits.shape)

    def sample(self, logits: Tensor, accept: bool = True) -> int:
        """The next token for logits (V,) or (1, V)."""
        return int(sample_batch(logits.reshape(1, -1), [self], accept=accept)[0])


def sample_batch(logits: Tensor, samplers: Sequence[Sampler], accept: bool = True) -> Tensor:
    """Next token ids (B,) for a running batch: row i with ``samplers[i]`` (its own config and generator).

    Rows whose configs agree on every setting the sampler reads run together on the batched path. The
    chosen tokens are appended to each sampler's history unless ``accept=False``.
    """
    B = logits.shape[0]
    if len(samplers) != B:
        raise ValueError(f"{len(samplers)} samplers for {B} rows of logits")
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(samplers):
        groups.setdefault(s.batch_key, []).append(i)
    whole = len(groups) == 1  # one config for the batch (e.g. a GRPO generation): no gather, no scatter
    out = torch.empty(0 if whole else B, dtype=torch.long, device=logits.device)
    for rows in groups.values():
        group = [samplers[i] for i in rows]
        cfg = group[0].cfg
        states = [s.mirostat for s in group if s.mirostat is not None]
        idx = None if whole else torch.tensor(rows, device=logits.device)
        chosen = sample(
            logits if idx is None else logits.index_select(0, idx),
            cfg,
            [s.generator for s in group],
            prompt_ids=[s.prompt_ids for s in group],
            output_ids=[s.output_ids for s in group],
            mirostat=states if cfg.mirostat else None,
            dry_breakers=group[0].dry_breakers,
        )
        if idx is None:
            out = chosen
        else:
            out[idx] = chosen
    if accept:
        for s, token in zip(samplers, out.tolist(), strict=True):
            s.accept(token)
    return out


# ===================================================================================== log-probabilities


@dataclass
class TokenLogprobs:
    """Log-probabilities of chosen tokens, with their ranks and the top alternatives."""

    logprobs: Tensor  # (B,) log-probability of each chosen token
    ranks: Tensor  # (B,) 1 = the chosen token was the most likely one
    top_ids: Tensor  # (B, k) the k most likely tokens, most likely first
    top_logprobs: Tensor  # (B, k) their log-probabilities


def token_logprobs(logits: Tensor, token_ids: Tensor, top_k: int = 0) -> TokenLogprobs:
    """Log-softmax of ``logits`` (B, V) at ``token_ids`` (B,), plus the ``top_k`` best alternatives.

    Pass the raw model logits for OpenAI / vLLM semantics (the default lamina reports), or
    ``Sampler.process(logits)`` for the distribution actually sampled from.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    ids = token_ids.to(logits.device).reshape(-1, 1)
    chosen = logp.gather(1, ids).squeeze(1)
    ranks = (logp > chosen[:, None]).sum(-1) + 1
    k = min(top_k, logits.shape[-1])
    top = torch.topk(logp, k, dim=-1) if k > 0 else None
    empty = logp.new_zeros(logp.shape[0], 0)
    return TokenLogprobs(
        logprobs=chosen,
        ranks=ranks,
        top_ids=top.indices if top is not None else empty.long(),
        top_logprobs=top.values if top is not None else empty,
    )


def prompt_logprobs(logits: Tensor, prompt_ids: Tensor, top_k: int = 0) -> TokenLogprobs:
    """Log-probabilities of prompt tokens 1..T-1 given their prefixes, from the prompt's logits (T, V).

    (The first prompt token has none: vLLM reports None for it.)
    """
    return token_logprobs(logits[:-1], prompt_ids[1:], top_k)
