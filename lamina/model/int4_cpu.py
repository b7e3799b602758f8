"""A faster int4 matrix-vector kernel for decoding on AVX-512 BF16 CPUs (opt-in, built on first use).

``torch.ops.aten._weight_int4pack_mm_for_cpu`` dequantizes every weight to fp32 (a table lookup and one
FMA per weight) before the multiply-add: at one row it is compute-bound (~10 GB/s of int4 per core on this
project's AMD EPYC, well under the memory's bandwidth). This kernel computes the same product from the
same 4-bit codes, bf16 scales and offsets, in the form ``y = sum_g scale_g * (q_g . x_g) + (offset_g -
8 scale_g) * sum(x_g)`` per group g of 32 inputs: the codes become bf16 integers 0..15 with one
byte-table lookup (``vpermw``) and ``vdpbf16ps`` sums their products with the bf16 activations in fp32
(exact products: the numerics of the bf16 activations, no activation quantization), the scale is applied
once per group: outputs equal the aten kernel's up to one bf16 rounding (~0.02% of them differ). Speed
(one row, 1 thread, SmolLM2-135M's 120 linears with their weights streamed from memory, the decoding
case): 1.52x the aten kernel (4.6 vs 7.0 ms); the compiled int4 decode step 1.45x tokens/s (with the
weights in cache a single layer is 2.1-2.3x; benchmarks/RESULTS.md). Several rows (a short prompt, a
decode batch) are computed 4 at a time, each weight turned into bf16 once for the 4: 32 rows 1.9x the
one-row-at-a-time loop (79 -> 41 ms for the 120 linears, 1 thread), each row's outputs bit for bit those
of that row alone. Halves of the blocks of 64 outputs (32 outputs: one 64-byte line of each step) are
split between threads by ``at::parallel_for`` (built with OpenMP), so that 576 outputs split 9 + 9.

Layout (``pack``): for each block of 64 outputs (4 sub-blocks of 16) and group of 32 inputs, 8 steps of
4 x 32 bytes (the 4 sub-blocks interleaved: the kernel reads one sequential stream); byte ``2 * lane + p``
of sub-block i's 32 bytes at step ``s`` holds the code of output ``16 i + lane``, input ``4 s + p`` in its
low nibble and input ``4 s + 2 + p`` in its high nibble; scales and offsets (N / 64, groups, 4, 2, 16) bf16.

The same library holds the compiled decode step's attention (``attn``, ``torch.ops.lamina_int4.lamina_int4_attn``,
used by ``lamina.model.aot.DecodeStep`` where this kernel is: the step's attention at one query row):
softmax(q k^T) v per row and KV head (GQA: a KV head's query heads as its rows) over the valid slots of
the cache, read in place (strided views), in fp32 (bf16 keys and values widened; output rounded once to
their dtype): SDPA's result within fp32 rounding. aten's flash attention (tiled for many queries) costs
~23 us a call at one query row and 40 keys (SmolLM2's 9 heads, bf16, 1 thread) against ~8 us (~2.5 us
without the dispatcher, as the package calls it); the compiled int4 step 1.04-1.09x tokens/s (1 thread,
under load, one process A/B). AVX-512 F code (16 keys' dot products at a time, a vectorized exp),
plain C++ loops where the compiler lacks it.

The C++ source below is compiled once (``_CFLAGS``: ``-march=native``, OpenMP) into a folder of ``build_dir`` named by the
digest of the source, the flags, torch's version and the CPU (``default_build_dir()`` unless given;
``torch.utils.cpp_extension``: a C++ compiler and ninja are needed), registered as
``torch.ops.lamina_int4.lamina_int4_mv`` (with a shape function for ``torch.export``), with a C shim
that an AOTInductor package calls directly (``aoti_configs``: no boxed call through the dispatcher, which
costs more than the kernel saves at these sizes). ``load(build_dir)`` returns None, with the reason, where it cannot run: no
AVX-512 BF16, not x86-64 Linux, no compiler or ninja, a failed build.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

# -fopenmp: at::parallel_for in ATen's headers splits the work only under OpenMP (without it, one thread);
# the library links torch's own libgomp.so.1 (already loaded, the same soname), not a second runtime
_CFLAGS = ["-O3", "-march=native", "-fopenmp"]

_SRC = r"""
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <immintrin.h>
#include <cmath>
#include <cstring>
#include <algorithm>
#include <vector>

static inline __m512 bf16x16(const uint16_t* p) {
  __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

// NSUB sub-blocks of 16 outputs (sub0.. of a block of 64, whose 4 sub-blocks are interleaved: one stream)
// for R rows of x (each K bf16, per-group sums xsum) at once: each weight is turned into bf16 once for the
// R rows; y gets 16 NSUB bf16 per row (row r at y + r * N). The same operations per row in the same order
// for any R: a row's outputs do not depend on the rows computed with it.
template <int NSUB, int R>
static inline void tile(const uint8_t* P, const uint16_t* S, int sub0, int64_t G, const uint16_t* x,
                        int64_t K, const float* xsum, uint16_t* y, int64_t N) {
  alignas(64) static const uint16_t lut_[32] = {  // bf16 of 0..15, twice (vpermw reads 5 bits)
    0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
    0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170,
    0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
    0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};
  const __m512i lut = _mm512_load_si512((const void*)lut_);
  __m512 acc[R][NSUB];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < NSUB; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    int32_t xg[R][16];  // the group's 32 bf16 as 16 pairs (memcpy: no aliasing through an int32_t*)
    for (int r = 0; r < R; ++r) memcpy(xg[r], x + r * K + g * 32, sizeof(xg[r]));
    __m512 dot[R][NSUB];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < NSUB; ++i) dot[r][i] = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int s = 0; s < 8; ++s) {
      const uint8_t* ps = P + ((g * 8 + s) * 4 + sub0) * 32;
      for (int i = 0; i < NSUB; ++i) {
        __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(ps + i * 32)));
        __m512i lo = _mm512_permutexvar_epi16(w, lut);
        __m512i hi = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), lut);
        for (int r = 0; r < R; ++r) {
          dot[r][i] = _mm512_dpbf16_ps(dot[r][i], (__m512bh)lo, (__m512bh)_mm512_set1_epi32(xg[r][2 * s]));
          dot[r][i] = _mm512_dpbf16_ps(dot[r][i], (__m512bh)hi, (__m512bh)_mm512_set1_epi32(xg[r][2 * s + 1]));
        }
      }
    }
    for (int i = 0; i < NSUB; ++i) {
      const uint16_t* so = S + (g * 4 + sub0 + i) * 32;
      __m512 sc = bf16x16(so), shift = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), sc, bf16x16(so + 16));
      for (int r = 0; r < R; ++r) {
        acc[r][i] = _mm512_fmadd_ps(dot[r][i], sc, acc[r][i]);
        acc[r][i] = _mm512_fmadd_ps(shift, _mm512_set1_ps(xsum[r * G + g]), acc[r][i]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < NSUB; ++i)
      _mm256_storeu_si256((__m256i*)(y + r * N + (sub0 + i) * 16), (__m256i)_mm512_cvtneps_pbh(acc[r][i]));
}

template <int NSUB>
static inline void rows(const uint8_t* P, const uint16_t* S, int sub0, int64_t G, const uint16_t* X,
                        int64_t K, const float* XS, uint16_t* Y, int64_t N, int64_t M) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile<NSUB, 4>(P, S, sub0, G, X + m * K, K, XS + m * G, Y + m * N, N);
  switch (M - m) {
    case 3: tile<NSUB, 3>(P, S, sub0, G, X + m * K, K, XS + m * G, Y + m * N, N); break;
    case 2: tile<NSUB, 2>(P, S, sub0, G, X + m * K, K, XS + m * G, Y + m * N, N); break;
    case 1: tile<NSUB, 1>(P, S, sub0, G, X + m * K, K, XS + m * G, Y + m * N, N); break;
  }
}

// x (M, K) bf16 contiguous; packed (N / 64, K / 32, 8, 4, 32) uint8; so (N / 64, K / 32, 4, 2, 16) bf16
static at::Tensor mv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& so) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous(), "x: (M, K) bf16");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 5, "packed");
  TORCH_CHECK(so.scalar_type() == at::kBFloat16 && so.is_contiguous() && so.dim() == 5, "so");
  int64_t M = x.size(0), K = x.size(1), G = K / 32, NB = packed.size(0), N = NB * 64;
  TORCH_CHECK(K % 32 == 0 && packed.size(1) == G, "K must be the packed weight's inputs");
  TORCH_CHECK(packed.size(2) == 8 && packed.size(3) == 4 && packed.size(4) == 32,
              "packed: (N / 64, K / 32, 8, 4, 32)");
  TORCH_CHECK(so.size(0) == NB && so.size(1) == G && so.size(2) == 4 && so.size(3) == 2 && so.size(4) == 16,
              "so: (N / 64, K / 32, 4, 2, 16), as packed");
  const uint16_t* X = (const uint16_t*)x.data_ptr();
  std::vector<float> xsum(M * G);  // each group's sum of x, for the offsets
  float* XS = xsum.data();
  for (int64_t r = 0; r < M * G; ++r)
    XS[r] = _mm512_reduce_add_ps(_mm512_add_ps(bf16x16(X + r * 32), bf16x16(X + r * 32 + 16)));
  auto y = at::empty({M, N}, x.options());
  const uint8_t* P = packed.data_ptr<uint8_t>();
  const uint16_t* S = (const uint16_t*)so.data_ptr();
  uint16_t* Y = (uint16_t*)y.data_ptr();
  // split into halves of blocks (32 outputs: one 64-byte line of each step's 128 bytes), so that a
  // thread's share is even (SmolLM2's 576 outputs: 9 blocks, 18 halves)
  at::parallel_for(0, 2 * NB, 2, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1;) {
      int64_t b = u / 2;
      const uint8_t* Pb = P + b * G * 1024;
      const uint16_t* Sb = S + b * G * 128;
      if (u % 2 == 0 && u + 2 <= u1) {
        rows<4>(Pb, Sb, 0, G, X, K, XS, Y + b * 64, N, M);
        u += 2;
      } else {
        rows<2>(Pb, Sb, 2 * (u % 2), G, X, K, XS, Y + b * 64, N, M);
        u += 1;
      }
    }
  });
  return y;
}

// -- single-query attention (the compiled decode step's) --
static inline float ld(const float* p) { return *p; }
static inline float ld(const uint16_t* p) { uint32_t u = uint32_t(*p) << 16; float f; memcpy(&f, &u, 4); return f; }
#ifdef __AVX512F__
static inline __m512 ld16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 ld16(const uint16_t* p) { return bf16x16(p); }

// lane i of the result: the sum of v[i]'s 16 lanes (a transposing tree: pairs, quads, 128-bit lanes)
static inline __m512 sum16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3]
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the lane's sums of v[4i .. 4i + 3]
    __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}
#endif
static inline void st(float* p, float x) { *p = x; }
static inline void st(uint16_t* p, float x) { at::BFloat16 b(x); memcpy(p, &b, 2); }  // round to nearest even

#ifdef __AVX512F__
// NR query rows' probabilities p (row stride S) times 64 columns of the values (row stride vs), over the
// valid keys, times inv: out (row stride D)
template <typename T, int NR>
static inline void pv(const float* p, int64_t S, const T* v, int64_t vs, const bool* valid, int64_t ms,
                      const float* inv, T* out, int64_t D) {
  __m512 acc[NR][4];
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < S; ++j) {
    if (!valid[j * ms]) continue;
    const T* vj = v + j * vs;
    __m512 x[4] = {ld16(vj), ld16(vj + 16), ld16(vj + 32), ld16(vj + 48)};
    for (int r = 0; r < NR; ++r) {
      __m512 pr = _mm512_set1_ps(p[r * S + j]);
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_fmadd_ps(pr, x[c], acc[r][c]);
    }
  }
  for (int r = 0; r < NR; ++r) {
    alignas(64) float tmp[64];
    __m512 s = _mm512_set1_ps(inv[r]);
    for (int c = 0; c < 4; ++c) _mm512_store_ps(tmp + 16 * c, _mm512_mul_ps(acc[r][c], s));
    for (int i = 0; i < 64; ++i) st(out + r * D + i, tmp[i]);
  }
}
#endif

// one (row, KV head): R query rows q (R, D) fp32 already scaled, S keys and values of D (row stride ks, vs),
// valid (S) with stride ms; out (R, D) contiguous. sc: R * S floats of scratch, inv: R.
template <typename T>
static void attend_head(const float* q, int64_t R, int64_t D, const T* k, int64_t ks, const T* v, int64_t vs,
                        const bool* valid, int64_t ms, int64_t S, T* out, float* sc, float* inv) {
  for (int64_t r = 0; r < R; ++r) {
    float* sr = sc + r * S;
    const float* qr = q + r * D;
    float mx = -INFINITY;
    int64_t j = 0;
#ifdef __AVX512F__
    // 16 keys at a time: 16 dot products' lanes summed by one transposing tree (not 16 reductions)
    for (; D % 16 == 0 && j + 16 <= S; j += 16) {
      __m512 acc[16];
      for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 16) {
        __m512 qd = _mm512_loadu_ps(qr + d);
        for (int t = 0; t < 16; ++t) acc[t] = _mm512_fmadd_ps(qd, ld16(k + (j + t) * ks + d), acc[t]);
      }
      __m512 sums = sum16(acc);
      alignas(64) float tmp[16];
      _mm512_store_ps(tmp, sums);
      for (int t = 0; t < 16; ++t) {
        float x = valid[(j + t) * ms] ? tmp[t] : -INFINITY;
        sr[j + t] = x;
        mx = x > mx ? x : mx;
      }
    }
#endif
    for (; j < S; ++j) {
      if (!valid[j * ms]) { sr[j] = -INFINITY; continue; }
      const T* kj = k + j * ks;
      float s = 0.f;
      int64_t d = 0;
#ifdef __AVX512F__
      __m512 acc = _mm512_setzero_ps();
      for (; d + 16 <= D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qr + d), ld16(kj + d), acc);
      s = _mm512_reduce_add_ps(acc);
#endif
      for (; d < D; ++d) s += qr[d] * ld(kj + d);
      sr[j] = s;
      mx = s > mx ? s : mx;
    }
    float sum = 0.f;
    j = 0;
#ifdef __AVX512F__
    // exp(x - mx) 16 at a time: n = round(x log2 e), r = x - n ln 2 (Cody-Waite), e^r by its Taylor
    // series to degree 7 (|r| <= ln 2 / 2: error < 1e-8 relative), times 2^n (vscalefps); masked: 0
    __m512 vmx = _mm512_set1_ps(mx), vsum = _mm512_setzero_ps();
    for (; j < S; j += 16) {
      __mmask16 in = S - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (S - j)) - 1);
      __m512 x = _mm512_maskz_loadu_ps(in, sr + j);
      __mmask16 live = _mm512_mask_cmp_ps_mask(in, x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
      x = _mm512_max_ps(_mm512_sub_ps(x, vmx), _mm512_set1_ps(-104.f));
      __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
      r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
      __m512 e = _mm512_set1_ps(1.f / 5040.f);
      e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f / 720.f));
      e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f / 120.f));
      e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f / 24.f));
      e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f / 6.f));
      e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(0.5f));
      e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f));
      e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f));
      e = _mm512_maskz_mov_ps(live, _mm512_scalef_ps(e, n));
      _mm512_mask_storeu_ps(sr + j, in, e);
      vsum = _mm512_add_ps(vsum, e);
    }
    sum = _mm512_reduce_add_ps(vsum);
#endif
    for (; j < S; ++j) {
      float e = sr[j] == -INFINITY ? 0.f : std::exp(sr[j] - mx);
      sr[j] = e;
      sum += e;
    }
    inv[r] = sum > 0.f ? 1.f / sum : 0.f;  // no valid key: zeros
  }
  // out = p v / sum: each value converted once for up to 4 query rows
  int64_t d = 0;
#ifdef __AVX512F__
  for (; d + 64 <= D; d += 64)
    for (int64_t r0 = 0; r0 < R; r0 += 4) switch (std::min<int64_t>(4, R - r0)) {
      case 4: pv<T, 4>(sc + r0 * S, S, v + d, vs, valid, ms, inv + r0, out + r0 * D + d, D); break;
      case 3: pv<T, 3>(sc + r0 * S, S, v + d, vs, valid, ms, inv + r0, out + r0 * D + d, D); break;
      case 2: pv<T, 2>(sc + r0 * S, S, v + d, vs, valid, ms, inv + r0, out + r0 * D + d, D); break;
      case 1: pv<T, 1>(sc + r0 * S, S, v + d, vs, valid, ms, inv + r0, out + r0 * D + d, D); break;
    }
#endif
  for (; d < D; ++d)
    for (int64_t r = 0; r < R; ++r) {
      float a = 0.f;
      for (int64_t j = 0; j < S; ++j) a += sc[r * S + j] * ld(v + j * vs + d);
      st(out + r * D + d, a * inv[r]);
    }
}

// q (B, H, R, D) fp32, the query rows of KV head h already multiplied by the scale; k, v (B, H, S, D)
// fp32 or bf16 (any strides, the last 1); valid (B, S) bool -> (B, H, R, D) in v's dtype:
// softmax(q k^T masked) v per (b, h), fp32 accumulation
static at::Tensor attn(const at::Tensor& q_, const at::Tensor& k, const at::Tensor& v, const at::Tensor& valid) {
  TORCH_CHECK(q_.scalar_type() == at::kFloat && q_.dim() == 4, "q: (B, H, R, D) fp32");
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.scalar_type() == v.scalar_type() &&
              (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16), "k, v: (B, H, S, D) fp32 or bf16");
  TORCH_CHECK(valid.scalar_type() == at::kBool && valid.dim() == 2, "valid: (B, S) bool");
  int64_t B = q_.size(0), H = q_.size(1), R = q_.size(2), D = q_.size(3), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D && v.sizes() == k.sizes() &&
              valid.size(0) == B && valid.size(1) == S, "q, k, v, valid: shapes disagree");
  at::Tensor q = q_.contiguous();
  at::Tensor kk = k.stride(3) == 1 ? k : k.contiguous(), vv = v.stride(3) == 1 ? v : v.contiguous();
  auto out = at::empty({B, H, R, D}, v.options().memory_format(at::MemoryFormat::Contiguous));
  const bool* M = valid.data_ptr<bool>();
  int64_t ms0 = valid.stride(0), ms1 = valid.stride(1);
  int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, S * D * R));
  at::parallel_for(0, B * H, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> sc(R * S), inv(R);
    for (int64_t i = i0; i < i1; ++i) {
      int64_t b = i / H, h = i % H;
      const float* qp = q.data_ptr<float>() + i * R * D;
      if (kk.scalar_type() == at::kFloat)
        attend_head<float>(qp, R, D, kk.data_ptr<float>() + b * kk.stride(0) + h * kk.stride(1), kk.stride(2),
                           vv.data_ptr<float>() + b * vv.stride(0) + h * vv.stride(1), vv.stride(2),
                           M + b * ms0, ms1, S, out.data_ptr<float>() + i * R * D, sc.data(), inv.data());
      else
        attend_head<uint16_t>(qp, R, D,
                              (const uint16_t*)kk.data_ptr() + b * kk.stride(0) + h * kk.stride(1), kk.stride(2),
                              (const uint16_t*)vv.data_ptr() + b * vv.stride(0) + h * vv.stride(1), vv.stride(2),
                              M + b * ms0, ms1, S, (uint16_t*)out.data_ptr() + i * R * D, sc.data(), inv.data());
    }
  });
  return out;
}

TORCH_LIBRARY(lamina_int4, m) {
  m.def("lamina_int4_mv(Tensor x, Tensor packed, Tensor so) -> Tensor");
  m.def("lamina_int4_attn(Tensor q, Tensor k, Tensor v, Tensor valid) -> Tensor");
}
TORCH_LIBRARY_IMPL(lamina_int4, CPU, m) {
  m.impl("lamina_int4_mv", &mv);
  m.impl("lamina_int4_attn", &attn);
}

// the C shim AOTInductor calls directly (aot_inductor.custom_ops_to_c_shims), not through the dispatcher
extern "C" AOTITorchError aoti_torch_cpu_lamina_int4_mv(AtenTensorHandle x, AtenTensorHandle packed,
                                                        AtenTensorHandle so, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    using torch::aot_inductor::tensor_handle_to_tensor_pointer;
    *ret0 = torch::aot_inductor::new_tensor_handle(mv(*tensor_handle_to_tensor_pointer(x),
        *tensor_handle_to_tensor_pointer(packed), *tensor_handle_to_tensor_pointer(so)));
  });
}

extern "C" AOTITorchError aoti_torch_cpu_lamina_int4_attn(AtenTensorHandle q, AtenTensorHandle k,
    AtenTensorHandle v, AtenTensorHandle valid, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    using torch::aot_inductor::tensor_handle_to_tensor_pointer;
    *ret0 = torch::aot_inductor::new_tensor_handle(attn(*tensor_handle_to_tensor_pointer(q),
        *tensor_handle_to_tensor_pointer(k), *tensor_handle_to_tensor_pointer(v),
        *tensor_handle_to_tensor_pointer(valid)));
  });
}
"""

_LOADED: dict[str, str | None] = {}  # build folder -> None (loaded) or why it failed, once per process


def unavailable_reason() -> str | None:
    """Why this kernel cannot run on this machine (None: it can, given a C++ compiler and ninja)."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return f"{platform.system()} {platform.machine()} (x86-64 Linux only)"
    if not torch.cpu._is_avx512_bf16_supported():  # torch's own detection (cpuinfo)
        return "the CPU lacks AVX-512 BF16"
    return None


def default_build_dir() -> Path:
    """Where the kernel is built unless told: ``int4/`` in ``compile_cache_dir()`` (``--compile``'s)."""
    from lamina.checkpoint.load import compile_cache_dir

    return compile_cache_dir() / "int4"


def load(build_dir: Path | None = None, log: Callable[[str], None] | None = None) -> str | None:
    """Build (once per source, torch version and CPU, into ``build_dir/int4-mv-DIGEST``; ``build_dir``
    defaults to ``default_build_dir()``) and load the kernel, registering
    ``torch.ops.lamina_int4.lamina_int4_mv`` and its C shim (the library loaded with its symbols global,
    so a compiled package finds them). The build runs in a temporary ``.partial-*`` folder renamed into
    place when done, so a process killed mid-build leaves no lock behind (such folders over a day old
    are removed). Returns None when it is loaded, else why not (one phrase: no AVX-512 BF16, no compiler
    or ninja, a build error's first line). ``log`` gets one line before a build starts."""
    why = unavailable_reason()
    if why is not None:
        return why
    from lamina.model import aot  # aot imports this module

    build_dir = default_build_dir() if build_dir is None else Path(build_dir)
    # -march=native: a folder shared between machines (an NFS home) must not give one CPU another's build
    digest = hashlib.sha256(
        (_SRC + " ".join(_CFLAGS) + torch.__version__ + aot._cpu_digest()).encode()
    ).hexdigest()[:16]
    folder = build_dir / f"int4-mv-{digest}"
    if str(folder) in _LOADED:
        return _LOADED[str(folder)]
    if op_loaded():  # loaded from another folder in this process
        _LOADED[str(folder)] = None
        return None
    so = folder / f"lamina_int4_{digest}.so"
    failed = build_dir / f"int4-mv-{digest}.failed"  # a build that failed here: not tried at every start
    try:
        with _one_builder(build_dir):  # a second process waits for the first's build, then loads it
            if so.is_file():
                torch.ops.load_library(str(so))
                ctypes.CDLL(str(so), mode=ctypes.RTLD_GLOBAL)  # the shim, for packages
            elif (missing := _missing_build_tools()) is not None:
                _LOADED[str(folder)] = missing
                return missing
            elif failed.is_file():
                _LOADED[str(folder)] = f"{failed.read_text().strip()} (delete {failed} to build it again)"
                return _LOADED[str(folder)]
            else:
                if log is not None:
                    log(f"building lamina's int4 kernel (once per machine, ~10 s) into {folder}")
                try:
                    _build(build_dir, folder, so.stem)
                except Exception as e:
                    first = (str(e).strip().splitlines() or [""])[0][:200]
                    why = f"the int4 kernel did not build ({type(e).__name__}: {first})"
                    with contextlib.suppress(OSError):
                        failed.write_text(why + "\n")
                    if log is not None:
                        log(f"{why}; aten's int4 kernel instead")
                    raise
        _register_fake()
        _LOADED[str(folder)] = None
    except Exception as e:  # a failed build or load: the aten kernel stays
        first = (str(e).strip().splitlines() or [""])[0][:200]
        _LOADED[str(folder)] = f"the int4 kernel did not build ({type(e).__name__}: {first})"
    return _LOADED[str(folder)]


def _missing_build_tools() -> str | None:
    """Why the kernel cannot be built here (no ninja, no C++ compiler), checked before a build is
    announced; None: both are there."""
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja is not installed (pip install 'lamina[kernels]')"
    if not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")):
        return "no C++ compiler (c++ or g++, or $CXX)"
    return None


@contextlib.contextmanager
def _one_builder(build_dir: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``build_dir/.build-lock`` (released by the kernel when the process
    dies, so a killed build never blocks a later one): processes starting together (test workers, a
    server's forks) build the kernel once instead of each compiling it (~10 s of CPU). No lock where
    ``fcntl`` is missing."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / ".build-lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(build_dir: Path, folder: Path, name: str) -> None:
    """Compile ``_SRC`` into ``folder/name.so`` and load it: built (and loaded from) a fresh ``.partial-*``
    folder with its own ninja lock (a killed build's lock blocks no later one), renamed to ``folder`` at
    once; when another process got there first, its folder is kept (the same source: the same build)."""
    from torch.utils.cpp_extension import load

    from lamina.model import aot

    build_dir.mkdir(parents=True, exist_ok=True)
    aot._remove_partial(build_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=build_dir))
    try:
        src = tmp / f"{name}.cpp"  # a file, not load_inline (which adds torch/extension.h: 25 s vs 7 s)
        src.write_text(_SRC)
        load(
            name, sources=[str(src)], extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"],
            build_directory=str(tmp), is_python_module=False,
        )  # fmt: skip
        ctypes.CDLL(str(tmp / f"{name}.so"), mode=ctypes.RTLD_GLOBAL)  # the shim, for packages
        try:
            os.replace(tmp, folder)  # the .so appears whole (the loaded library is the same file)
        except OSError:
            if not (folder / f"{name}.so").is_file():  # not another process's build: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def op_loaded() -> bool:
    """Whether ``torch.ops.lamina_int4.lamina_int4_mv`` is registered in this process (``load`` ran)."""
    return hasattr(torch.ops.lamina_int4, "lamina_int4_mv")


def _register_fake() -> None:
    """The op's output shape for ``torch.export`` (fake tensors): (M, N) in x's dtype."""

    @torch.library.register_fake("lamina_int4::lamina_int4_mv")
    def _(x: Tensor, packed: Tensor, so: Tensor) -> Tensor:
        return x.new_empty((x.shape[0], packed.shape[0] * 64))

    @torch.library.register_fake("lamina_int4::lamina_int4_attn")
    def _attn(q: Tensor, k: Tensor, v: Tensor, valid: Tensor) -> Tensor:
        return q.new_empty(q.shape, dtype=v.dtype)


def pack(q: Tensor, scale: Tensor, offset: Tensor) -> tuple[Tensor, Tensor]:
    """The kernel's layout of int4 codes ``q`` (N, K) in 0..15 (N a multiple of 64, K of 32) and their
    group scales and offsets (N, K / 32) bf16 (``weight = (q - 8) * scale + offset``): ``packed``
    (N / 64, K / 32, 8, 4, 32) uint8 and ``so`` (N / 64, K / 32, 4, 2, 16) bf16 (module docstring)."""
    N, K = q.shape
    G = K // 32
    c = q.to(torch.uint8).view(N // 64, 4, 16, G, 8, 2, 2)  # block, sub, lane, group, step, high, p
    c = c.permute(0, 3, 4, 1, 2, 6, 5)  # block, group, step, sub, lane, p, high nibble
    packed = (c[..., 0] | (c[..., 1] << 4)).contiguous().view(N // 64, G, 8, 4, 32)
    so = torch.stack(
        [scale.view(N // 64, 4, 16, G), offset.view(N // 64, 4, 16, G)], 2
    )  # block, sub, 2, lane, g
    return packed, so.permute(0, 4, 1, 2, 3).contiguous().to(torch.bfloat16)


def mv(x: Tensor, packed: Tensor, so: Tensor) -> Tensor:
    """(M, K) bf16 -> (M, N) bf16 through the loaded kernel (``load`` first)."""
    return torch.ops.lamina_int4.lamina_int4_mv(x, packed, so)


def attn_loaded() -> bool:
    """Whether ``torch.ops.lamina_int4.lamina_int4_attn`` is registered in this process (``load`` ran)."""
    return hasattr(torch.ops.lamina_int4, "lamina_int4_attn")


def attn(q: Tensor, k: Tensor, v: Tensor, valid: Tensor) -> Tensor:
    """Attention of a few query rows per KV head through the loaded kernel (``load`` first): q (B, H, R, D)
    fp32 already multiplied by the scale (R: the query heads sharing KV head h, one token each), k and v
    (B, H, S, D) fp32 or bf16 (views of a cache: any strides, the last 1), valid (B, S) bool (True: attend)
    -> (B, H, R, D) in v's dtype: ``softmax(q k^T) v`` over the valid keys with fp32 accumulation, what
    ``F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None], scale=1)`` computes (zeros
    for a row without a valid key). The decode step's (``lamina.model.aot``), where aten's flash attention
    costs ~20 us a call at one query (Dao et al. 2022's tiling pays off only from many queries)."""
    return torch.ops.lamina_int4.lamina_int4_attn(q, k, v, valid)


_SHIM = (
    "AOTITorchError aoti_torch_cpu_lamina_int4_mv(AtenTensorHandle x, AtenTensorHandle packed, "
    "AtenTensorHandle so, AtenTensorHandle* ret0)"
)
_ATTN_SHIM = (
    "AOTITorchError aoti_torch_cpu_lamina_int4_attn(AtenTensorHandle q, AtenTensorHandle k, "
    "AtenTensorHandle v, AtenTensorHandle valid, AtenTensorHandle* ret0)"
)


def uses_kernel(module: torch.nn.Module) -> bool:
    """Whether one of ``module``'s layers runs this kernel (a ``mv_packed`` buffer set and the op loaded):
    then a compiled decode step also attends through ``attn``."""
    return op_loaded() and any(getattr(m, "mv_packed", None) is not None for m in module.modules())


def aoti_configs(module: torch.nn.Module) -> dict[str, object]:
    """The AOTInductor settings for compiling ``module``: when one of its layers runs this kernel (a
    ``mv_packed`` buffer set and the op loaded), the op's C shim, so the package calls the kernel
    directly; else none."""
    if not uses_kernel(module):
        return {}
    shims = {torch.ops.lamina_int4.lamina_int4_mv.default: [_SHIM]}
    if attn_loaded():
        shims[torch.ops.lamina_int4.lamina_int4_attn.default] = [_ATTN_SHIM]
    return {"aot_inductor.custom_ops_to_c_shims": shims}
