"""GGUF (llama.cpp's single-file format) -> lamina: the container, lamina's own dequantization, and the
map from GGUF tensor names to Hugging Face ones.

A GGUF file is a header, ``key -> value`` metadata, a table of tensor infos (name, dims, type, offset),
then the aligned tensor data. ``read_gguf`` parses the first three with ``struct`` over a memory map and
checks every tensor fits in the file before anything else happens; tensors are dequantized only when
asked for (``GGUFFile.load_tensor``).

Shape convention. GGUF lists a tensor's dims as ``ne = [ne0, ne1, ...]`` with ``ne0`` the contiguous,
fastest-varying one (a Linear weight with ``in=576, out=1536`` has ``ne = [576, 1536]``). lamina speaks
PyTorch order throughout: ``shape = tuple(reversed(ne))`` -> ``(1536, 576)``, row-major, so the quant
blocks run along the *last* PyTorch dim, which must be a multiple of the block size.

Quantized types store fixed-size blocks of ``block_size`` weights in ``type_size`` bytes: fp16 scale(s)
and packed integers (k-quants add sub-block scales). The layouts follow ggml's ``dequantize_row_*``
(ggml-quants.c); each ``_dq_*`` function below decodes all blocks of a tensor at once with vectorised
numpy ops, in the same float32 operation order as ggml, so results match the reference bit for bit.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
import warnings
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lamina.errors import CheckpointError, ModelNotFoundError

StateDict = dict[str, torch.Tensor]

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
QK_K = 256  # super-block size of the k-quants

# GGML type ids and names (ggml.h, enum ggml_type) with (block_size, type_size); lamina decodes the ones
# in _DEQUANTIZERS, the rest are listed so that sizes can still be checked and errors can name them.
_GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", QK_K, 84),
    11: ("Q3_K", QK_K, 110),
    12: ("Q4_K", QK_K, 144),
    13: ("Q5_K", QK_K, 176),
    14: ("Q6_K", QK_K, 210),
    15: ("Q8_K", QK_K, 292),
    16: ("IQ2_XXS", QK_K, 66),
    17: ("IQ2_XS", QK_K, 74),
    18: ("IQ3_XXS", QK_K, 98),
    19: ("IQ1_S", QK_K, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", QK_K, 110),
    22: ("IQ2_S", QK_K, 82),
    23: ("IQ4_XS", QK_K, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", QK_K, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", QK_K, 54),
    35: ("TQ2_0", QK_K, 66),
    39: ("MXFP4", 32, 17),
}


def qtype_name(qtype: int) -> str:
    """The GGML name of a type id (``3 -> "Q4_1"``), or ``"type<id>"`` for an id lamina does not know."""
    entry = _GGML_TYPES.get(int(qtype))
    return entry[0] if entry else f"type{int(qtype)}"


# -- dequantization ------------------------------------------------------------------------------------------
# Each _dq_* takes the blocks as a (n_blocks, type_size) uint8 array and returns (n_blocks, block_size)
# float32. Offsets in the comments are bytes within one block. numpy rather than torch: its ops are
# single-threaded, so decoding never fights other work for cores (torch's OpenMP pools slowed the SmolLM2
# file from 0.3 s to 10-20 s on a busy 2-core machine); GGUFFile.load_tensors parallelises over tensors.

_U8 = np.uint8
_SHIFT_8 = np.arange(8, dtype=_U8).reshape(8, 1)  # bit j of a byte, one row per j
_SHIFT_2BIT = np.array([0, 2, 4, 6], dtype=_U8).reshape(4, 1)  # 2-bit field j of a byte


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The little-endian fp16 at byte ``at`` of every block, as float32 of shape (n_blocks, 1)."""
    return np.ascontiguousarray(blocks[:, at : at + 2]).view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., k) packed bytes -> (..., 2, k): low nibbles first (elements 0..k-1), then high (k..2k-1)."""
    out = np.empty((*qs.shape[:-1], 2, qs.shape[-1]), dtype=_U8)
    np.bitwise_and(qs, 0x0F, out=out[..., 0, :])
    np.right_shift(qs, 4, out=out[..., 1, :])
    return out


def _bits(qh: np.ndarray) -> np.ndarray:
    """(..., k) bytes -> (..., 8, k) with [..., j, i] = bit j of byte i."""
    return (qh[..., None, :] >> _SHIFT_8) & 1


def _dq_q4_0(b: np.ndarray) -> np.ndarray:
    # d: f16 @0 | qs: 16 bytes @2, element i < 16 in the low nibble of qs[i], i >= 16 in the high one of qs[i-16]
    q = _nibbles(b[:, 2:]).reshape(-1, 32).view(np.int8) - np.int8(8)
    return np.multiply(q, _f16(b, 0), dtype=np.float32)


def _dq_q4_1(b: np.ndarray) -> np.ndarray:
    # d: f16 @0 | m: f16 @2 | qs: 16 bytes @4; x = d*q + m
    x = np.multiply(_nibbles(b[:, 4:]).reshape(-1, 32), _f16(b, 0), dtype=np.float32)
    x += _f16(b, 2)
    return x


def _q5_ints(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    # qh: 4 bytes = a little-endian uint32 whose bit i is the 5th bit of element i
    q = _nibbles(qs).reshape(-1, 32)
    q |= _bits(qh).swapaxes(-1, -2).reshape(-1, 32) << 4
    return q


def _dq_q5_0(b: np.ndarray) -> np.ndarray:
    # d: f16 @0 | qh: 4 bytes @2 | qs: 16 bytes @6; x = d*(q - 16)
    q = _q5_ints(b[:, 2:6], b[:, 6:]).view(np.int8) - np.int8(16)
    return np.multiply(q, _f16(b, 0), dtype=np.float32)


def _dq_q5_1(b: np.ndarray) -> np.ndarray:
    # d: f16 @0 | m: f16 @2 | qh: 4 bytes @4 | qs: 16 bytes @8; x = d*q + m
    x = np.multiply(_q5_ints(b[:, 4:8], b[:, 8:]), _f16(b, 0), dtype=np.float32)
    x += _f16(b, 2)
    return x


def _dq_q8_0(b: np.ndarray) -> np.ndarray:
    # d: f16 @0 | qs: 32 int8 @2
    return np.multiply(b[:, 2:].view(np.int8), _f16(b, 0), dtype=np.float32)


def _k_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 scale bytes -> 8 six-bit scales and 8 six-bit mins (ggml's get_scale_min_k4).

    Sub-blocks 0-3: scale = s[j] & 63, min = s[j+4] & 63. Sub-blocks 4-7: the low 4 bits come from
    s[j+4] (scale in the low nibble, min in the high one), the top 2 from bits 6-7 of s[j-4] / s[j].
    """
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = np.concatenate((a & 63, (c & 0x0F) | ((a >> 6) << 4)), axis=1)
    mins = np.concatenate((b & 63, (c >> 4) | ((b >> 6) << 4)), axis=1)
    return scales, mins


def _k_affine(q: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: x = (d*scale)*q - (dmin*min) per sub-block of 32; q is (n, 8, 32)."""
    sc, mn = _k_scales_mins(b[:, 4:16])
    d = (_f16(b, 0) * sc)[..., None]  # (n, 8, 1) float32
    m = (_f16(b, 2) * mn)[..., None]
    x = np.multiply(q, d, dtype=np.float32)
    x -= m
    return x.reshape(-1, QK_K)


def _dq_q4_k(b: np.ndarray) -> np.ndarray:
    # d: f16 @0 | dmin: f16 @2 | scales: 12 bytes @4 | qs: 128 bytes @16
    # 8 sub-blocks of 32: 32 bytes of qs hold sub-block 2k in low nibbles and 2k+1 in high ones.
    return _k_affine(_nibbles(b[:, 16:].reshape(-1, 4, 32)).reshape(-1, 8, 32), b)


def _dq_q5_k(b: np.ndarray) -> np.ndarray:
    # d: f16 @0 | dmin: f16 @2 | scales: 12 bytes @4 | qh: 32 bytes @16 | qs: 128 bytes @48
    # as Q4_K, plus bit j of qh[i] is the 5th bit of element i of sub-block j.
    q = _nibbles(b[:, 48:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    q |= _bits(b[:, 16:48]) << 4
    return _k_affine(q, b)


def _dq_q6_k(b: np.ndarray) -> np.ndarray:
    # ql: 128 bytes @0 | qh: 64 bytes @128 | scales: 16 int8 @192 | d: f16 @208; x = d*scale*(q - 32)
    # Each half of 128 elements uses 64 ql bytes and 32 qh bytes: element 32*t + i (t = 0..3) has its low
    # 4 bits in nibble t//2 of ql[32*(t%2) + i] and its high 2 bits in bits 2t..2t+1 of qh[i].
    q = _nibbles(b[:, :128].reshape(-1, 2, 64)).reshape(-1, 2, 2, 2, 32)  # (n, half, nibble, t%2, i)
    q |= ((b[:, 128:192].reshape(-1, 2, 1, 32) >> _SHIFT_2BIT) & 3).reshape(-1, 2, 2, 2, 32) << 4
    q = q.view(np.int8) - np.int8(32)
    d = (_f16(b, 208) * b[:, 192:208].view(np.int8))[..., None]  # (n, 16, 1) float32
    return np.multiply(q.reshape(-1, 16, 16), d, dtype=np.float32).reshape(-1, QK_K)


def _dq_q2_k(b: np.ndarray) -> np.ndarray:
    # scales: 16 bytes @0 (low nibble scale, high nibble min) | qs: 64 bytes @16 | d: f16 @80 | dmin: f16 @82
    # element 128*h + 32*j + i = bits 2j..2j+1 of qs[32*h + i]; 16 sub-blocks of 16. x = d*sc*q - dmin*m
    s = b[:, :16]
    dl = (_f16(b, 80) * (s & 0x0F))[..., None]
    ml = (_f16(b, 82) * (s >> 4))[..., None]
    q = (b[:, 16:80].reshape(-1, 2, 1, 32) >> _SHIFT_2BIT) & 3  # (n, h, j, i)
    x = np.multiply(q.reshape(-1, 16, 16), dl, dtype=np.float32)
    x -= ml
    return x.reshape(-1, QK_K)


def _dq_q3_k(b: np.ndarray) -> np.ndarray:
    # hmask: 32 bytes @0 | qs: 64 bytes @32 | scales: 12 bytes @96 | d: f16 @108
    # low 2 bits as Q2_K; bit m of hmask[i] (m = 4h + j) *clear* means subtract 4. 16 six-bit scales - 32:
    # low 4 bits are nibble k//8 of scales[k%8], high 2 bits are bits 2*(k//4).. of scales[8 + k%4].
    s = b[:, 96:108]
    sc = _nibbles(s[:, :8]).reshape(-1, 16)
    sc |= ((s[:, None, 8:12] >> _SHIFT_2BIT) & 3).reshape(-1, 16) << 4
    dl = (_f16(b, 108) * (sc.view(np.int8) - np.int8(32)))[..., None]  # (n, 16, 1) float32
    q = ((b[:, 32:96].reshape(-1, 2, 1, 32) >> _SHIFT_2BIT) & 3).reshape(-1, 8, 32).view(np.int8)
    q -= (_bits(b[:, :32]) ^ 1).view(np.int8) << 2  # (n, m, i)
    return np.multiply(q.reshape(-1, 16, 16), dl, dtype=np.float32).reshape(-1, QK_K)


def _dq_bf16(b: np.ndarray) -> np.ndarray:
    return (b.view("<u2").astype(np.uint32) << 16).view(np.float32)


def _dq_float(dtype: str) -> Callable[[np.ndarray], np.ndarray]:
    def dq(b: np.ndarray) -> np.ndarray:
        return b.view(dtype).astype(np.float32)  # always a copy: never aliases the file's memory map

    return dq


def _cpu_count() -> int:
    """CPUs this process may run on (the affinity mask in containers, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


_DEQUANTIZERS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    0: _dq_float("<f4"),
    1: _dq_float("<f2"),
    30: _dq_bf16,
    28: _dq_float("<f8"),
    2: _dq_q4_0,
    3: _dq_q4_1,
    6: _dq_q5_0,
    7: _dq_q5_1,
    8: _dq_q8_0,
    10: _dq_q2_k,
    11: _dq_q3_k,
    12: _dq_q4_k,
    13: _dq_q5_k,
    14: _dq_q6_k,
}
SUPPORTED_QTYPES: tuple[str, ...] = tuple(qtype_name(t) for t in _DEQUANTIZERS)


def _check_supported(qtype: int, what: str) -> None:
    if qtype not in _DEQUANTIZERS:
        raise CheckpointError(
            f"{what} has GGML type {qtype_name(qtype)} (id {qtype}), which lamina cannot dequantize; "
            f"supported: {', '.join(SUPPORTED_QTYPES)}. Re-quantize the model with llama.cpp's "
            "`llama-quantize` to one of those"
        )


def _nbytes(qtype: int, shape: tuple[int, ...], what: str) -> int:
    """Bytes of a tensor of ``shape`` (PyTorch order) in type ``qtype``; checks the block alignment."""
    if qtype not in _GGML_TYPES:
        raise CheckpointError(
            f"{what} has unknown GGML type id {qtype}; this file needs a newer reader than lamina's "
            f"(lamina dequantizes {', '.join(SUPPORTED_QTYPES)})"
        )
    name, block_size, type_size = _GGML_TYPES[qtype]
    if any(d < 0 for d in shape):
        raise CheckpointError(f"{what} has a negative dimension in shape {shape}; the file is corrupt")
    row = shape[-1] if shape else 1
    if row % block_size:
        raise CheckpointError(
            f"{what} has shape {shape} but {name} packs {block_size} values per block along the last dim, "
            f"and {row} is not a multiple of {block_size}; the file is corrupt"
        )
    return math.prod(shape) // block_size * type_size


def dequantize(raw: np.ndarray, qtype: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Decode one tensor's raw GGUF bytes into a new float32 tensor of ``shape``.

    Args:
        raw: the tensor's data exactly as stored in the file (any dtype/shape; its bytes are used, in C
            order). Read-only arrays such as memory maps are fine: ``raw`` is never written to.
        qtype: the GGML type id (an ``int`` or ``gguf.GGMLQuantizationType``), e.g. 3 for Q4_1.
        shape: the tensor's shape in PyTorch order, i.e. GGUF's ``ne`` reversed; quant blocks run along
            the last dim.

    Returns a float32 tensor that owns its memory (it does not alias ``raw``).

    Raises:
        CheckpointError: ``qtype`` is not one of ``SUPPORTED_QTYPES``, or ``raw`` has the wrong size.
    """
    qtype, shape = int(qtype), tuple(int(d) for d in shape)
    _check_supported(qtype, "tensor")
    expected = _nbytes(qtype, shape, "tensor")
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if data.size != expected:
        raise CheckpointError(
            f"a tensor of type {qtype_name(qtype)} and shape {shape} takes {expected} bytes but {data.size} were "
            "given"
        )
    blocks = data.reshape(-1, _GGML_TYPES[qtype][2])
    return torch.from_numpy(_DEQUANTIZERS[qtype](blocks).reshape(shape))


# -- the container -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lives in a GGUF file and how it is stored.

    ``shape`` is in PyTorch order (GGUF's ``ne`` reversed); ``offset`` is absolute in the file.
    """

    name: str
    shape: tuple[int, ...]
    qtype: int
    qtype_name: str
    offset: int
    nbytes: int

    @property
    def n_elements(self) -> int:
        """Number of values in the tensor."""
        return math.prod(self.shape)


@dataclass
class GGUFFile:
    """A parsed GGUF file: its metadata in plain Python values, and its tensors, decoded on demand.

    Tensor data stay in a read-only memory map of the file until ``load_tensor`` decodes them.
    """

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]
    alignment: int = DEFAULT_ALIGNMENT
    _data: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def architecture(self) -> str | None:
        """``general.architecture`` (e.g. ``"llama"``), or None when the file does not say."""
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    @property
    def tensor_names(self) -> list[str]:
        """Tensor names in file order."""
        return list(self.tensors)

    def tensor_info(self, name: str) -> GGUFTensorInfo:
        """Shape, type and location of tensor ``name``; CheckpointError naming the file if it has none."""
        try:
            return self.tensors[name]
        except KeyError:
            some = ", ".join(list(self.tensors)[:5])
            raise CheckpointError(
                f"{self.path} has no tensor {name!r}; it has {len(self.tensors)} tensors, e.g. {some}"
            ) from None

    def raw_tensor(self, name: str) -> np.ndarray:
        """The stored bytes of tensor ``name`` as a read-only uint8 view of the memory map (no copy)."""
        info = self.tensor_info(name)
        if self._data is None:
            raise CheckpointError(
                f"{self.path}: this GGUFFile has no data attached; open it with read_gguf()"
            )
        return self._data[info.offset : info.offset + info.nbytes]

    def load_tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` dequantized to a new float32 tensor in PyTorch shape order."""
        info = self.tensor_info(name)
        _check_supported(info.qtype, f"tensor {name!r} of {self.path}")
        return dequantize(self.raw_tensor(name), info.qtype, info.shape)

    def load_tensors(self, names: Iterable[str] | None = None, workers: int | None = None) -> StateDict:
        """Several tensors (all by default) as ``{name: float32 tensor}``, in the order asked.

        Checks that every requested tensor exists and has a supported type before decoding any, then
        decodes them on ``workers`` threads (default: one per CPU, at most 8; numpy releases the GIL).
        """
        names = self.tensor_names if names is None else list(names)
        for name in names:
            _check_supported(self.tensor_info(name).qtype, f"tensor {name!r} of {self.path}")
        workers = workers or min(8, _cpu_count())
        # a bar appears only if dequantizing takes over 2 s (big files, busy machines), and only on a
        # terminal (disable=None): logs and pipes get no carriage-return frames
        bar = tqdm(
            total=len(names), desc=f"dequantizing {self.path.name}", unit="tensor", delay=2.0, leave=False,
            disable=None,
        )  # fmt: skip
        with bar:
            if workers == 1 or len(names) < 2:
                out = {}
                for name in names:
                    out[name] = self.load_tensor(name)
                    bar.update()
                return out
            # biggest first, so that one large tensor (the embedding) does not finish alone at the end
            order = sorted(names, key=lambda n: -self.tensors[n].nbytes)
            done: StateDict = {}
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for name, t in zip(order, pool.map(self.load_tensor, order), strict=True):
                    done[name] = t
                    bar.update()
        return {name: done[name] for name in names}


# GGUF metadata value types (gguf.md): scalar type id -> struct format; 8 is a string, 9 an array.
_SCALAR_FORMATS: dict[int, str] = {
    0: "B",  # UINT8
    1: "b",  # INT8
    2: "H",  # UINT16
    3: "h",  # INT16
    4: "I",  # UINT32
    5: "i",  # INT32
    6: "f",  # FLOAT32
    7: "?",  # BOOL
    10: "Q",  # UINT64
    11: "q",  # INT64
    12: "d",  # FLOAT64
}
_STRING, _ARRAY = 8, 9


class _Truncated(Exception):
    """Raised by _Cursor when a read runs past the end of the file."""


class _Cursor:
    """Sequential little-endian reads over a buffer, with bounds checks."""

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def _need(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise _Truncated

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self._need(size)
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        self._need(n)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:  # a few tokenizers store byte tokens that are not valid UTF-8
            return str(raw, "utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar("I"), self.scalar("Q")
            if etype in _SCALAR_FORMATS:  # numbers: one numpy read, not `count` struct calls
                dtype = np.dtype("<" + _SCALAR_FORMATS[etype])
                self._need(count * dtype.itemsize)
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += count * dtype.itemsize
                return arr.tolist()
            if count > len(self.buf):  # every element takes at least one byte
                raise _Truncated
            return [self.value(etype) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {vtype}")


def _open_map(path: Path) -> np.ndarray:
    """A read-only uint8 memory map of the whole file (numpy keeps the mmap alive with the array)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:  # magic + version + two counts
            raise CheckpointError(
                f"{path} is not a GGUF file: it has only {size} bytes, less than a GGUF header "
                "(an empty or cut-off download?)"
            )
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mm, dtype=np.uint8)


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor table; tensor data stay memory-mapped until loaded.

    Raises:
        CheckpointError: the file is missing, is not GGUF (bad magic), uses an unsupported GGUF version or
            byte order, has a corrupt header, or is shorter than its tensor table says (truncated download).
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; read_gguf needs the path of a .gguf file")
    if not path.exists():
        raise ModelNotFoundError(f"GGUF file {path} does not exist; check the path")
    try:
        data = _open_map(path)
    except OSError as e:
        raise CheckpointError(f"cannot read GGUF file {path}: {e}") from e
    buf = memoryview(data)  # type: ignore[arg-type]
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise CheckpointError(
            f"{path} is not a GGUF file: it starts with {bytes(buf[:4])!r}, not {GGUF_MAGIC!r} "
            "(safetensors and PyTorch checkpoints load with lamina's other readers)"
        )
    cur = _Cursor(buf)
    cur.pos = 4
    version = cur.scalar("I")
    if version and not version & 0xFFFF:
        raise CheckpointError(
            f"{path} is a big-endian GGUF file; lamina reads little-endian GGUF only "
            "(re-convert it with llama.cpp's convert_hf_to_gguf.py without --bigendian)"
        )
    if version not in (2, 3):
        raise CheckpointError(
            f"{path} is GGUF version {version}; lamina reads versions 2 and 3 "
            "(re-convert the model with a current llama.cpp)"
        )
    where = "the header"
    try:
        n_tensors, n_kv = cur.scalar("Q"), cur.scalar("Q")
        if n_tensors > len(buf) or n_kv > len(buf):
            raise _Truncated
        metadata: dict[str, Any] = {}
        for i in range(n_kv):
            where = f"metadata entry {i} of {n_kv}"
            key = cur.string()
            where = f"metadata key {key!r}"
            metadata[key] = cur.value(cur.scalar("I"))
        raw_infos = []
        for i in range(n_tensors):
            where = f"tensor info {i} of {n_tensors}"
            name = cur.string()
            where = f"tensor info {name!r}"
            n_dims = cur.scalar("I")
            if n_dims > 8:
                raise ValueError(f"{n_dims} dims")
            ne = [cur.scalar("Q") for _ in range(n_dims)]
            raw_infos.append((name, tuple(reversed(ne)), cur.scalar("I"), cur.scalar("Q")))
    except _Truncated:
        raise CheckpointError(
            f"{path} is truncated or corrupt: reading {where} ran past the end of the file "
            f"({len(buf)} bytes); re-download or re-convert it"
        ) from None
    except ValueError as e:
        raise CheckpointError(f"{path} is corrupt: bad {where} ({e}); re-download or re-convert it") from e

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise CheckpointError(f"{path} has general.alignment={alignment!r}; it must be a power of two")
    data_start = -(-cur.pos // alignment) * alignment

    tensors: dict[str, GGUFTensorInfo] = {}
    end, last = data_start, ""
    for name, shape, qtype, offset in raw_infos:
        what = f"tensor {name!r} of {path}"
        if name in tensors:
            raise CheckpointError(f"{path} is corrupt: tensor {name!r} appears twice")
        info = GGUFTensorInfo(
            name, shape, qtype, qtype_name(qtype), data_start + offset, _nbytes(qtype, shape, what)
        )
        tensors[name] = info
        if info.offset + info.nbytes > end:
            end, last = info.offset + info.nbytes, name
    if end > len(buf):
        raise CheckpointError(
            f"{path} is truncated: its tensors need {end} bytes (up to the end of {last!r}) but the file "
            f"has {len(buf)} ({100 * (end - len(buf)) / end:.1f}% missing); re-download or re-convert it"
        )
    return GGUFFile(path, version, metadata, tensors, alignment, data)


# -- GGUF -> Hugging Face ------------------------------------------------------------------------------------


def _reverse_qk_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of a q/k projection (weight or bias) for its RoPE layout.

    HF's rotate_half pairs dim ``i`` of a head with ``i + head_dim/2``; ggml's RoPE pairs ``2i`` with
    ``2i+1``. convert_hf_to_gguf.py therefore interleaves the two halves of every head's rows,
    ``w.reshape(n_heads, 2, head_dim/2, ...).swapaxes(1, 2)``; this is the inverse (as transformers does).
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise CheckpointError(f"q/k projection has {rows} rows, not a multiple of 2 * {n_heads} heads")
    a = w.numpy().reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2)
    return torch.from_numpy(np.ascontiguousarray(a).reshape(w.shape))  # numpy: see the note on _dq_*


def _meta(gf: GGUFFile, key: str, default: Any = ..., kind: type | tuple[type, ...] = object) -> Any:
    value = gf.metadata.get(key, default)
    if value is ...:
        raise CheckpointError(
            f"{gf.path} lacks metadata key {key!r}, which architecture {gf.architecture!r} needs"
        )
    if value is not None and value is not default and not isinstance(value, kind):
        raise CheckpointError(f"{gf.path} has {key}={value!r}; expected {kind_words(kind)}")
    return value


_KIND_WORDS = {int: "an integer", float: "a number", str: "a string", list: "a list", bool: "true or false"}


def kind_words(kind: type | tuple[type, ...]) -> str:
    """A type (or a tuple of types) as a person names it, article included: ``(int, list)`` ->
    ``"an integer or a list"`` (never "a int")."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(_KIND_WORDS.get(k, f"a value of type {k.__name__}") for k in kinds)


# GGUF metadata keys of end-of-generation tokens (llama.cpp's llama-vocab.cpp reads the same three)
GGUF_EOS_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


def gguf_eos_token_ids(metadata: Mapping[str, Any]) -> list[int]:
    """The eos, eot and eom ids of GGUF metadata (``GGUF_EOS_KEYS``), in that order, without repeats (see
    ``lamina.checkpoint.eos`` for the whole end-of-generation set)."""
    ids = [metadata.get(key) for key in GGUF_EOS_KEYS]
    return list(dict.fromkeys(i for i in ids if isinstance(i, int) and not isinstance(i, bool)))


def _token_ids(gf: GGUFFile) -> dict[str, int | list[int]]:
    """bos/pad ids, and as ``eos_token_id`` every end-of-generation id (eos, eot, eom): one id as an int,
    several as a list, as a Llama-3 config.json holds them."""
    out: dict[str, int | list[int]] = {}
    for gguf_key, hf_key in (("bos", "bos_token_id"), ("padding", "pad_token_id")):
        value = gf.metadata.get(f"tokenizer.ggml.{gguf_key}_token_id")
        if isinstance(value, int):
            out[hf_key] = value
    eos = gguf_eos_token_ids(gf.metadata)
    if eos:
        out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return out


def _vocab_size(gf: GGUFFile) -> int:
    if "token_embd.weight" not in gf.tensors:
        raise CheckpointError(f"{gf.path} has no token_embd.weight tensor; it is not a complete model")
    return gf.tensors["token_embd.weight"].shape[0]


def _rename_all(
    gf: GGUFFile, rename: Callable[[str], str | None], transform: Callable[[str, torch.Tensor], torch.Tensor]
) -> StateDict:
    """Decode every tensor, map its name (``None`` = drop) and transform it; unknown names are errors."""
    names = {name: rename(name) for name in gf.tensor_names}
    sd: StateDict = {}
    for name, tensor in gf.load_tensors([n for n, hf in names.items() if hf is not None]).items():
        sd[names[name] or name] = transform(name, tensor)
    return sd


_LLAMA_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LLAMA_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _hf_name(
    name: str, table: dict[str, str], layer_prefix: str, globals_: dict[str, str], path: Path
) -> str:
    stem, _, suffix = name.rpartition(".")
    if suffix not in ("weight", "bias"):
        raise CheckpointError(f"{path}: unexpected tensor {name!r} (neither a weight nor a bias)")
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in table:
        return f"{layer_prefix}.{parts[1]}.{table[parts[2]]}.{suffix}"
    if stem in globals_:
        return f"{globals_[stem]}.{suffix}"
    raise CheckpointError(f"{path}: lamina does not know where GGUF tensor {name!r} goes in the HF model")


def _llama_to_hf(gf: GGUFFile) -> tuple[dict[str, Any], StateDict]:
    arch = "llama"
    n_heads = _meta(gf, f"{arch}.attention.head_count", kind=int)
    n_kv_heads = _meta(gf, f"{arch}.attention.head_count_kv", n_heads, kind=(int, list))
    if isinstance(n_kv_heads, list):  # per-layer list in some files; Llama needs one value
        if len(set(n_kv_heads)) != 1:
            raise CheckpointError(
                f"{gf.path} has per-layer head_count_kv {n_kv_heads}; Llama needs one value"
            )
        n_kv_heads = n_kv_heads[0]
    hidden = _meta(gf, f"{arch}.embedding_length", kind=int)
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": _vocab_size(gf),
        "hidden_size": hidden,
        "intermediate_size": _meta(gf, f"{arch}.feed_forward_length", kind=int),
        "num_hidden_layers": _meta(gf, f"{arch}.block_count", kind=int),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": _meta(gf, f"{arch}.attention.key_length", hidden // n_heads, kind=int),
        "max_position_embeddings": _meta(gf, f"{arch}.context_length", 2048, kind=int),
        "rms_norm_eps": float(_meta(gf, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5, kind=(int, float))),
        "rope_theta": float(_meta(gf, f"{arch}.rope.freq_base", 10000.0, kind=(int, float))),
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in gf.tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in gf.tensors,
        "tie_word_embeddings": "output.weight" not in gf.tensors,
        **_token_ids(gf),
    }
    rope_type = gf.metadata.get(f"{arch}.rope.scaling.type")
    if rope_type not in (None, "none"):
        scaling: dict[str, Any] = {
            "rope_type": rope_type,
            "factor": float(gf.metadata.get(f"{arch}.rope.scaling.factor", 1.0)),
        }
        orig = gf.metadata.get(f"{arch}.rope.scaling.original_context_length")
        if orig is not None:
            scaling["original_max_position_embeddings"] = int(orig)
        config["rope_scaling"] = scaling
    if "rope_freqs.weight" in gf.tensors:
        warnings.warn(
            f"{gf.path} carries llama3-style RoPE frequency factors (rope_freqs.weight), which have no "
            "exact config.json equivalent; they are ignored, as transformers does. Add rope_scaling "
            '{"rope_type": "llama3", ...} from the original model\'s config.json for long contexts',
            stacklevel=3,
        )

    def rename(name: str) -> str | None:
        if name == "rope_freqs.weight":
            return None
        return _hf_name(name, _LLAMA_LAYER_NAMES, "model.layers", _LLAMA_GLOBAL_NAMES, gf.path)

    def transform(name: str, t: torch.Tensor) -> torch.Tensor:
        if ".attn_q." in name:
            return _reverse_qk_permute(t, n_heads)
        if ".attn_k." in name:
            return _reverse_qk_permute(t, n_kv_heads)
        return t

    return config, _rename_all(gf, rename, transform)


_GPT2_LAYER_NAMES = {
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
_GPT2_GLOBAL_NAMES = {
    "token_embd": "transformer.wte",
    "position_embd": "transformer.wpe",
    "output_norm": "transformer.ln_f",
    "output": "lm_head",
}


def _gpt2_to_hf(gf: GGUFFile) -> tuple[dict[str, Any], StateDict]:
    arch = "gpt2"
    hidden = _meta(gf, f"{arch}.embedding_length", kind=int)
    n_ctx = _meta(gf, f"{arch}.context_length", kind=int)
    config: dict[str, Any] = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": _vocab_size(gf),
        "n_positions": n_ctx,
        "n_ctx": n_ctx,
        "n_embd": hidden,
        "n_layer": _meta(gf, f"{arch}.block_count", kind=int),
        "n_head": _meta(gf, f"{arch}.attention.head_count", kind=int),
        "n_inner": _meta(gf, f"{arch}.feed_forward_length", 4 * hidden, kind=int),
        "layer_norm_epsilon": float(
            _meta(gf, f"{arch}.attention.layer_norm_epsilon", 1e-5, kind=(int, float))
        ),
        "activation_function": "gelu_new",
        "tie_word_embeddings": "output.weight" not in gf.tensors,
        **_token_ids(gf),
    }

    def rename(name: str) -> str:
        return _hf_name(name, _GPT2_LAYER_NAMES, "transformer.h", _GPT2_GLOBAL_NAMES, gf.path)

    def transform(name: str, t: torch.Tensor) -> torch.Tensor:
        # HF GPT-2 uses Conv1D, which stores Linear weights transposed: (in, out)
        if name.startswith("blk.") and name.endswith(".weight") and t.ndim == 2:
            return torch.from_numpy(np.ascontiguousarray(t.numpy().T))
        return t

    return config, _rename_all(gf, rename, transform)


GGUF_ARCHITECTURES: dict[str, Callable[[GGUFFile], tuple[dict[str, Any], StateDict]]] = {
    "llama": _llama_to_hf,
    "gpt2": _gpt2_to_hf,
}


def gguf_to_hf(gf: GGUFFile) -> tuple[dict[str, Any], StateDict]:
    """A Hugging Face ``config.json`` dict and state dict (HF names, float32) for a GGUF model.

    Supports ``general.architecture`` in ``GGUF_ARCHITECTURES`` ("llama" -> LlamaForCausalLM, "gpt2" ->
    GPT2LMHeadModel). Llama q/k weights are un-permuted back to HF's RoPE layout; ``lm_head.weight`` is
    present only when the file has an untied ``output.weight``.

    Raises:
        CheckpointError: the architecture is missing or unsupported, a required metadata key is missing,
            or the file has a tensor lamina cannot place.
    """
    arch = gf.architecture
    if arch not in GGUF_ARCHITECTURES:
        raise CheckpointError(
            f"{gf.path} has general.architecture={arch!r}, which lamina cannot map to Hugging Face; "
            f"supported: {', '.join(GGUF_ARCHITECTURES)}"
        )
    return GGUF_ARCHITECTURES[arch](gf)
