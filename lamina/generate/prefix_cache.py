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
different matmul shapes, ~1e-7 in fp32; with int8/int4 weights, whose matmul kernel depends on the tokens
per sequence of a forward (``lamina.model.quant``), which a cached prefix shortens, within that kernel's
rounding: logprobs 3e-4 to 7e-3 apart on tiny models). This holds only when a key depends on its
position and the tokens before it: not under dynamic RoPE (``rope_scaling="dynamic"`` scales a forward
by its longest position), where the engine keeps no cache.
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

    ``lookup`` gives the longest cached prefix of a prompt (whole blocks, always leaving the prompt's last
    token to run, since its logits are needed) as one (2, n_layers, n_kv_heads, P, head_dim) tensor;
    ``load`` copies it into row 0 of a fresh ``KVCache``; ``store`` keeps the whole blocks of a prefilled
    row (``stats`` counts tokens looked up and found, blocks stored and evicted); ``cached_length`` is
    ``lookup``'s length without using the blocks. Raises ``ConfigError`` for ``block_size`` < 1 or a
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

    def lookup(self, prompt: Sequence[int], salt: int = 0) -> tuple[int, Tensor | None]:
        """The longest cached prefix of ``prompt`` in whole blocks, leaving at least its last token to run:
        (P, its keys and values (2, n_layers, n_kv_heads, P, head_dim)), or (0, None) without a hit."""
        self.stats.queried += len(prompt)
        chain = self._chain(prompt, salt, len(prompt) - 1)
        if not chain:
            return 0, None
        self._touch(chain)
        P = len(chain) * self.block_size
        self.stats.hit += P
        return P, torch.cat([b.kv for b in chain], dim=3)

    def cached_length(self, prompt: Sequence[int], salt: int = 0) -> int:
        """How many tokens of ``prompt`` ``lookup`` would give now (whole blocks, never its last token),
        without counting as a use: no stats, no recency (the engine's admission budget asks it)."""
        return len(self._chain(prompt, salt, len(prompt) - 1)) * self.block_size

    def load(self, prompt: Sequence[int], cache: KVCache, salt: int = 0) -> int:
        """Copy the longest cached prefix of ``prompt`` (``lookup``) into row 0 of the empty ``cache``:
        slots [0, P) with positions 0..P-1; returns P (0: no hit)."""
        P, kv = self.lookup(prompt, salt)
        if kv is not None:
            place(kv, cache, 0, 0)
            cache.next_pos = torch.full_like(cache.next_pos, P)
            cache.length = P
        return P

    def store(
        self,
        prompt: Sequence[int],
        cache: KVCache,
        salt: int = 0,
        row: int = 0,
        offset: int = 0,
        start: int = 0,
    ) -> None:
        """Keep the whole blocks of ``prompt`` whose keys row ``row`` of ``cache`` holds: token j (j >=
        ``start``) at slot ``offset + j``; blocks before ``start`` must be cached already (else nothing is
        stored). Evicts the least recently used blocks past the budget."""
        bs = self.block_size
        n = min(len(prompt), cache.length - offset) // bs
        if n == 0 or self.block_bytes > self.max_bytes:
            return
        chain = self._chain(prompt, salt, n * bs)
        if len(chain) * bs < start:  # a block before start was evicted meanwhile: its keys are not at hand
            self._touch(chain)
            return
        parent = chain[-1].id if chain else 0
        for i in range(len(chain), n):
            while self.nbytes + self.block_bytes > self.max_bytes:
                if not self._evict(keep=chain):
                    self._touch(chain)
                    return
            sl = slice(offset + i * bs, offset + (i + 1) * bs)
            kv = torch.stack(
                [
                    torch.stack([k[row, :, sl] for k in cache.k]),
                    torch.stack([v[row, :, sl] for v in cache.v]),
                ]
            ).clone()  # (2, L, Hkv, bs, hd)
            tokens = tuple(prompt[i * bs : (i + 1) * bs])
            block = _Block(next(self._ids), parent, (salt, parent, tokens), kv)
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


def place(kv: Tensor, cache: KVCache, row: int, at: int) -> None:
    """Write a cached prefix ``kv`` (2, n_layers, n_kv_heads, P, head_dim) into row ``row`` of ``cache`` at
    slots [at, at + P), marked valid, with positions 0..P-1 (``next_pos`` and ``length`` are the caller's)."""
    P = kv.shape[3]
    for layer, (k, v) in enumerate(zip(cache.k, cache.v, strict=True)):
        k[row, :, at : at + P] = kv[0, layer]
        v[row, :, at : at + P] = kv[1, layer]
    cache.valid[row, at : at + P] = True
    cache.positions[row, at : at + P] = torch.arange(P, device=cache.positions.device)
