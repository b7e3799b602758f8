"""Speculative decoding: a cheap draft proposes tokens, the target verifies them in one forward.

A mode of the engine (``Engine(model, draft=..., num_draft_tokens=K)``): every greedy row of the running
batch (greedy decoding with nothing that changes the logits, no logprobs asked for) is speculative. Each
engine step the draft proposes up to K tokens for every speculative row (``Drafter.propose``: K draft
forwards over those rows), then the target runs once over the whole batch: a speculative row reads its last
token and its proposals, the other rows their one token (right-padded). A row keeps the longest prefix of
its proposals that equals the target's own greedy choices, plus the target's next token, so every step
yields at least one token per row and the output is exactly the target's greedy output: only the number of
target forwards changes. Rejected positions are made invalid in both KV caches (``keep_slots``), as
padding is, and the slots after the longest kept row are dropped.

The draft is any ``Transformer`` with the target's vocabulary, or, since no small model shares most
tokenizers offline, the target's own first K blocks followed by its final norm and head (self-speculative
decoding, as in LayerSkip; ``layer_skip_draft``). That draft shares the target's weights (no extra memory)
but keeps its own KV cache for its K layers. (LayerSkip also reuses the draft's cache and hidden states
for the target's first layers in verification; that needs a forward that starts at a middle layer, which
``Transformer`` does not offer.) Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding" (greedy case); Elhoushi et al. 2024, "LayerSkip".
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lamina.config import GenerationConfig
from lamina.errors import ConfigError
from lamina.model.layers import KVCache
from lamina.model.transformer import Transformer


@dataclass
class SpeculativeOptions:
    """How the engine decodes greedy requests speculatively (the ``--draft`` / ``--speculative-layers``
    flags; ``lamina.generate``'s keywords of the same names). Neither set: plain decoding."""

    # a draft model (name or path) with the target's vocabulary: it proposes tokens the target verifies
    draft: str | None = None
    # self-speculative decoding: the target's own first K layers (and its head) are the draft
    speculative_layers: int | None = None
    num_draft_tokens: int = 4  # tokens the draft proposes per step (one target forward verifies them), >= 1

    def __post_init__(self) -> None:
        if self.num_draft_tokens < 1:
            raise ConfigError(f"num_draft_tokens={self.num_draft_tokens} must be >= 1")
        if self.draft is not None and self.speculative_layers is not None:
            raise ConfigError(
                "give draft or speculative_layers (a draft model or the target's first K layers), not both"
            )

    @property
    def enabled(self) -> bool:
        """Whether a draft or a layer count is given."""
        return self.draft is not None or self.speculative_layers is not None


@dataclass
class DraftStats:
    """Draft tokens proposed (and verified) and accepted so far, over an engine's life."""

    proposed: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed (0 when nothing was proposed)."""
        return self.accepted / self.proposed if self.proposed else 0.0


@dataclass
class SpeculativeResult:
    """The generated tokens (the target's greedy output, without the eos) and how the draft fared."""

    tokens: list[int] = field(default_factory=list)
    accepted: int = 0  # draft tokens the target agreed with
    proposed: int = 0  # draft tokens proposed (and verified)
    target_calls: int = 0  # target forwards, prefill included (greedy decoding needs one per token)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens (0 when nothing was proposed)."""
        return self.accepted / self.proposed if self.proposed else 0.0


def layer_skip_draft(target: Transformer, n_layers: int) -> Transformer:
    """A draft made of ``target``'s first ``n_layers`` blocks, then its final norm and output head.

    It shares every weight with ``target`` (a view, not a copy: training one trains the other) and has
    the config of an ``n_layers``-layer model, so ``draft.new_cache`` sizes its KV cache for those layers.
    Raises ``ConfigError`` unless 1 <= ``n_layers`` <= the target's ``n_layers``.
    """
    total = target.config.n_layers
    if not 1 <= n_layers <= total:
        raise ConfigError(f"draft_layers={n_layers} must be in 1..{total} (the target's n_layers)")
    draft = copy.copy(target)  # a new module object whose attributes are target's ...
    draft._modules = dict(target._modules)  # ... with its own submodule table,
    draft._parameters = dict(target._parameters)
    draft._buffers = dict(target._buffers)
    draft.blocks = nn.ModuleList(
        list(target.blocks)[:n_layers]
    )  # so replacing the blocks leaves target alone
    draft.config = dataclasses.replace(target.config, n_layers=n_layers)
    return draft


def draft_model(target: Transformer, draft: Transformer | None, draft_layers: int | None) -> Transformer:
    """The draft of ``target``: ``draft`` (checked to share its vocabulary) or its first ``draft_layers``
    layers (``layer_skip_draft``). Raises ``ConfigError`` unless exactly one is given."""
    if (draft is None) == (draft_layers is None):
        raise ConfigError(
            "give exactly one of draft= (a Transformer with the target's vocabulary) and draft_layers= "
            f"(use the target's first k of its {target.config.n_layers} layers as the draft)"
        )
    if draft_layers is not None:
        return layer_skip_draft(target, draft_layers)
    assert draft is not None
    if draft.config.vocab_size != target.config.vocab_size:
        raise ConfigError(
            f"draft vocab_size={draft.config.vocab_size} differs from the target's "
            f"{target.config.vocab_size}: the draft must use the target's tokenizer"
        )
    return draft


def keep_slots(cache: KVCache, start: int, keep: Sequence[int]) -> None:
    """Row i keeps ``keep[i]`` of the slots from ``start`` on; the rest become invalid (as padding) and
    give their position ids back; slots after the longest kept row are dropped (the next forward
    overwrites them)."""
    if not keep:
        return
    device = cache.valid.device
    n = torch.tensor(list(keep), device=device)
    slots = torch.arange(cache.length - start, device=device)
    drop = slots[None, :] >= n[:, None]  # (B, length - start)
    region = cache.valid[:, start : cache.length]
    cache.next_pos = cache.next_pos - (region & drop).sum(1)
    cache.valid[:, start : cache.length] = region & ~drop
    cache.length = start + max(keep)


class Drafter:
    """The draft side of speculative decoding in an ``Engine``: the draft model, its KV cache with one row
    per speculative row of the batch (in the batch's order), and per row the tokens the draft has not read.

    Per engine step: ``propose`` (up to ``limits[i]`` greedy proposals for row i), the engine verifies,
    ``settle`` (what the target kept), and ``keep`` when rows leave the batch. ``proposed`` /
    ``accepted`` count verified proposals over the engine's life.
    """

    def __init__(self, model: Transformer, num_draft_tokens: int) -> None:
        if num_draft_tokens < 1:
            raise ConfigError(f"num_draft_tokens={num_draft_tokens} must be >= 1")
        self.model, self.k = model, num_draft_tokens
        self.cache: KVCache | None = None
        self.pending: list[list[int]] = []  # per row: tokens the draft has not read yet
        self.proposed = self.accepted = 0
        p = model.tok_emb.weight
        self._device, self._dtype = p.device, p.dtype
        self._props: list[list[int]] = []
        self._limits: list[int] = []
        self._start = self._read = 0

    @property
    def rows(self) -> int:
        """Speculative rows."""
        return len(self.pending)

    def admit(self, prompt: Sequence[int], first_tokens: Sequence[int]) -> None:
        """Prefill ``prompt`` alone and add one row per first token (each row's next token to read)."""
        one = KVCache(self.model.config, 1, len(prompt), self._dtype, self._device)
        self.model(torch.tensor([list(prompt)], device=self._device), cache=one, last_only=True)
        if self.cache is None or not self.pending:
            self.cache = KVCache(
                self.model.config,
                0,
                len(prompt) + 64,
                self._dtype,
                self._device,
                max_batch_size=len(first_tokens),
            )
        self.cache.add_rows(one, [0] * len(first_tokens))
        self.pending += [[t] for t in first_tokens]

    def propose(self, limits: Sequence[int]) -> list[list[int]]:
        """Up to ``limits[i]`` greedy draft tokens for row i (after its pending tokens): at most K draft
        forwards, over the speculative rows only."""
        cache = self.cache
        assert cache is not None and len(limits) == self.rows
        kmax = max(limits, default=0)
        self._limits = list(limits)
        if kmax == 0:  # nothing to propose (every row is at the end of its budget): read nothing now
            self._props, self._read = [[] for _ in limits], 0
            return self._props
        P = max(len(p) for p in self.pending)
        cache.reserve(P + kmax)
        self._start, self._read = cache.length, P
        ids = torch.zeros(self.rows, P, dtype=torch.long)
        mask = torch.zeros(self.rows, P, dtype=torch.long)
        for i, p in enumerate(self.pending):  # left-padded: each row's last pending token last
            ids[i, P - len(p) :], mask[i, P - len(p) :] = torch.tensor(p), 1
        pad = not bool(mask.all())
        logits = self.model(
            ids.to(self._device),
            attention_mask=mask.to(self._device) if pad else None,
            cache=cache,
            last_only=True,
        )[:, -1]
        props = [logits.argmax(-1)]
        live = torch.tensor(list(limits), device=self._device)
        for j in range(1, kmax):  # row i reads its proposal j only while j < limits[i]
            real = (live > j)[:, None].long()
            logits = self.model(props[-1][:, None], attention_mask=real, cache=cache)[:, -1]
            props.append(logits.argmax(-1))
        table = torch.stack(props, 1).tolist()
        self._props = [row[:k] for row, k in zip(table, limits, strict=True)]
        self.pending = [[] for _ in limits]
        return self._props

    def settle(self, accepted: Sequence[int], next_tokens: Sequence[int]) -> None:
        """Row i's first ``accepted[i]`` proposals were kept and it goes on with ``next_tokens[i]``."""
        assert self.cache is not None
        for i, (m, k) in enumerate(zip(accepted, self._limits, strict=True)):
            self.proposed += k
            self.accepted += m
            if self._read == 0:  # nothing was read this step
                self.pending[i].append(next_tokens[i])
                continue
            # the draft read the pending tokens (P slots), then proposals 1 .. k-1
            if m == k and k > 0:  # all kept: the last proposal was never read
                self.pending[i] = [self._props[i][-1], next_tokens[i]]
            else:
                self.pending[i] = [next_tokens[i]]
        if self._read:
            keep = [self._read + min(m, max(k - 1, 0)) for m, k in zip(accepted, self._limits, strict=True)]
            keep_slots(self.cache, self._start, keep)

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (indices, in the new order): finished rows leave."""
        if len(rows) == self.rows and list(rows) == list(range(self.rows)):
            return
        self.pending = [self.pending[i] for i in rows]
        if self.cache is not None:
            self.cache.keep(torch.tensor(list(rows), dtype=torch.long))


def speculative_decode(
    target: Transformer,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    draft: Transformer | None = None,
    draft_layers: int | None = None,
    num_draft_tokens: int = SpeculativeOptions.num_draft_tokens,
    eos_token_ids: Sequence[int] = (),
) -> SpeculativeResult:
    """Greedy continuation of one prompt, equal to ``greedy_decode(target, [prompt_ids], ...)[0]``, on an
    ``Engine`` with a draft.

    The draft is ``draft`` (a ``Transformer`` with the target's vocabulary) or, with ``draft_layers=k``,
    the target's first k layers (``layer_skip_draft``). Each step it proposes ``num_draft_tokens``
    tokens and the target verifies them in one forward. Stops at an eos (not part of the output) or
    after ``max_new_tokens``. Raises ``ConfigError`` for a bad draft, an empty prompt or a bad count.
    """
    from lamina.generate.engine import Engine  # the engine runs the draft: imported when used

    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be >= 0")
    drafter = draft_model(target, draft, draft_layers)
    engine = Engine(
        target, None, eos_token_ids, max_batch_size=1, draft=drafter, num_draft_tokens=num_draft_tokens
    )
    if max_new_tokens == 0:
        return SpeculativeResult()
    (seq,) = engine.submit(prompt_ids, GenerationConfig(temperature=0.0, max_new_tokens=max_new_tokens))
    engine.step(decode=False)  # the prefill: one target forward
    calls = 1
    while engine.has_work():
        engine.step()
        calls += 1
    stats = engine.draft_stats
    assert stats is not None
    return SpeculativeResult(seq.tokens, stats.accepted, stats.proposed, calls)
