"""The parts a transformer block is made of: norms, positional encodings, attention with a KV cache, MLPs.

Each family difference (which norm, which MLP, which positional encoding) is decided in one place here,
from ``ModelConfig``; ``transformer.py`` only stacks the parts.
"""

from __future__ import annotations

import contextlib
import copy
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lamina.config import ModelConfig

_T = TypeVar("_T")

# -- norms ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square norm (Llama): ``x / rms(x) * weight``, computed in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """Normalise over the last dimension: ``weight * (x / sqrt(mean(x^2) + eps))``, in float32, then
        rounded to x's dtype before the weight (as ``transformers``' LlamaRMSNorm).

        One ``F.rms_norm`` kernel instead of six element-wise ops (a decode step runs two norms per
        block): bit for bit the same values on CPU."""
        w = self.weight
        if x.dtype == torch.float32 and w.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), w, self.eps)
        return w * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    """The norm layer the config asks for."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


# -- positional encodings ---------------------------------------------------------------------------------


def rope_inv_freq(cfg: ModelConfig, seq_len: Tensor | None = None) -> Tensor:
    """RoPE inverse frequencies (head_dim / 2,), with linear, dynamic-NTK or llama3 scaling applied.

    ``seq_len`` (B,) (dynamic scaling only) is each row's longest position + 1; as in ``transformers``,
    the base grows once a sequence passes ``rope_original_max_seq_len``. Unlike ``transformers``, which
    takes the longest row of the batch, lamina scales each row by its own length, so a row's logits do
    not depend on what else is in the batch. Returns (B, head_dim / 2) then.
    """
    assert cfg.head_dim is not None
    dim = cfg.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if cfg.rope_scaling == "dynamic" and seq_len is not None:
        original = cfg.rope_original_max_seq_len or cfg.max_seq_len
        n = seq_len.float().clamp(min=original)[:, None]  # (B, 1)
        f = cfg.rope_factor
        base = cfg.rope_theta * ((f * n / original) - (f - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** exponents.to(n.device))
    inv_freq = 1.0 / (cfg.rope_theta**exponents)
    if cfg.rope_scaling == "linear":
        inv_freq = inv_freq / cfg.rope_factor
    elif cfg.rope_scaling == "llama3":
        assert cfg.rope_original_max_seq_len is not None
        f, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old_len = cfg.rope_original_max_seq_len
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / f, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / f + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_tables(inv_freq: Tensor, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """RoPE's cos and signed sin tables (B, 1, T, head_dim) for positions (B, T); ``inv_freq`` is
    (hd/2,) or (B, hd/2). The sin table's first half is negated (``[-sin, sin]``): what ``apply_rope``
    multiplies the half-swapped input by."""
    inv = inv_freq.to(position_ids.device)
    if inv.dim() == 2:
        inv = inv[:, None, :]  # (B, 1, hd/2): a base per row
    freqs = position_ids[..., None].float() * inv  # (B, T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    sin = emb.sin()
    sin[..., : freqs.shape[-1]].neg_()
    return emb.cos().to(dtype)[:, None], sin.to(dtype)[:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, T, head_dim) by position, in the "rotate half" layout used by HF Llama checkpoints:
    ``x * cos + [-x2, x1] * sin``, computed as ``x * cos + [x2, x1] * [-sin, sin]`` (``sin`` from
    ``rope_tables``; the same values, with one ``roll`` instead of chunk, neg and cat)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def sinusoidal_encoding(position_ids: Tensor, d_model: int) -> Tensor:
    """The original Transformer's fixed encoding (B, T, d_model): sin on even, cos on odd channels."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d_model, 2, device=position_ids.device).float() / d_model))
    angles = position_ids[..., None].float() * inv_freq  # (B, T, d_model/2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)


def alibi_slopes(n_heads: int) -> Tensor:
    """ALiBi head slopes (Press et al. 2022), with the interleaving rule for non-powers of two (as BLOOM)."""
    closest = 2 ** math.floor(math.log2(n_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != n_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        n_extra = min(closest, n_heads - closest)
        slopes += [extra_base ** (i + 1) for i in range(0, 2 * n_extra, 2)]
    return torch.tensor(slopes)


def relative_position_bucket(rel: Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """T5's bucket (same shape, long) of each relative position ``rel`` = key position - query position.

    Half the buckets hold exact small distances, the rest grow logarithmically up to ``max_distance``;
    bidirectional (encoder) splits the buckets between keys before and after the query, causal
    (decoder) keeps only keys before it. Raffel et al. 2020; as ``transformers``' T5Attention.
    """
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).long() * num_buckets
        dist = rel.abs()
    else:
        dist = (-rel).clamp(min=0)
    max_exact = num_buckets // 2
    large = (
        max_exact
        + (
            torch.log(dist.float() / max_exact)
            / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).long()
    )
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(dist < max_exact, dist, large)


# -- KV cache ----------------------------------------------------------------------------------------------


def cross_attention_mask(valid: Tensor | None, dtype: torch.dtype, check_all: bool = True) -> Tensor | None:
    """The cross-attention mask for source slots ``valid`` (B, S) bool (True = a real token): additive
    (B, 1, 1, S) in ``dtype``, 0 where a key is read and -inf where not (what SDPA makes of a bool mask,
    made once instead of in every layer). A row with no real slot reads all of them (no NaN). None when
    ``valid`` is None or, with ``check_all``, every slot is real (SDPA's unmasked path; the check reads
    the tensor, so ``check_all=False`` under torch.compile)."""
    if valid is None:
        return None
    keys = valid.bool()
    if check_all and bool(keys.all()):
        return None
    keys = keys | ~keys.any(1, keepdim=True)
    mask = torch.zeros(keys.shape, dtype=dtype, device=keys.device).masked_fill_(~keys, float("-inf"))
    return mask[:, None, None, :]


class KVCache:
    """Preallocated keys and values for incremental decoding.

    Per layer ``k`` and ``v`` are (B, n_kv_heads, capacity, head_dim); all rows share the slot count
    ``length``. ``valid`` (B, capacity) marks slots holding real tokens (padding is stored but masked out),
    ``positions`` (B, capacity) their position ids (for ALiBi), and ``next_pos`` (B,) the position the
    next real token of each row gets.

    The tensors are views of storage with room for ``max_batch_size`` rows, so rows can leave
    (``keep``) and join (``add_rows``) a running batch, as continuous batching needs, by copying only
    the rows that move; ``reserve`` makes room for more slots.

    An encoder-decoder's decoder also keeps the cross-attention keys and values of the encoder output:
    ``cross_k`` / ``cross_v`` per layer (B, n_kv_heads, S, head_dim) and ``memory_valid`` (B, S), computed
    once by the first call that gets ``memory`` and reused after (``keep`` reorders them too). With
    ``copy_attention`` the copy head's keys and the encoder output follow the layers' in ``cross_k`` /
    ``cross_v`` (B, 1, S, d_model), and ``memory_ids`` (B, S) holds the source token ids it copies.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        max_batch_size: int | None = None,
    ) -> None:
        assert cfg.n_kv_heads is not None and cfg.head_dim is not None
        n_layers = cfg.n_decoder_layers if cfg.arch == "encoder-decoder" else cfg.n_layers
        assert n_layers is not None
        self._n_layers, self._kv_shape = n_layers, (cfg.n_kv_heads, cfg.head_dim)
        self.dtype, self.device = dtype, torch.device(device)
        self.length = 0
        self.capacity = capacity
        self.cross_k: list[Tensor] = []  # encoder-decoder: per layer (B, Hkv, S, hd), filled once
        self.cross_v: list[Tensor] = []
        self._memory_valid: Tensor | None = None  # (B, S) real source tokens of the cross keys
        self._cross_mask: tuple[torch.dtype, Tensor | None] | None = None  # memory_valid as SDPA's mask
        self.memory_ids: Tensor | None = None  # (B, S) source token ids (the copy head's; else None)
        self._alloc(max(batch_size, max_batch_size or 0), capacity)
        self._set_rows(batch_size)

    @property
    def memory_valid(self) -> Tensor | None:
        """(B, S) bool: the source slots of the cross keys that hold real tokens (None: all of them)."""
        return self._memory_valid

    @memory_valid.setter
    def memory_valid(self, valid: Tensor | None) -> None:
        self._memory_valid, self._cross_mask = valid, None

    def cross_mask(self, dtype: torch.dtype) -> Tensor | None:
        """``cross_attention_mask(memory_valid, dtype)``, computed once per set of rows (each decoding
        step's cross-attention reads the same source slots)."""
        if self._cross_mask is None or self._cross_mask[0] != dtype:
            self._cross_mask = (dtype, cross_attention_mask(self._memory_valid, dtype))
        return self._cross_mask[1]

    def _zeros(self, rows: int, capacity: int) -> Iterator[Tensor]:
        """Empty storage for ``rows`` rows of ``capacity`` slots, in ``_storage``'s order (the keys, the
        values, valid, positions, next_pos), made one tensor at a time as the caller takes them."""
        kv = (rows, self._kv_shape[0], capacity, self._kv_shape[1])
        for _ in range(2 * self._n_layers):
            yield torch.zeros(kv, dtype=self.dtype, device=self.device)
        yield torch.zeros(rows, capacity, dtype=torch.bool, device=self.device)
        yield torch.zeros(rows, capacity, dtype=torch.long, device=self.device)
        yield torch.zeros(rows, dtype=torch.long, device=self.device)

    def _alloc(self, rows: int, capacity: int) -> None:
        *kv, self._valid, self._positions, self._next_pos = self._zeros(rows, capacity)
        self._k, self._v = kv[: self._n_layers], kv[self._n_layers :]

    def _set_rows(self, n: int) -> None:
        self.rows = n
        self.k = [t[:n] for t in self._k]
        self.v = [t[:n] for t in self._v]
        self.valid = self._valid[:n]
        self.positions = self._positions[:n]

    @property
    def next_pos(self) -> Tensor:
        """(B,) the position id the next real token of each row gets."""
        return self._next_pos[: self.rows]

    @next_pos.setter
    def next_pos(self, value: Tensor) -> None:
        self._next_pos[: self.rows] = value

    @property
    def batch_size(self) -> int:
        """Number of rows."""
        return self.rows

    @property
    def max_batch_size(self) -> int:
        """Rows the storage holds before it must grow."""
        return self._valid.shape[0]

    def _storage(self) -> list[Tensor]:
        return [*self._k, *self._v, self._valid, self._positions, self._next_pos]

    def keep(self, rows: Tensor) -> None:
        """Keep only ``rows`` (indices, in the new order): finished sequences leave the batch."""
        rows = rows.to(self.device)
        n = rows.numel()
        for t in self._storage():
            t[:n] = t.index_select(0, rows)
        self._set_rows(n)
        S = self.cross_k[0].shape[2] if self.cross_k else 0
        if self.memory_valid is not None:
            self.memory_valid = self.memory_valid.index_select(0, rows)
            used = self.memory_valid.any(0).nonzero()  # source slots some kept row still reads
            S = int(used[-1]) + 1 if used.numel() else S
            self.memory_valid = self.memory_valid[:, :S]
        if self.memory_ids is not None:
            self.memory_ids = self.memory_ids[:, :S].index_select(0, rows)
        self.cross_k = [t[:, :, :S].index_select(0, rows) for t in self.cross_k]
        self.cross_v = [t[:, :, :S].index_select(0, rows) for t in self.cross_v]

    def reserve_rows(self, rows: int) -> None:
        """Make the storage hold at least ``rows`` rows, grown once to exactly that many when it must
        grow (``add_rows`` alone doubles it as rows join one request at a time)."""
        if rows > self.max_batch_size:
            self._grow(rows, self.capacity)

    def rows_view(self, start: int, rows: int) -> KVCache:
        """A cache over this one's storage rows [start, start + rows) (within ``max_batch_size``, past its
        own rows: e.g. rows about to join), sharing its storage: a forward through it writes there, so
        that a prefill lands in the batch's storage without a copy. Its ``length`` is this cache's; the
        caller keeps the two consistent and must not grow this cache's storage while the view is used.
        Not for an encoder-decoder's rows (no cross-attention keys)."""
        if start + rows > self.max_batch_size:
            raise ValueError(f"rows_view({start}, {rows}): the storage holds {self.max_batch_size} rows")
        view = copy.copy(self)
        view._k, view._v = [t[start:] for t in self._k], [t[start:] for t in self._v]
        view._valid, view._positions = self._valid[start:], self._positions[start:]
        view._next_pos = self._next_pos[start:]
        view.cross_k, view.cross_v, view.memory_ids = [], [], None
        view._memory_valid, view._cross_mask = None, None
        view._set_rows(rows)
        return view

    def settle_rows(self, rows: Sequence[int]) -> None:
        """This cache's rows become its own first rows followed by storage rows ``rows`` (indices >= its
        row count, e.g. written through ``rows_view``; repeats allowed), copying only when they are not
        already the next rows in order."""
        n, m = self.rows, len(rows)
        if list(rows) != list(range(n, n + m)):
            idx = torch.tensor(list(rows), dtype=torch.long, device=self.device)
            for t in self._storage():
                t[n : n + m] = t.index_select(0, idx)
        self._set_rows(n + m)

    @contextlib.contextmanager
    def padded_rows(self, rows: int) -> Iterator[None]:
        """Within, the cache shows ``rows`` rows (at most ``max_batch_size``): its own rows, then padding
        rows over the spare storage, so a forward of ``rows`` rows (e.g. a decoding step padded to a few
        batch sizes) writes and reads there. A padding row gets position 0 and sees every slot before
        ``length`` (old keys in spare storage, finite); no real row reads its slots (a row that joins
        later has its slots written by ``add_rows`` and its own steps). The real rows are unchanged."""
        n = self.rows
        if rows > self.max_batch_size:
            raise ValueError(f"padded_rows({rows}): the storage holds {self.max_batch_size} rows")
        self._next_pos[n:rows] = 0
        self._valid[n:rows, : self.length] = True
        self._set_rows(rows)
        try:
            yield
        finally:
            self._set_rows(n)

    def add_rows(self, src: KVCache, src_rows: Sequence[int] | None = None) -> None:
        """Append rows of ``src`` (a cache of the same model; all its rows, or ``src_rows``, repeats
        allowed) to this batch, aligned so that both end at the same slot.

        When ``src`` holds more slots than this cache, this cache's rows get leading empty slots first
        (cheap: only ``length`` moves, nothing is copied). An encoder-decoder's rows bring their
        cross-attention keys: the shorter source side is right-padded, masked by ``memory_valid``.
        """
        idx = torch.tensor(list(range(src.rows)) if src_rows is None else list(src_rows), device=self.device)
        if src.cross_k:
            self._add_cross(src, idx)
        elif self.cross_k and self.rows:
            raise ValueError("add_rows: rows without cross-attention keys cannot join encoder-decoder rows")
        m, P = idx.numel(), src.length
        if P > self.length:  # the existing rows see masked, empty slots [length, P)
            self.reserve(P - self.length)
            self.valid[:, self.length : P] = False
            self.length = P
        L, n = self.length, self.rows
        if n + m > self.max_batch_size:
            self._grow(max(n + m, 2 * self.max_batch_size), self.capacity)
        new = slice(n, n + m)
        for dst, s in zip((*self._k, *self._v), (*src.k, *src.v), strict=True):
            dst[new, :, L - P : L] = s.index_select(0, idx)[:, :, :P]
        self._valid[new, : L - P] = False
        self._valid[new, L - P : L] = src.valid.index_select(0, idx)[:, :P]
        self._positions[new, L - P : L] = src.positions.index_select(0, idx)[:, :P]
        self._next_pos[new] = src.next_pos.index_select(0, idx)
        self._set_rows(n + m)

    def _add_cross(self, src: KVCache, idx: Tensor) -> None:
        """Append the cross-attention keys / values and source mask of ``src``'s rows ``idx``."""

        def mask(c: KVCache, rows: Tensor | None) -> Tensor:  # (rows, S) real source tokens
            valid = c.memory_valid
            if valid is None:
                valid = torch.ones(c.rows, c.cross_k[0].shape[2], dtype=torch.bool, device=c.device)
            return valid if rows is None else valid.index_select(0, rows)

        new_k = [t.index_select(0, idx) for t in src.cross_k]
        new_v = [t.index_select(0, idx) for t in src.cross_v]
        new_ids = src.memory_ids.index_select(0, idx) if src.memory_ids is not None else None
        if not self.rows or not self.cross_k:
            self.cross_k, self.cross_v, self.memory_valid = new_k, new_v, mask(src, idx)
            self.memory_ids = new_ids
            return
        S = max(self.cross_k[0].shape[2], new_k[0].shape[2])

        def cat(a: Tensor, b: Tensor, dim: int) -> Tensor:  # right-pad the source axis ``dim`` to S
            pad = [(0, 0)] * (a.dim() - dim - 1)
            a = F.pad(a, [x for p in pad for x in p] + [0, S - a.shape[dim]])
            b = F.pad(b, [x for p in pad for x in p] + [0, S - b.shape[dim]])
            return torch.cat([a, b])

        self.memory_valid = cat(mask(self, None), mask(src, idx), 1)
        if self.memory_ids is not None and new_ids is not None:
            self.memory_ids = cat(self.memory_ids, new_ids, 1)
        self.cross_k = [cat(a, b, 2) for a, b in zip(self.cross_k, new_k, strict=True)]
        self.cross_v = [cat(a, b, 2) for a, b in zip(self.cross_v, new_v, strict=True)]

    def reserve(self, slots: int, limit: int | None = None) -> None:
        """Make room for ``slots`` more slots after ``length``: drop leading slots that no row uses,
        then grow the storage if that is not enough, by half its capacity (fewer copies as it grows) but
        to no more than ``limit`` slots after ``length`` when given (the most any row can still use)."""
        if self.length + slots <= self.capacity:
            return
        self.compact()
        if self.length + slots > self.capacity:
            more = self.capacity // 2 if limit is None else min(self.capacity // 2, limit)
            self._grow(self.max_batch_size, self.length + max(slots, more))

    def compact(self) -> None:
        """Drop the leading slots that are empty in every row (left by rows that have left the batch)."""
        used = self.valid[:, : self.length].any(0).nonzero()
        first = int(used[0]) if used.numel() else self.length
        if first == 0:
            return
        L = self.length
        for t in (*self.k, *self.v):
            t[:, :, : L - first] = t[:, :, first:L].clone()
        for t in (self.valid, self.positions):
            t[:, : L - first] = t[:, first:L].clone()
        self.length = L - first

    def _grow(self, rows: int, capacity: int) -> None:
        """Reallocate the storage for ``rows`` rows of ``capacity`` slots, one tensor at a time (each old
        one freed before the next is made: the memory peak is the cache plus one layer's keys, not two
        whole caches). Under ``lamina.malloc``'s ``release`` policy a layer's keys from 4 MiB are mapped
        apart and go back to the system when freed; the heap's free memory goes back once the storage
        is made (``trim``, MKL's buffers kept: the decoding step that grew the cache uses them next)."""
        from lamina.malloc import trim

        n, L = self.rows, self.length
        fresh = self._zeros(rows, capacity)
        for store, views in ((self._k, self.k), (self._v, self.v)):
            for i, old in enumerate(store):
                new = next(fresh)
                new[:n, :, :L] = old[:n, :, :L]
                store[i], views[i] = new, new[:n]  # the old tensor's last references go
                del old
        valid, positions, next_pos = self._valid, self._positions, self._next_pos
        self._valid, self._positions, self._next_pos = fresh
        self._valid[:n, :L], self._positions[:n, :L] = valid[:n, :L], positions[:n, :L]
        self._next_pos[:n] = next_pos[:n]
        self.capacity = capacity
        self._set_rows(n)
        del valid, positions, next_pos
        trim(mkl=False)


# -- inference copies -----------------------------------------------------------------------------------

STACK_MAX_ELEMENTS = 2**19  # inference copies (see inference_linear): only for layers this small
_MKLDNN = torch.backends.mkldnn.is_available()  # oneDNN prepacking; off for good after its first failure
ONEDNN_ERRORS = (RuntimeError, AttributeError, NotImplementedError)  # a private op missing or refusing


class _InferenceCopies(dict):
    """A module's inference copies by name (see ``inference_copy``): left behind when the module is
    copied or pickled (a prepacked oneDNN weight cannot be; the copy makes its own when it runs)."""

    def __deepcopy__(self, memo: dict) -> _InferenceCopies:
        return _InferenceCopies()

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (_InferenceCopies, ())


class HoldsInferenceCopies(nn.Module):
    """A module that may hold inference copies of its weights (``inference_copy``): ``.to()``,
    ``.half()`` and the other conversions (``nn.Module._apply``) drop them; the next use makes them again."""

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> HoldsInferenceCopies:
        copies = self.__dict__.get("_inference_copies")
        if copies is not None:
            copies.clear()  # in place: a shallow copy of the module (layer_skip_draft) shares it
        return super()._apply(fn, recurse)


def clear_inference_copies(module: nn.Module) -> None:
    """Drop the inference copies held by ``module`` and its submodules (``inference_linear`` 's and the
    LM head's); their next use makes them again. Needed only after writing weights through ``.data``
    (``p.data.add_(...)``), which copies cannot see; optimizer steps, ``load_state_dict``, in-place ops
    on the parameters and ``.to()`` need nothing."""
    for m in module.modules():
        copies = m.__dict__.get("_inference_copies")
        if copies is not None:
            copies.clear()


def _weights_key(sources: Sequence[Tensor]) -> tuple:
    """What identifies the values of ``sources`` while they live: each tensor (a weak reference, so a held
    copy keeps no old weight alive), its version counter, data pointer and dtype."""
    return tuple((weakref.ref(t), t._version, t.data_ptr(), t.dtype) for t in sources)


def _same_weights(key: tuple, sources: Sequence[Tensor]) -> bool:
    return len(key) == len(sources) and all(
        ref() is t and version == t._version and ptr == t.data_ptr() and dtype == t.dtype
        for (ref, version, ptr, dtype), t in zip(key, sources, strict=True)
    )


def inference_copy(
    owner: nn.Module, name: str, sources: Sequence[Tensor], make: Callable[[], _T]
) -> _T | None:
    """``owner``'s copy ``name`` of the weights ``sources``: ``make()``, held in ``owner.__dict__`` (apart
    from its parameters and state dict; ``copy.deepcopy`` and pickling leave it behind) and made again
    once a source changed; None (the caller runs its plain path) when a source is an inference tensor
    (made under ``torch.inference_mode``: it has no version counter to follow).

    A source is unchanged while it is the same tensor object with the same version counter, data pointer
    and dtype: optimizer steps, ``load_state_dict`` (``assign=True`` too), ``torch.func.functional_call``
    and in-place ops (also under ``inference_mode``) make a new copy; ``.to()`` / ``.half()`` drop it
    when ``owner`` is a ``HoldsInferenceCopies``. Writes through ``.data`` (``p.data.add_(x)``) keep
    the version and are NOT seen: call ``clear_inference_copies(model)`` after them."""
    if any(t.is_inference() for t in sources):
        return None
    copies = owner.__dict__.get("_inference_copies")
    if copies is None:
        copies = owner.__dict__["_inference_copies"] = _InferenceCopies()
    held = copies.get(name)
    if held is None or not _same_weights(held[0], sources):
        copies.pop(name, None)  # the stale copy goes before the new one is made
        held = copies[name] = (_weights_key(sources), make())
    return held[1]


def prepack(w: Tensor) -> Tensor:
    """``w`` (out, in) float32 reordered for oneDNN's linear (``torch.ops.mkldnn``, private): an opaque
    tensor (no storage: ``.to_dense()`` gives ``w`` back)."""
    return torch.ops.mkldnn._reorder_linear_weight(w, 8)


def packed_linear(x: Tensor, packed: Tensor, b: Tensor | None) -> Tensor:
    """``F.linear(x, w, b)`` with ``packed = prepack(w)`` (``torch.ops.mkldnn``, private); x (..., in)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")


def onednn_available() -> bool:
    """Whether oneDNN's prepacked linear may run (this torch has oneDNN and no call to it has failed)."""
    return _MKLDNN


def onednn_failed() -> None:
    """Turn oneDNN prepacking off for the process (a private op failed: the plain path from now on)."""
    global _MKLDNN
    _MKLDNN = False


def _stacked_copies(
    linears: list[nn.Linear], pack: bool
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(weight, bias, prepacked weight) of ``linears`` stacked: one copy of the weights held, either
    stacked (several parts) or prepacked (then the stacked one is dropped)."""
    w, b = _stacked_weights(linears)
    packed = None
    if pack:
        try:
            packed = prepack(w)
        except ONEDNN_ERRORS:
            onednn_failed()
    return (w if packed is None else None), b, packed


def inference_linear(owner: nn.Module, name: str, x: Tensor, *parts: nn.Module) -> Tensor | None:
    """A decoding step's x (B, 1, in) through ``parts`` (plain ``nn.Linear`` s over the same input), their
    outputs concatenated (B, 1, sum of out), without autograd; None where this does not apply (the caller
    runs the parts): other inputs (a prompt's forward keeps its exact old numerics), autograd, autocast,
    ``torch.compile``, another module type (LoRA), inference-tensor weights, or more than
    ``STACK_MAX_ELEMENTS`` weights in all.

    Small layers (d_model ~256, the GRPO benchmark's model) are where a decoding step's cost is calls,
    not arithmetic; inference copies help there, held on ``owner`` under ``name`` (``inference_copy``:
    made again when a weight changes; ``clear_inference_copies`` after writes through ``.data``; the
    module, its parameters, state dict and training are unchanged). One copy of the weights per layer:

    - the weights stacked (several parts): one matmul instead of one per part, as ``fuse_projections``
      does for converted models;
    - on CPU in float32, that weight prepacked for oneDNN (``torch.ops.mkldnn``) instead: MKL's float32
      matmul for a few rows is slow on this project's CPUs (AMD EPYC: a tiny model's decoding step ran its
      matmuls 1.8x faster prepacked). These ops are private: the first one that fails turns prepacking
      off for the process (stacked ``F.linear`` from then on).

    Numerics: oneDNN sums in another order, outputs within ~1e-6 of ``F.linear`` 's. Which path runs
    depends on T, so in a speculative engine step (T = K + 1 for every row once one row is speculative)
    a plain row's logits can differ by that much from those it gets in a step of its own: a row's
    numerics depend on its batch-mates there (as they already did through MKL, whose kernels change with
    the row count). Kept rather than turned off with a draft: the draft's own steps are the T = 1 steps
    this speeds up, and speculative greedy output is still exactly the verifying forward's choices.

    At most ``STACK_MAX_ELEMENTS`` weights per copy (2 MiB in float32): larger layers would hold a second
    copy of their weights; a model loaded for inference in the ``fp32`` format prepacks them in place
    instead (``lamina.model.quant.PackedLinear``; such layers are no ``nn.Linear``, so not handled here)."""
    if (
        x.dim() != 3
        or x.shape[1] != 1
        or torch.is_grad_enabled()
        or torch.compiler.is_compiling()
        or torch.is_autocast_enabled(x.device.type)  # F.linear's autocast dtype, not the copies' float32
    ):
        return None
    linears = [p for p in parts if type(p) is nn.Linear]
    if len(linears) < len(parts) or sum(p.weight.numel() for p in linears) > STACK_MAX_ELEMENTS:
        return None
    n_biases = sum(p.bias is not None for p in linears)
    if 0 < n_biases < len(linears):  # some parts with a bias, some without
        return None
    w0 = linears[0].weight
    pack = _MKLDNN and w0.device.type == "cpu" and w0.dtype == torch.float32 and x.dtype == torch.float32
    if len(linears) == 1 and not pack:
        return None  # the module's own call is as fast
    sources = [t for p in linears for t in (p.weight, p.bias) if t is not None]
    held = inference_copy(owner, name, sources, lambda: _stacked_copies(linears, pack))
    if held is None:
        return None
    w, b, packed = held
    if packed is not None and x.dtype == torch.float32:
        try:
            return packed_linear(x, packed, b)
        except ONEDNN_ERRORS:
            onednn_failed()
            owner.__dict__["_inference_copies"].pop(name, None)  # made again unpacked at the next step
            return None
    return None if w is None else F.linear(x, w, b)


# -- attention ---------------------------------------------------------------------------------------------


class Attention(HoldsInferenceCopies):
    """Multi-head attention with grouped KV heads (MHA / GQA / MQA) on ``scaled_dot_product_attention``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, cross: bool = False) -> None:
        super().__init__()
        assert cfg.n_kv_heads is not None and cfg.head_dim is not None
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.qkv_proj: nn.Module | None = None  # q, k and v in one matmul: see fuse_projections
        self.attn_dropout = cfg.attn_dropout
        self.scale = None if cfg.scale_attention else 1.0  # None: sdpa's 1 / sqrt(head_dim); T5: unscaled
        self.cross = cross  # cross-attention: queries from x, keys and values from the encoder's memory

    def fuse_projections(self) -> None:
        """Replace q/k/v_proj by one ``qkv_proj`` (their weights stacked): one matmul instead of three.

        For inference (``lamina.model.quant.convert_weights``): the fused model computes the same
        logits, but its state dict no longer has the per-projection names of checkpoints."""
        if self.qkv_proj is not None or self.cross:  # cross: q and k/v read different inputs
            return
        parts = [self.q_proj, self.k_proj, self.v_proj]
        self.qkv_proj = _stacked_linear(parts)
        del self.q_proj, self.k_proj, self.v_proj

    def _project(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, H, T, hd), k and v (B, Hkv, T, hd) from x (B, T, d_model), RoPE applied."""
        B, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        fused = self.qkv_proj(x) if self.qkv_proj is not None else None
        if fused is None:
            fused = inference_linear(self, "_qkv", x, self.q_proj, self.k_proj, self.v_proj)
        if fused is None:
            q = self.q_proj(x).view(B, T, H, hd).transpose(1, 2)
            k = self.k_proj(x).view(B, T, Hkv, hd).transpose(1, 2)
            v = self.v_proj(x).view(B, T, Hkv, hd).transpose(1, 2)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            return q, k, v
        qkv = fused.view(B, T, H + 2 * Hkv, hd).transpose(1, 2)  # (B, H + 2 Hkv, T, hd)
        qk, v = qkv[:, : H + Hkv], qkv[:, H + Hkv :]
        if rope is not None:  # q and k heads rotate together: one set of ops for both
            qk = apply_rope(qk, *rope)
        return qk[:, :H], qk[:, H:], v

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        attn_mask: Tensor | None,
        is_causal: bool,
        cache: KVCache | None,
    ) -> Tensor:
        """x (B, T, d_model) -> (B, T, d_model).

        ``attn_mask`` is a bool (True = attend) or additive float mask (B, 1|H, T, S) over the S cached +
        new slots, or None with ``is_causal`` for the plain causal case. New keys/values are written to
        ``cache`` at slots [length, length + T).
        """
        B, T, _ = x.shape
        q, k, v = self._project(x, rope)
        if cache is not None:
            start = cache.length
            cache.k[self.layer_idx][:, :, start : start + T] = k
            cache.v[self.layer_idx][:, :, start : start + T] = v
            k = cache.k[self.layer_idx][:, :, : start + T]
            v = cache.v[self.layer_idx][:, :, : start + T]
        dropout_p = self.attn_dropout if self.training else 0.0
        rep = self.n_heads // self.n_kv_heads  # GQA: each KV head serves `rep` query heads
        if rep > 1 and T == 1:
            # one new token (decoding): a KV head's `rep` query heads become `rep` query rows of that
            # head, so attention reads the cache as it is (no copy) in one call with more rows per head
            S = k.shape[2]
            if attn_mask is not None and attn_mask.shape[1] > 1:
                attn_mask = attn_mask.reshape(B, self.n_kv_heads, rep, S)
            q = q.reshape(B, self.n_kv_heads, rep, self.head_dim)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=self.scale
            )
        else:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=dropout_p,
                is_causal=is_causal,
                enable_gqa=rep > 1,
                scale=self.scale,
            )
        # y is (B, H, T, hd), or (B, Hkv, rep, hd) with T = 1: the same memory order, which is (B, T, H * hd)'s
        # when T = 1
        if T == 1:
            return _linear(self, "_o", y.reshape(B, 1, -1), self.o_proj)
        return self.o_proj(y.reshape(B, self.n_heads, T, self.head_dim).transpose(1, 2).reshape(B, T, -1))

    def cross_forward(
        self, x: Tensor, memory: Tensor | None, memory_mask: Tensor | None, cache: KVCache | None
    ) -> Tensor:
        """Cross-attention: x (B, T, d_model) attends to the encoder output ``memory`` (B, S, d_model).

        ``memory_mask`` (B, 1, 1, S), bool or additive (``cross_attention_mask``), masks padded source
        slots (None: none). With a ``cache``, the keys and values
        of ``memory`` are computed on the first call and read from ``cache.cross_k/v`` after (``memory``
        may then be None).
        """
        B, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        if cache is not None and len(cache.cross_k) > self.layer_idx:
            k, v = cache.cross_k[self.layer_idx], cache.cross_v[self.layer_idx]
        else:
            assert memory is not None, "cross-attention needs memory (or a cache that holds its keys)"
            S = memory.shape[1]
            k = self.k_proj(memory).view(B, S, Hkv, hd).transpose(1, 2)  # (B, Hkv, S, hd)
            v = self.v_proj(memory).view(B, S, Hkv, hd).transpose(1, 2)
            if cache is not None:
                cache.cross_k.append(k)
                cache.cross_v.append(v)
        dropout_p = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=memory_mask, dropout_p=dropout_p, enable_gqa=H > Hkv, scale=self.scale
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


# -- MLPs --------------------------------------------------------------------------------------------------

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swiglu": F.silu,  # gated: silu(gate(x)) * up(x)
    "geglu": F.gelu,
    "geglu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # T5 v1.1 "gated-gelu" (gelu_new)
}


class MLP(HoldsInferenceCopies):
    """Position-wise feed-forward: ``down(act(up(x)))``, or gated ``down(act(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.d_ff is not None
        self.gated = cfg.activation in ("swiglu", "geglu", "geglu_tanh")
        self.act = _ACTIVATIONS[cfg.activation]
        if self.gated:
            self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.gate_up_proj: nn.Module | None = None  # gate and up in one matmul: see fuse_projections

    def fuse_projections(self) -> None:
        """Gated MLPs: replace gate_proj and up_proj by one ``gate_up_proj`` (for inference, as
        ``Attention.fuse_projections``)."""
        if self.gated and self.gate_up_proj is None:
            self.gate_up_proj = _stacked_linear([self.gate_proj, self.up_proj])
            del self.gate_proj, self.up_proj

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, d_model) -> (B, T, d_model)."""
        fused = self.gate_up_proj(x) if self.gate_up_proj is not None else None
        if fused is None and self.gated:
            fused = inference_linear(self, "_gate_up", x, self.gate_proj, self.up_proj)
        if fused is not None:
            gate, up = fused.chunk(2, dim=-1)
            h = self.act(gate) * up
        elif self.gated:
            h = self.act(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = self.act(self.up_proj(x))
        return _linear(self, "_down", h, self.down_proj)


def _linear(owner: nn.Module, name: str, x: Tensor, layer: nn.Module) -> Tensor:
    """``layer(x)``, through ``inference_linear`` where it applies."""
    y = inference_linear(owner, name, x, layer)
    return layer(x) if y is None else y


def _stacked_weights(parts: list[nn.Linear]) -> tuple[Tensor, Tensor | None]:
    """The weight (sum of out, in) and bias of ``parts`` stacked in order, detached (one part: its own
    tensors, not copied)."""
    w = torch.cat([p.weight.detach() for p in parts]) if len(parts) > 1 else parts[0].weight.detach()
    biases = [p.bias.detach() for p in parts if p.bias is not None]
    return w, (torch.cat(biases) if len(biases) > 1 else biases[0]) if biases else None


def _stacked_linear(parts: list[nn.Linear]) -> nn.Linear:
    """One linear whose outputs are those of ``parts``, in order (same input size, same dtype)."""
    first = parts[0]
    out = sum(p.out_features for p in parts)
    w = first.weight
    fused = torch.nn.utils.skip_init(  # no random init: the weights are copied in below
        nn.Linear, first.in_features, out, bias=first.bias is not None, device=w.device, dtype=w.dtype
    )
    weight, bias = _stacked_weights(parts)
    with torch.no_grad():
        fused.weight.copy_(weight)
        if fused.bias is not None and bias is not None:
            fused.bias.copy_(bias)
    return fused.requires_grad_(w.requires_grad)
