// Input-sparse GEMV / small-batch GEMM for CPU (activation sparsity, TEAL-style):
//
//   y[m, n] = bias[n] + sum_i xm[m, i] * wt[i, n],   xm[m, i] = x[m, i] if |x[m, i]| >= t else 0
//
// x fp32 [M, K], wt [K, N] (the weight TRANSPOSED: row i = input channel i) in fp16 / bf16 /
// fp32, bias fp32 [N] or none, y fp32 [M, N]. All math is fp32 FMA (16-bit weights are widened
// in registers).
//
// Why this layout: with wt [K, N] an input channel that is inactive for every token is one
// whole row of wt that is never read, and an active one is one contiguous stream. At density d
// the kernel reads d of the weight bytes, so batch-1 decode (bound by weight bytes from DRAM)
// gets up to 1/d faster.
//
// Steps:
//  1. Compaction, one pass over x (serial, AVX-512 compress or scalar): the active list
//     idx[0..nact) = channels with |x[m, i]| >= t for SOME token (union over the batch), and the
//     packed values xs[m][j] = xm[m, idx[j]] (each token keeps its own mask: a channel active
//     only for token 0 contributes 0 to token 1). NaN never passes (the compare is ordered), so
//     a NaN input is treated as inactive; +-inf passes any finite threshold.
//  2. Columns are cut into units of one cache line of a row, spread over threads with at::parallel_for
//     (OpenMP): each thread owns one contiguous stripe of y, no atomics, no reductions.
//     Or (K split, M <= 16 and rows <= 16 KiB): the active list is cut into 2 fixed halves, each
//     streamed as WHOLE rows into its own fp32 partial of y (part 0 into y itself), then summed
//     in part order: a column stripe of a narrow row is a short segment (576 B of a 1152 B row
//     with 2 threads), which streams worse than whole rows.
//  3. Per thread: active rows are taken in groups of G (default 16). For each group and each
//     tile of up to MT tokens, the stripe is walked in column blocks of CB vectors; a
//     block's MT x CB accumulators stay in registers while the group's rows are streamed into
//     them (AXPY: acc[m] += xs[m][j] * wt[idx[j], block]), then are stored once. So y is
//     loaded/stored once per G rows, and each active row is read as a contiguous stream,
//     G rows side by side (G concurrent streams keep the TLB and the hardware prefetcher
//     happy; walking ALL active rows per block would touch K pages per block).
//  4. Software prefetch: each block prefetches the same rows `pf` bytes further along; past
//     the end of the stripe it prefetches the next group's rows from the stripe start.
//
// ISA: AVX-512 (F+BW+VL; vcvtph2ps for fp16, shift for bf16; masked tail), AVX2+FMA+F16C
// (scalar column tail) and scalar; chosen at run time (__attribute__((target)), so the library
// loads on any x86-64). Each output is summed in a fixed order (bias, then the active rows in
// channel order; with the K split, (bias + first half) + second half, the halves fixed by the
// active count, not the thread count): results do not depend on the thread count.
//
// Registered as torch.ops.rarefy_actsparse.input_sparse_matmul.

#include <ATen/Parallel.h>
#include "../rarefy_check.h"
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define RAREFY_X86 1
#include <immintrin.h>
#else
#define RAREFY_X86 0
#endif

namespace {

enum Isa : int64_t { kAuto = -1, kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// Weight element tags (fp16 and bf16 are both 16-bit patterns).
struct F16 { uint16_t v; };
struct BF16 { uint16_t v; };

constexpr int64_t kDefaultGroup = 16;  // active rows per register pass
constexpr int64_t kDefaultPf = 512;    // prefetch distance along a row, bytes
// K split (see input_sparse_matmul) when M <= kKsplitMaxM and a weight row is <= this many
// bytes. Measured, 2 threads, fp16: the K split was 1.02-1.47x faster than the column split
// for every shape tried (K 576-4096, N 192-8192, M 1-16, hot and streaming from DRAM).
constexpr int64_t kKsplitMaxM = 16;
constexpr int64_t kKsplitMaxRowBytes = 16384;

struct Ctx {
  const void* wt;      // [K, N]
  const int32_t* idx;  // [nact] active channels
  const float* xs;     // [M, ldx] packed masked values
  const float* bias;   // [N] or nullptr
  float* y;            // [M, N]
  int64_t M, N, K, nact, ldx;
  int64_t group, pf;   // rows per pass, prefetch distance (bytes)
};

inline float widen(float v) { return v; }
inline float widen(F16 v) { return static_cast<float>(c10::Half(v.v, c10::Half::from_bits())); }
inline float widen(BF16 v) { return static_cast<float>(c10::BFloat16(v.v, c10::BFloat16::from_bits())); }

// ----------------------------------------------------------------------------- compaction
// Fills idx / xs; returns nact.
int64_t compact_scalar(const float* x, int64_t M, int64_t K, float t, int32_t* idx, float* xs, int64_t ldx) {
  int64_t n = 0;
  for (int64_t i = 0; i < K; ++i) {
    bool any = false;
    for (int64_t m = 0; m < M; ++m) any |= std::fabs(x[m * K + i]) >= t;  // false for NaN
    if (!any) continue;
    idx[n] = static_cast<int32_t>(i);
    for (int64_t m = 0; m < M; ++m) {
      const float v = x[m * K + i];
      xs[m * ldx + n] = std::fabs(v) >= t ? v : 0.f;
    }
    ++n;
  }
  return n;
}

// ----------------------------------------------------------------------------- scalar path
// Plain AXPY over the stripe, row by row (the reference order: bias, then rows in order).
template <typename W>
void stripe_scalar(const Ctx& c, int64_t c0, int64_t c1) {
  const W* wt = static_cast<const W*>(c.wt);
  for (int64_t m = 0; m < c.M; ++m) {
    float* y = c.y + m * c.N;
    for (int64_t n = c0; n < c1; ++n) y[n] = c.bias ? c.bias[n] : 0.f;
    for (int64_t j = 0; j < c.nact; ++j) {
      const float xv = c.xs[m * c.ldx + j];
      const W* r = wt + static_cast<int64_t>(c.idx[j]) * c.N;
      for (int64_t n = c0; n < c1; ++n) y[n] += xv * widen(r[n]);
    }
  }
}

#if RAREFY_X86
inline void prefetch_lines(const void* p, int64_t lines) {
  const char* a = static_cast<const char*>(p);
  for (int64_t l = 0; l < lines; ++l) _mm_prefetch(a + 64 * l, _MM_HINT_T0);
}

// Where a block at column `col` prefetches: `pf` bytes further along the walk over the stripe
// (the same rows further right; past the end of the stripe, the next group's rows from the
// stripe start, and so on).
struct Pf {
  const int32_t* rows = nullptr;
  int64_t count = 0, col = 0, lines = 0;
};

inline Pf prefetch_target(const Ctx& c, int64_t g0, int64_t c0, int64_t c1, int64_t col, int64_t width,
                          int64_t esize) {
  Pf p;
  p.lines = (width * esize + 63) / 64;
  const int64_t off = col - c0 + c.pf / esize, sw = c1 - c0;
  const int64_t g = g0 + (off / sw) * c.group;
  if (g < c.nact) p.rows = c.idx + g, p.count = std::min(c.group, c.nact - g), p.col = c0 + off % sw;
  return p;
}

// First blocks of the first group of a stripe, requested up front.
inline void prefetch_start(const Ctx& c, int64_t c0, int64_t c1, int64_t esize) {
  const char* base = static_cast<const char*>(c.wt);
  const int64_t bytes = std::min(c.pf, (c1 - c0) * esize);
  const int64_t gc = std::min(c.group, c.nact);
  for (int64_t j = 0; j < gc; ++j)
    prefetch_lines(base + (static_cast<int64_t>(c.idx[j]) * c.N + c0) * esize, (bytes + 63) / 64);
}

// ----------------------------------------------------------------------------- AVX-512
#define RAREFY_T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))

RAREFY_T512 inline __m512 ld512(const float* p) { return _mm512_loadu_ps(p); }
RAREFY_T512 inline __m512 ld512(const F16* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
RAREFY_T512 inline __m512 ld512(const BF16* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
RAREFY_T512 inline __m512 ld512m(__mmask16 k, const float* p) { return _mm512_maskz_loadu_ps(k, p); }
RAREFY_T512 inline __m512 ld512m(__mmask16 k, const F16* p) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
}
RAREFY_T512 inline __m512 ld512m(__mmask16 k, const BF16* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

// Accumulator columns (16-wide vectors) per token-tile size: MT*CB accumulators + MT
// broadcasts + 1 weight register within the 32 zmm.
constexpr int cb512(int mt) { return mt <= 3 ? 8 : mt == 4 ? 6 : mt == 5 ? 5 : mt == 6 ? 4 : 3; }

// One active row into the MT x CB accumulators: acc[m][v] += xs[m] * r[16v .. 16v+16).
template <int MT, int CB, bool MASK, typename W>
RAREFY_T512 __attribute__((always_inline)) inline void row512(__m512 (&acc)[MT][CB], const W* r, const float* xs,
                                                              int64_t ldx, __mmask16 km) {
  __m512 xb[MT];
  for (int m = 0; m < MT; ++m) xb[m] = _mm512_set1_ps(xs[m * ldx]);
  for (int v = 0; v < CB; ++v) {
    const __m512 w = MASK ? ld512m(km, r) : ld512(r + 16 * v);
    for (int m = 0; m < MT; ++m) acc[m][v] = _mm512_fmadd_ps(xb[m], w, acc[m][v]);
  }
}

// One block: MT tokens x CB vectors at column `col`, rows idx[g0 .. g0+gc) of the group.
// MASK: a single partial vector (CB == 1) with lane mask `km`.
template <int MT, int CB, bool MASK, typename W>
RAREFY_T512 void block512(const Ctx& c, int64_t g0, int64_t gc, int64_t m0, int64_t col, bool init,
                          const Pf& pf, __mmask16 km) {
  const W* wt = static_cast<const W*>(c.wt) + col;
  const int32_t* rows = c.idx + g0;
  const float* xs = c.xs + m0 * c.ldx + g0;
  float* y = c.y + m0 * c.N + col;
  const int64_t N = c.N;
  __m512 acc[MT][CB];
  if (init) {
    for (int v = 0; v < CB; ++v) {
      __m512 b = _mm512_setzero_ps();
      if (c.bias) b = MASK ? _mm512_maskz_loadu_ps(km, c.bias + col) : _mm512_loadu_ps(c.bias + col + 16 * v);
      for (int m = 0; m < MT; ++m) acc[m][v] = b;
    }
  } else {
    for (int m = 0; m < MT; ++m)
      for (int v = 0; v < CB; ++v)
        acc[m][v] = MASK ? _mm512_maskz_loadu_ps(km, y + m * N) : _mm512_loadu_ps(y + m * N + 16 * v);
  }
  int64_t j = 0;
  if (pf.rows) {
    const W* pb = static_cast<const W*>(c.wt) + pf.col;
    const int64_t np = std::min(gc, pf.count);
    for (; j < np; ++j) {
      prefetch_lines(pb + static_cast<int64_t>(pf.rows[j]) * N, pf.lines);
      row512<MT, CB, MASK>(acc, wt + static_cast<int64_t>(rows[j]) * N, xs + j, c.ldx, km);
    }
    for (int64_t q = np; q < pf.count; ++q) prefetch_lines(pb + static_cast<int64_t>(pf.rows[q]) * N, pf.lines);
  }
#pragma GCC unroll 2
  for (; j < gc; ++j) row512<MT, CB, MASK>(acc, wt + static_cast<int64_t>(rows[j]) * N, xs + j, c.ldx, km);
  for (int m = 0; m < MT; ++m)
    for (int v = 0; v < CB; ++v) {
      if (MASK) _mm512_mask_storeu_ps(y + m * N, km, acc[m][v]);
      else _mm512_storeu_ps(y + m * N + 16 * v, acc[m][v]);
    }
}

template <int MT, typename W>
RAREFY_T512 void tile512(const Ctx& c, int64_t g0, int64_t gc, int64_t m0, int64_t c0, int64_t c1, bool init,
                         bool prefetch) {
  constexpr int CB = cb512(MT);
  constexpr int64_t es = sizeof(W);
  const Pf none;
  int64_t col = c0;
  for (; col + 16 * CB <= c1; col += 16 * CB)
    block512<MT, CB, false, W>(c, g0, gc, m0, col, init,
                               prefetch ? prefetch_target(c, g0, c0, c1, col, 16 * CB, es) : none, 0);
  // Remaining whole vectors (< CB) in one block, so the row loop keeps several FMA chains.
  const int64_t rem = (c1 - col) / 16;
  if (rem > 0) {
    const Pf pf = prefetch ? prefetch_target(c, g0, c0, c1, col, 16 * rem, es) : none;
    switch (rem) {
      case 1: block512<MT, 1, false, W>(c, g0, gc, m0, col, init, pf, 0); break;
      case 2: block512<MT, std::min(2, CB), false, W>(c, g0, gc, m0, col, init, pf, 0); break;
      case 3: block512<MT, std::min(3, CB), false, W>(c, g0, gc, m0, col, init, pf, 0); break;
      case 4: block512<MT, std::min(4, CB), false, W>(c, g0, gc, m0, col, init, pf, 0); break;
      case 5: block512<MT, std::min(5, CB), false, W>(c, g0, gc, m0, col, init, pf, 0); break;
      case 6: block512<MT, std::min(6, CB), false, W>(c, g0, gc, m0, col, init, pf, 0); break;
      default: block512<MT, std::min(7, CB), false, W>(c, g0, gc, m0, col, init, pf, 0); break;
    }
    col += 16 * rem;
  }
  if (col < c1) {
    const __mmask16 km = static_cast<__mmask16>((1u << (c1 - col)) - 1u);
    block512<MT, 1, true, W>(c, g0, gc, m0, col, init, none, km);
  }
}

template <typename W>
RAREFY_T512 void stripe512(const Ctx& c, int64_t c0, int64_t c1) {
  prefetch_start(c, c0, c1, sizeof(W));
  for (int64_t g0 = 0; g0 < c.nact; g0 += c.group) {
    const int64_t gc = std::min(c.group, c.nact - g0);
    for (int64_t m0 = 0; m0 < c.M; m0 += 8) {
      const bool init = g0 == 0, pf = m0 == 0;
      switch (std::min<int64_t>(8, c.M - m0)) {
        case 1: tile512<1, W>(c, g0, gc, m0, c0, c1, init, pf); break;
        case 2: tile512<2, W>(c, g0, gc, m0, c0, c1, init, pf); break;
        case 3: tile512<3, W>(c, g0, gc, m0, c0, c1, init, pf); break;
        case 4: tile512<4, W>(c, g0, gc, m0, c0, c1, init, pf); break;
        case 5: tile512<5, W>(c, g0, gc, m0, c0, c1, init, pf); break;
        case 6: tile512<6, W>(c, g0, gc, m0, c0, c1, init, pf); break;
        case 7: tile512<7, W>(c, g0, gc, m0, c0, c1, init, pf); break;
        default: tile512<8, W>(c, g0, gc, m0, c0, c1, init, pf); break;
      }
    }
  }
}

// Compaction with compress-store: 16 channels per step, union mask over the tokens.
RAREFY_T512 int64_t compact512(const float* x, int64_t M, int64_t K, float t, int32_t* idx, float* xs,
                               int64_t ldx) {
  const __m512 tv = _mm512_set1_ps(t);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  std::vector<__mmask16> own(static_cast<size_t>(M));
  int64_t n = 0;
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 valid = K - k >= 16 ? static_cast<__mmask16>(0xFFFF)
                                        : static_cast<__mmask16>((1u << (K - k)) - 1u);
    __mmask16 any = 0;
    for (int64_t m = 0; m < M; ++m) {
      const __m512 v = _mm512_maskz_loadu_ps(valid, x + m * K + k);
      own[m] = _mm512_mask_cmp_ps_mask(valid, _mm512_abs_ps(v), tv, _CMP_GE_OQ);  // NaN -> false
      any |= own[m];
    }
    if (!any) continue;
    _mm512_mask_compressstoreu_epi32(idx + n, any, _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(k))));
    for (int64_t m = 0; m < M; ++m) {
      const __m512 v = _mm512_maskz_loadu_ps(own[m], x + m * K + k);
      _mm512_mask_compressstoreu_ps(xs + m * ldx + n, any, v);
    }
    n += __builtin_popcount(any);
  }
  return n;
}

// ----------------------------------------------------------------------------- AVX2 + F16C
#define RAREFY_T256 __attribute__((target("avx2,fma,f16c")))

RAREFY_T256 inline __m256 ld256(const float* p) { return _mm256_loadu_ps(p); }
RAREFY_T256 inline __m256 ld256(const F16* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
RAREFY_T256 inline __m256 ld256(const BF16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

// 16 ymm: MT*CB accumulators + MT broadcasts + 1 weight.
constexpr int cb256(int mt) { return mt == 1 ? 6 : mt == 2 ? 4 : mt == 3 ? 3 : 2; }

template <int MT, int CB, typename W>
RAREFY_T256 __attribute__((always_inline)) inline void row256(__m256 (&acc)[MT][CB], const W* r, const float* xs,
                                                              int64_t ldx) {
  __m256 xb[MT];
  for (int m = 0; m < MT; ++m) xb[m] = _mm256_broadcast_ss(xs + m * ldx);
  for (int v = 0; v < CB; ++v) {
    const __m256 w = ld256(r + 8 * v);
    for (int m = 0; m < MT; ++m) acc[m][v] = _mm256_fmadd_ps(xb[m], w, acc[m][v]);
  }
}

template <int MT, int CB, typename W>
RAREFY_T256 void block256(const Ctx& c, int64_t g0, int64_t gc, int64_t m0, int64_t col, bool init, const Pf& pf) {
  const W* wt = static_cast<const W*>(c.wt) + col;
  const int32_t* rows = c.idx + g0;
  const float* xs = c.xs + m0 * c.ldx + g0;
  float* y = c.y + m0 * c.N + col;
  const int64_t N = c.N;
  __m256 acc[MT][CB];
  for (int m = 0; m < MT; ++m)
    for (int v = 0; v < CB; ++v)
      acc[m][v] = init ? (c.bias ? _mm256_loadu_ps(c.bias + col + 8 * v) : _mm256_setzero_ps())
                       : _mm256_loadu_ps(y + m * N + 8 * v);
  int64_t j = 0;
  if (pf.rows) {
    const W* pb = static_cast<const W*>(c.wt) + pf.col;
    const int64_t np = std::min(gc, pf.count);
    for (; j < np; ++j) {
      prefetch_lines(pb + static_cast<int64_t>(pf.rows[j]) * N, pf.lines);
      row256<MT, CB>(acc, wt + static_cast<int64_t>(rows[j]) * N, xs + j, c.ldx);
    }
    for (int64_t q = np; q < pf.count; ++q) prefetch_lines(pb + static_cast<int64_t>(pf.rows[q]) * N, pf.lines);
  }
  for (; j < gc; ++j) row256<MT, CB>(acc, wt + static_cast<int64_t>(rows[j]) * N, xs + j, c.ldx);
  for (int m = 0; m < MT; ++m)
    for (int v = 0; v < CB; ++v) _mm256_storeu_ps(y + m * N + 8 * v, acc[m][v]);
}

template <int MT, typename W>
RAREFY_T256 void tile256(const Ctx& c, int64_t g0, int64_t gc, int64_t m0, int64_t c0, int64_t c1, bool init,
                         bool prefetch) {
  constexpr int CB = cb256(MT);
  constexpr int64_t es = sizeof(W);
  const Pf none;
  int64_t col = c0;
  for (; col + 8 * CB <= c1; col += 8 * CB)
    block256<MT, CB, W>(c, g0, gc, m0, col, init, prefetch ? prefetch_target(c, g0, c0, c1, col, 8 * CB, es) : none);
  const int64_t rem = (c1 - col) / 8;  // remaining whole vectors (< CB) in one block
  if (rem > 0) {
    const Pf pf = prefetch ? prefetch_target(c, g0, c0, c1, col, 8 * rem, es) : none;
    switch (rem) {
      case 1: block256<MT, 1, W>(c, g0, gc, m0, col, init, pf); break;
      case 2: block256<MT, std::min(2, CB), W>(c, g0, gc, m0, col, init, pf); break;
      case 3: block256<MT, std::min(3, CB), W>(c, g0, gc, m0, col, init, pf); break;
      case 4: block256<MT, std::min(4, CB), W>(c, g0, gc, m0, col, init, pf); break;
      default: block256<MT, std::min(5, CB), W>(c, g0, gc, m0, col, init, pf); break;
    }
    col += 8 * rem;
  }
  if (col < c1) {  // < 8 columns: scalar, same order
    const W* wt = static_cast<const W*>(c.wt);
    for (int64_t m = m0; m < m0 + MT; ++m)
      for (int64_t n = col; n < c1; ++n) {
        float a = init ? (c.bias ? c.bias[n] : 0.f) : c.y[m * c.N + n];
        for (int64_t j = g0; j < g0 + gc; ++j)
          a += c.xs[m * c.ldx + j] * widen(wt[static_cast<int64_t>(c.idx[j]) * c.N + n]);
        c.y[m * c.N + n] = a;
      }
  }
}

template <typename W>
RAREFY_T256 void stripe256(const Ctx& c, int64_t c0, int64_t c1) {
  prefetch_start(c, c0, c1, sizeof(W));
  for (int64_t g0 = 0; g0 < c.nact; g0 += c.group) {
    const int64_t gc = std::min(c.group, c.nact - g0);
    for (int64_t m0 = 0; m0 < c.M; m0 += 4) {
      const bool init = g0 == 0, pf = m0 == 0;
      switch (std::min<int64_t>(4, c.M - m0)) {
        case 1: tile256<1, W>(c, g0, gc, m0, c0, c1, init, pf); break;
        case 2: tile256<2, W>(c, g0, gc, m0, c0, c1, init, pf); break;
        case 3: tile256<3, W>(c, g0, gc, m0, c0, c1, init, pf); break;
        default: tile256<4, W>(c, g0, gc, m0, c0, c1, init, pf); break;
      }
    }
  }
}

bool has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#else
bool has_avx512() { return false; }
bool has_avx2() { return false; }
#endif

int64_t best_isa() { return has_avx512() ? kAvx512 : has_avx2() ? kAvx2 : kScalar; }

template <typename W>
void (*pick_stripe(int64_t isa))(const Ctx&, int64_t, int64_t) {
#if RAREFY_X86
  if (isa == kAvx512) return stripe512<W>;
  if (isa == kAvx2) return stripe256<W>;
#endif
  return stripe_scalar<W>;
}

// Smallest float f with f >= t: then |x| >= f <=> |x| >= t for every float x (t in double).
float threshold_float(double t) {
  float f = static_cast<float>(t);
  if (static_cast<double>(f) < t) f = std::nextafter(f, INFINITY);
  return f;
}

// ----------------------------------------------------------------------------- op
at::Tensor input_sparse_matmul(const at::Tensor& x, const at::Tensor& wt, double threshold,
                               const c10::optional<at::Tensor>& bias, int64_t isa, int64_t group, int64_t pf,
                               int64_t ksplit) {
  const char* op = "input_sparse_matmul_cpu";
  RAREFY_CHECK_VALUE(x.device().is_cpu() && wt.device().is_cpu(), op, ": x and wt must be CPU tensors");
  RAREFY_CHECK_VALUE(x.scalar_type() == at::kFloat, op, ": x must be float32, got ", x.scalar_type());
  const auto wdt = wt.scalar_type();
  RAREFY_CHECK_VALUE(wdt == at::kHalf || wdt == at::kBFloat16 || wdt == at::kFloat, op,
                    ": wt must be float16, bfloat16 or float32, got ", wdt);
  RAREFY_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D [M, K], got shape ", rarefy::shape_str(x));
  RAREFY_CHECK_VALUE(wt.dim() == 2, op, ": wt must be 2-D [K, N] (the weight transposed), got shape ", rarefy::shape_str(wt));
  RAREFY_CHECK_VALUE(x.size(1) == wt.size(0), op, ": K mismatch: x ", rarefy::shape_str(x), " vs wt ", rarefy::shape_str(wt),
                    " (wt is [K, N], the transpose of nn.Linear.weight)");
  RAREFY_CHECK_VALUE(x.is_contiguous(), op, ": x must be contiguous");
  RAREFY_CHECK_VALUE(wt.is_contiguous(), op, ": wt must be contiguous [K, N] (got a strided view)");
  RAREFY_CHECK_VALUE(std::isfinite(threshold) || threshold > 0, op, ": threshold must be a number >= 0, got ", threshold);
  RAREFY_CHECK_VALUE(threshold >= 0, op, ": threshold must be >= 0, got ", threshold);
  RAREFY_CHECK_VALUE(wt.size(0) < (int64_t(1) << 31), op, ": K too large");
  const int64_t M = x.size(0), K = x.size(1), N = wt.size(1);
  const float* bptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    RAREFY_CHECK_VALUE(b.device().is_cpu(), op, ": bias must be a CPU tensor");
    RAREFY_CHECK_VALUE(b.scalar_type() == at::kFloat, op, ": bias must be float32, got ", b.scalar_type());
    RAREFY_CHECK_VALUE(b.dim() == 1 && b.size(0) == N, op, ": bias must be [N] = [", N, "], got ", rarefy::shape_str(b));
    RAREFY_CHECK_VALUE(b.is_contiguous(), op, ": bias must be contiguous");
    bptr = b.data_ptr<float>();
  }
  const int64_t best = best_isa();
  if (isa == kAuto) isa = best;
  RAREFY_CHECK_VALUE(isa >= kScalar && isa <= best, op, ": isa ", isa, " not available (best ", best, ")");
  if (group <= 0) group = kDefaultGroup;
  if (pf < 0) pf = kDefaultPf;

  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;

  // Compaction (caller's thread). Decode-sized buffers (<= 4 MiB) are kept per thread and
  // reused across calls; larger ones (prefill-sized x) are freed after the call.
  thread_local std::vector<int32_t> idx_keep;
  thread_local std::vector<float> xs_keep;
  std::vector<int32_t> idx_tmp;
  std::vector<float> xs_tmp;
  const bool keep = M * K <= (int64_t(1) << 20);
  std::vector<int32_t>& idx = keep ? idx_keep : idx_tmp;
  std::vector<float>& xs = keep ? xs_keep : xs_tmp;
  if (static_cast<int64_t>(idx.size()) < K + 16) idx.resize(K + 16);
  if (static_cast<int64_t>(xs.size()) < M * K + 16) xs.resize(M * K + 16);
  const float t = threshold_float(threshold);
  const float* xp = x.data_ptr<float>();
  int64_t nact;
#if RAREFY_X86
  if (isa == kAvx512) nact = compact512(xp, M, K, t, idx.data(), xs.data(), K);
  else
#endif
    nact = compact_scalar(xp, M, K, t, idx.data(), xs.data(), K);

  float* yp = y.data_ptr<float>();
  if (nact == 0) {  // nothing passes: y = bias (or 0), no weight read
    for (int64_t m = 0; m < M; ++m) {
      if (bptr) std::memcpy(yp + m * N, bptr, sizeof(float) * N);
      else std::memset(yp + m * N, 0, sizeof(float) * N);
    }
    return y;
  }

  void (*stripe)(const Ctx&, int64_t, int64_t);
  int64_t esize;
  if (wdt == at::kHalf) stripe = pick_stripe<F16>(isa), esize = 2;
  else if (wdt == at::kBFloat16) stripe = pick_stripe<BF16>(isa), esize = 2;
  else stripe = pick_stripe<float>(isa), esize = 4;

  // K split (narrow layers, few tokens): with a column split each thread would read only a
  // short segment (N * esize / threads bytes) of every active row. Instead the compacted
  // active list is cut into kParts contiguous parts; part p streams WHOLE rows (all N columns)
  // into its own fp32 partial (part 0 straight into y, with the bias; the others into scratch
  // buffers), then y += partial 1 + ... in part order. The parts are fixed (not the thread
  // count), so results do not depend on the number of threads. Chosen by the rule below
  // (measured on the SmolLM2-135M shapes, 2 threads: docs/results/activation-cpu-gemv.md).
  constexpr int64_t kParts = 2;
  const bool use_ksplit = ksplit > 0 || (ksplit < 0 && M <= kKsplitMaxM && N * esize <= kKsplitMaxRowBytes);
  if (use_ksplit && nact >= kParts) {
    thread_local std::vector<float> part_keep;
    std::vector<float> part_tmp;
    std::vector<float>& part = M * N <= (int64_t(1) << 18) ? part_keep : part_tmp;
    if (static_cast<int64_t>(part.size()) < (kParts - 1) * M * N) part.resize((kParts - 1) * M * N);
    Ctx pc[kParts];
    for (int64_t p = 0; p < kParts; ++p) {
      const int64_t j0 = nact * p / kParts, j1 = nact * (p + 1) / kParts;
      pc[p] = Ctx{wt.data_ptr(), idx.data() + j0, xs.data() + j0, p == 0 ? bptr : nullptr,
                  p == 0 ? yp : part.data() + (p - 1) * M * N, M, N, K, j1 - j0, K, group, pf};
    }
    // Small calls (< ~32 KiB of active weight per part) run inline: no fork/join.
    const int64_t part_bytes = (nact / kParts) * N * esize * std::max<int64_t>(1, M / 4);
    const int64_t grain = part_bytes >= 32 * 1024 ? 1 : kParts;
    at::parallel_for(0, kParts, grain, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) stripe(pc[p], 0, N);
    });
    for (int64_t p = 1; p < kParts; ++p) {
      const float* src = part.data() + (p - 1) * M * N;
      for (int64_t i = 0; i < M * N; ++i) yp[i] += src[i];
    }
    return y;
  }

  Ctx c{wt.data_ptr(), idx.data(), xs.data(), bptr, yp, M, N, K, nact, K, group, pf};

  // Columns in units of one cache line of a weight row (32 columns of fp16, 16 of fp32),
  // split evenly over the threads: one thread = one contiguous stripe of y. A thread gets at
  // least ~32 KiB of active weight so small layers skip the fork/join.
  const int64_t unit = 64 / esize;
  const int64_t units = (N + unit - 1) / unit;
  const int64_t unit_bytes = nact * 64 * std::max<int64_t>(1, M / 4);
  const int64_t grain = std::max<int64_t>(1, (32 * 1024 + unit_bytes - 1) / unit_bytes);
  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
    stripe(c, u0 * unit, std::min(u1 * unit, N));
  });
  return y;
}

int64_t count_active(const at::Tensor& x, double threshold) {
  RAREFY_CHECK_VALUE(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
                    "count_active: x must be a contiguous float32 CPU tensor [M, K]");
  RAREFY_CHECK_VALUE(threshold >= 0, "count_active: threshold must be >= 0, got ", threshold);
  const int64_t M = x.size(0), K = x.size(1);
  const float t = threshold_float(threshold);
  const float* xp = x.data_ptr<float>();
  int64_t n = 0;
  for (int64_t i = 0; i < K; ++i) {
    bool any = false;
    for (int64_t m = 0; m < M && !any; ++m) any = std::fabs(xp[m * K + i]) >= t;
    n += any;
  }
  return n;
}

}  // namespace

// The matmul's schema here, its kernel for the CPU key only: the op then stays opaque to
// torch.compile, which traces it with the shape-only kernel registered in Python
// (rarefy/kernels/activation_cpu/__init__.py) instead of calling into this code.
TORCH_LIBRARY(rarefy_actsparse, m) {
  m.def("input_sparse_matmul(Tensor x, Tensor wt, float threshold, Tensor? bias=None, int isa=-1, "
        "int group=0, int pf=-1, int ksplit=-1) -> Tensor");
  m.def("count_active(Tensor x, float threshold) -> int", &count_active);
  m.def("best_isa() -> int", &best_isa);
}

TORCH_LIBRARY_IMPL(rarefy_actsparse, CPU, m) {
  m.impl("input_sparse_matmul", &input_sparse_matmul);
}
