"""Speculative decoding (greedy, one prompt): a cheap draft proposes, the target verifies in one forward.

Each round the draft proposes ``num_draft_tokens`` tokens greedily; the target runs once over the last
accepted token and the proposals (one forward, with its KV cache), keeps the longest prefix of the
proposals that equals its own greedy choices, and adds its own next token. So every round yields at
least one token, and the output is the target's greedy output: only the number of target forwards
changes. Rejected positions are rolled back in both KV caches (``_truncate``).

The draft is any ``Transformer`` with the target's vocabulary, or, since no small model shares most
tokenizers offline, the target's own first ``draft_layers`` blocks followed by its final norm and head
(self-speculative decoding, as in LayerSkip; ``layer_skip_draft``). That draft shares the target's weights
(no extra memory) but keeps its own KV cache for its ``draft_layers`` layers. (LayerSkip also reuses the
draft's cache and hidden states for the target's first layers in verification; that needs a forward
that starts at a middle layer, which ``Transformer`` does not offer.)
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lamina.errors import ConfigError
from lamina.generate.engine import require_generative
from lamina.model.layers import KVCache
from lamina.model.transformer import Transformer


@dataclass
class SpeculativeOptions:
    """How the engine runs a greedy request speculatively (the ``--draft`` / ``--speculative-layers``
    flags; ``lamina.generate``'s keywords of the same names). Neither set: plain decoding."""

    # a draft model (name or path) with the target's vocabulary: it proposes tokens the target verifies
    draft: str | None = None
    # self-speculative decoding: the target's own first K layers (and its head) are the draft
    speculative_layers: int | None = None
    num_draft_tokens: int = 4  # tokens the draft proposes per round (one target forward verifies them), >= 1

    @property
    def enabled(self) -> bool:
        """Whether a draft or a layer count is given."""
        return self.draft is not None or self.speculative_layers is not None


@dataclass
class SpeculativeResult:
    """The generated tokens (the target's greedy output, without the eos) and how the draft fared."""

    tokens: list[int] = field(default_factory=list)
    accepted: int = 0  # draft tokens the target agreed with
    proposed: int = 0  # draft tokens proposed
    target_calls: int = 0  # target forwards, prefill included (greedy decoding needs one per token)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens (0 when nothing was proposed)."""
        return self.accepted / self.proposed if self.proposed else 0.0


def layer_skip_draft(target: Transformer, n_layers: int) -> Transformer:
    """A draft made of ``target``'s first ``n_layers`` blocks, then its final norm and output head.

    It shares every weight with ``target`` (a view, not a copy: training one trains the other) and has
    the config of an ``n_layers``-layer model, so ``draft.new_cache`` sizes its KV cache for those layers.
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


def _truncate(cache: KVCache, length: int) -> None:
    """Forget the cached slots from ``length`` on (rejected draft tokens): the next forward overwrites them."""
    if length >= cache.length:
        return
    dropped = cache.valid[:, length : cache.length].sum(1)
    cache.next_pos = cache.next_pos - dropped
    cache.valid[:, length:] = False
    cache.length = length


def _draft_model(target: Transformer, draft: Transformer | None, draft_layers: int | None) -> Transformer:
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


@torch.inference_mode()
def speculative_decode(
    target: Transformer,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    draft: Transformer | None = None,
    draft_layers: int | None = None,
    num_draft_tokens: int = 4,
    eos_token_ids: Sequence[int] = (),
) -> SpeculativeResult:
    """Greedy continuation of one prompt, equal to ``greedy_decode(target, [prompt_ids], ...)[0]``.

    The draft is ``draft`` (a ``Transformer`` with the target's vocabulary) or, with ``draft_layers=k``,
    the target's first k layers (``layer_skip_draft``). Each round it proposes ``num_draft_tokens``
    tokens and the target verifies them in one forward. Stops at an eos (not part of the output) or
    after ``max_new_tokens``.
    """
    require_generative(target.config)
    if draft is not None:
        require_generative(draft.config, "draft")
    if len(prompt_ids) == 0:
        raise ConfigError("the prompt needs at least one token (empty prompt given)")
    if num_draft_tokens < 1:
        raise ConfigError(f"num_draft_tokens={num_draft_tokens} must be >= 1")
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be >= 0")
    drafter = _draft_model(target, draft, draft_layers)
    limit = min(target.config.max_seq_len, drafter.config.max_seq_len)
    if len(prompt_ids) >= limit:
        raise ConfigError(
            f"prompt of {len(prompt_ids)} tokens does not fit the context window max_seq_len={limit}"
        )
    budget = min(max_new_tokens, limit - len(prompt_ids))
    result = SpeculativeResult()
    if budget <= 0:
        return result
    eos = set(eos_token_ids)
    device = target.tok_emb.weight.device
    capacity = len(prompt_ids) + budget + num_draft_tokens + 1
    t_cache, d_cache = target.new_cache(1, capacity), drafter.new_cache(1, capacity)

    def ids(tokens: Sequence[int]) -> torch.Tensor:
        return torch.tensor([list(tokens)], dtype=torch.long, device=device)

    nxt = int(target(ids(prompt_ids), cache=t_cache, last_only=True)[0, -1].argmax())
    result.target_calls = 1
    out = result.tokens
    pending = list(prompt_ids)  # tokens the draft's cache does not hold yet
    while nxt not in eos:
        out.append(nxt)
        room = budget - len(out)  # tokens still allowed; this round yields at most k + 1
        if room == 0:
            break
        # the draft proposes up to k tokens (one forward each; the last proposal is not fed back)
        k = min(num_draft_tokens, room - 1)
        pending.append(nxt)
        proposals: list[int] = []
        if k > 0:
            logits = drafter(ids(pending), cache=d_cache, last_only=True)[0, -1]
            pending = []
            while True:
                proposals.append(int(logits.argmax()))
                if len(proposals) == k or proposals[-1] in eos:
                    break
                logits = drafter(ids(proposals[-1:]), cache=d_cache)[0, -1]
        # the target checks them all in one forward: its choice after nxt and after each proposal
        start = t_cache.length
        choices = target(ids([nxt, *proposals]), cache=t_cache)[0].argmax(-1).tolist()
        result.target_calls += 1
        m = 0
        while m < len(proposals) and proposals[m] == choices[m]:
            m += 1
        result.proposed += len(proposals)
        result.accepted += m
        # keep nxt and the accepted proposals in both caches
        _truncate(t_cache, start + 1 + m)
        if proposals:
            fed = len(proposals) - 1  # proposals in the draft's cache (nxt was fed before them)
            _truncate(d_cache, d_cache.length - fed + min(m, fed))
            if m > fed:  # all accepted: the last proposal was never fed to the draft
                pending = proposals[-1:]
        stopped = False
        for tok in proposals[:m]:
            if tok in eos:
                stopped = True
                break
            out.append(tok)
        if stopped:
            break
        nxt = choices[m]
    return result
