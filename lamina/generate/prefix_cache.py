"""Prefix caching: the keys and values of prompt prefixes kept across requests, block by block.

Requests that share a beginning (a system prompt, a conversation's earlier turns, few-shot examples)
compute the same keys and values for it: a decoder's key at position i depends only on tokens 0..i. The
``PrefixCache`` keeps them in blocks of ``block_size`` tokens, each block named by its tokens and the
block before it (a chain from the start of the prompt, so a block matches only after the same whole
prefix), as vLLM's automatic prefix caching does (Kwon et al. 2023, "Efficient Memory Management for
Large Language Model Serving with PagedAttention"; vLLM's ``enable_prefix_caching``). A new prompt loads
its longest cached run of whole blocks into its cache row and only the rest of the prompt runs through
the model; its own new whole blocks are stored after its prefill.

Matching is exact on token ids (and on a ``salt``: the LoRA adapter, whose keys differ). The cache holds
at most ``max_bytes`` of keys and values; past it the least recently used block that no other cached
block continues is evicted (leaves first, so every cached block's prefix stays cached). The output does
not change: the loaded keys are those the prompt's own prefill would compute (up to float rounding of the
different matmul shapes, ~1e-7 in fp32).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lamina.config import ModelConfig
from lamina.errors import ConfigError
from lamina.model.layers import KVCache

BLOCK_SIZE = 16  # tokens per cached block (vLLM's default block size)


@dataclass
class _Block:
    id: int
    parent: int  # the id of the block before it (0: the start of the prompt)
    key: tuple[int, int, tuple[int, ...]]  # (salt, parent, tokens): its name in the index
    kv: Tensor  # (2, n_layers, n_kv_heads, block_size, head_dim): keys, then values
    children: int = 0  # cached blocks that continue this one


@dataclass
class PrefixStats:
    """Prompt tokens looked up, found in the cache (not recomputed), and blocks evicted so far."""

    queried: int = 0
    hit: int = 0
    evicted: int = 0
    stored: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit / self.queried if self.queried else 0.0


@dataclass
class PrefixCache:
    """Keys and values of prompt prefixes in blocks of ``block_size`` tokens, at most ``max_bytes``.

    ``load`` fills a fresh one-row ``KVCache`` with the longest cached prefix of a prompt (whole blocks,
    always leaving the prompt's last token to run, since its logits are needed) and returns its length;
    ``store`` keeps the whole blocks of a prefilled row. Raises ``ConfigError`` for ``block_size`` < 1 or a
    negative budget. For decoders (an encoder-decoder's decoder prompt is one start token).
    """

    config: ModelConfig
    max_bytes: int
    block_size: int = BLOCK_SIZE
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"
    stats: PrefixStats = field(default_factory=PrefixStats)

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ConfigError(f"prefix cache block_size={self.block_size} must be >= 1")
        if self.max_bytes < 0:
            raise ConfigError(f"prefix cache budget of {self.max_bytes} bytes must be >= 0")
        cfg = self.config
        assert cfg.n_layers is not None and cfg.n_kv_heads is not None and cfg.head_dim is not None
        self._n_layers = cfg.n_layers
        elem = torch.empty((), dtype=self.dtype).element_size()
        self.block_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * self.block_size * cfg.head_dim * elem
        self._index: dict[tuple[int, int, tuple[int, ...]], _Block] = {}
        # least recently used first; a block is never more recent than the block before it
        self._lru: OrderedDict[int, _Block] = OrderedDict()
        self._ids = itertools.count(1)

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values held now."""
        return len(self._lru) * self.block_bytes

    @property
    def num_blocks(self) -> int:
        return len(self._lru)

    def _chain(self, prompt: Sequence[int], salt: int, limit: int) -> list[_Block]:
        """The cached blocks of ``prompt``'s first ``limit`` tokens, from the start, as far as they match."""
        bs, parent, out = self.block_size, 0, []
        for start in range(0, limit - bs + 1, bs):
            block = self._index.get((salt, parent, tuple(prompt[start : start + bs])))
            if block is None:
                break
            out.append(block)
            parent = block.id
        return out

    def _touch(self, chain: list[_Block]) -> None:
        """Most recently used: the chain's blocks, the last first (so that parents stay newer)."""
        for b in reversed(chain):
            self._lru.move_to_end(b.id)

    def load(self, prompt: Sequence[int], cache: KVCache, salt: int = 0) -> int:
        """Copy the longest cached prefix of ``prompt`` (whole blocks, leaving at least its last token)
        into row 0 of the empty ``cache``: slots [0, P) with positions 0..P-1; returns P (0: no hit)."""
        self.stats.queried += len(prompt)
        chain = self._chain(prompt, salt, len(prompt) - 1)
        if not chain:
            return 0
        self._touch(chain)
        P = len(chain) * self.block_size
        kv = torch.cat([b.kv for b in chain], dim=3)  # (2, L, Hkv, P, hd)
        for layer in range(self._n_layers):
            cache.k[layer][0, :, :P] = kv[0, layer]
            cache.v[layer][0, :, :P] = kv[1, layer]
        cache.valid[0, :P] = True
        cache.positions[0, :P] = torch.arange(P, device=cache.positions.device)
        cache.next_pos = torch.full_like(cache.next_pos, P)
        cache.length = P
        self.stats.hit += P
        return P

    def store(self, prompt: Sequence[int], cache: KVCache, salt: int = 0) -> None:
        """Keep the whole blocks of ``prompt`` that row 0 of ``cache`` holds at slots [0, len(prompt))
        (a row prefilled from slot 0), evicting the least recently used blocks past the budget."""
        bs = self.block_size
        n = min(len(prompt), cache.length) // bs
        if n == 0 or self.block_bytes > self.max_bytes:
            return
        chain = self._chain(prompt, salt, n * bs)
        parent = chain[-1].id if chain else 0
        for i in range(len(chain), n):
            while self.nbytes + self.block_bytes > self.max_bytes:
                if not self._evict(keep=chain):
                    self._touch(chain)
                    return
            sl = slice(i * bs, (i + 1) * bs)
            kv = torch.stack(
                [
                    torch.stack([cache.k[layer][0, :, sl] for layer in range(self._n_layers)]),
                    torch.stack([cache.v[layer][0, :, sl] for layer in range(self._n_layers)]),
                ]
            ).clone()  # (2, L, Hkv, bs, hd)
            block = _Block(next(self._ids), parent, (salt, parent, tuple(prompt[sl])), kv)
            self._index[block.key] = block
            self._lru[block.id] = block
            if parent:
                self._lru[parent].children += 1
            chain.append(block)
            parent = block.id
            self.stats.stored += 1
        self._touch(chain)

    def _evict(self, keep: list[_Block]) -> bool:
        """Drop the least recently used block that no cached block continues (not one of ``keep``, the
        chain being stored); False when there is none."""
        kept = {b.id for b in keep}
        for bid, block in self._lru.items():
            if block.children == 0 and bid not in kept:
                del self._lru[bid]
                del self._index[block.key]
                if block.parent in self._lru:
                    self._lru[block.parent].children -= 1
                self.stats.evicted += 1
                return True
        return False

    def clear(self) -> None:
        """Drop every block."""
        self._index.clear()
        self._lru.clear()
