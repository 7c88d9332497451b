// Sparse matmul over the bitmap layout: y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]).
//
// W [N, K] is given as a bitmask int32 [N, Kw] (Kw = ceil(K/32); bit j of word w <-> column
// 32w + j, LSB first) and its stored values (fp16 / bf16 / fp32), row n's values consecutive
// from values[row_start[n]] in column order. x fp32 [M, K], y fp32 [M, N], all math fp32 FMA.
// TiledBitmap (row_start = tile_offsets[:, 0]) and NMSparse (row_start[n] = n * n_per_row)
// both map onto this.
//
// Why: batch-1 decode is memory bound. A 50%-sparse fp16 matrix is 1.125 B/weight (values +
// 1 bit of mask) against 2 for dense fp16 and 4 for fp32. The decode below costs ~6 cycles of
// shuffle-port work per mask word whatever the density (about twice dense fp16's widening),
// so the kernel wins when weights come from DRAM, not when they sit in L2.
//
// Vector path, per 32-bit mask word (32 columns):
//   VBMI2:   one vpexpandw loads popcount(word) packed 16-bit values and places them at the set
//            bits (zeros elsewhere); widen to 2x16 fp32 (vcvtph2ps, or <<16 for bf16); FMA.
//   AVX-512: (F+BW+VL, no VBMI2) masked-load the packed values of each 16-bit half, widen,
//            then vexpandps in fp32. fp32 values use vexpandps from memory on both levels.
// The value pointer advances by popcount(word). For M <= 8 each decoded word feeds all rows of
// x while in registers; for M > 8 four rows of W are decoded to an fp32 buffer (L1/L2) and a
// dense 4x4 register tile runs over it. Either way weights stream from memory once per call,
// with software prefetch ahead of both streams.
//
// int8 values (bitmap_matmul_int8, the sparse + int8 composition): the stored values are int8
// with one fp32 scale per output row; a word decodes by expanding bytes (VBMI2 vpexpandb) or by
// masked byte loads + vexpandps, sign-extends to int32 and converts to fp32 (exact); the row's
// scale multiplies the fp32 sum once per output. At 50% density that streams 0.625 B/weight
// (values + mask bit) against 1.125 for fp16 values and 1 for dense int8.
//
// Bits at columns >= K (NMSparse pads its last group with stored zeros) consume their values,
// which are ignored. Each row's value range is checked against values.numel() before it is
// read: bad metadata gives an error, not an out-of-bounds read. Rows are split over threads
// (at::parallel_for); each output is summed by one thread in a fixed order.

#include <ATen/Parallel.h>
#include "../rarefy_check.h"
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define RAREFY_X86 1
#include <immintrin.h>
#else
#define RAREFY_X86 0
#endif

namespace {

enum Isa : int64_t { kAuto = -1, kScalar = 0, kAvx512 = 1, kVbmi2 = 2 };
enum Vt : int { kF16 = 0, kBF16 = 1, kF32 = 2, kI8 = 3 };

// Bytes per stored value.
template <int VT>
constexpr int64_t esize() { return VT == kF32 ? 4 : VT == kI8 ? 1 : 2; }

struct Problem {
  const float* x;          // [M, K]
  const uint32_t* bm;      // [N, Kw]
  const uint8_t* vals;     // [nvals] of esize bytes
  const int32_t* rs;       // [N]
  const float* bias;       // [N] or nullptr
  const float* scale;      // [N] per-row scale of int8 values (kI8 only), else nullptr
  float* y;                // [M, N]
  int64_t M, N, K, Kw, nvals;
  uint32_t tail;           // valid-column mask of the last word
};

// Number of values row n consumes (its popcount).
int64_t row_count(const Problem& p, int64_t n) {
  const uint32_t* bm = p.bm + n * p.Kw;
  int64_t cnt = 0;
  for (int64_t w = 0; w < p.Kw; ++w) cnt += __builtin_popcount(bm[w]);
  return cnt;
}

// True if row n's values lie inside `values`; checked before the row is read. Only rows near
// the end of `values` need the popcount: if even a full row would fit, the row is safe (a
// popcount per row cost ~20% at K = 576).
inline bool row_ok(const Problem& p, int64_t n) {
  const int64_t s = p.rs[n];
  if (s < 0) return false;
  if (s + 32 * p.Kw <= p.nvals) return true;
  return s + row_count(p, n) <= p.nvals;
}

// ----------------------------------------------------------------------------- scalar
template <int VT>
inline float value_at(const uint8_t* vals, int64_t i) {
  if constexpr (VT == kF16) return static_cast<float>(reinterpret_cast<const c10::Half*>(vals)[i]);
  if constexpr (VT == kBF16) return static_cast<float>(reinterpret_cast<const c10::BFloat16*>(vals)[i]);
  if constexpr (VT == kI8) return static_cast<float>(reinterpret_cast<const int8_t*>(vals)[i]);
  return reinterpret_cast<const float*>(vals)[i];
}

// Walk the set bits of each row (portable; any x86-64 or other CPU). One sum per row of x.
template <int VT>
bool rows_scalar(const Problem& p, int64_t n0, int64_t n1, int64_t* bad) {
  std::vector<float> acc(static_cast<size_t>(p.M));
  for (int64_t n = n0; n < n1; ++n) {
    if (!row_ok(p, n)) { *bad = n; return false; }
    std::fill(acc.begin(), acc.end(), 0.f);
    int64_t i = p.rs[n];
    const uint32_t* bm = p.bm + n * p.Kw;
    for (int64_t w = 0; w < p.Kw; ++w) {
      for (uint32_t m = bm[w]; m; m &= m - 1) {
        const int64_t c = 32 * w + __builtin_ctz(m);
        const float v = value_at<VT>(p.vals, i++);
        if (c >= p.K) break;  // padding past column K (NMSparse): consumed, ignored
        for (int64_t r = 0; r < p.M; ++r) acc[r] += p.x[r * p.K + c] * v;
      }
    }
    const float s = VT == kI8 ? p.scale[n] : 1.f;
    for (int64_t r = 0; r < p.M; ++r) p.y[r * p.N + n] = acc[r] * s + (p.bias ? p.bias[n] : 0.f);
  }
  return true;
}

#if RAREFY_X86
// One target string for all vector code. The AVX-512 (no VBMI2) instantiations only use
// F/BW/VL intrinsics; VBMI2 instructions appear only where VB2 is true (explicit intrinsics).
// Fully unroll the register-tile loops early: otherwise GCC keeps the accumulator arrays in
// memory and stores them on every iteration.
#define RF_UNROLL _Pragma("GCC unroll 16")
#define RF_TGT __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,popcnt,bmi,bmi2")))

// Decode one mask word of a row: 32 fp32 weights (lo = columns 0..15, hi = 16..31) with zeros
// at unset bits; advance vp past the popcount(m) values consumed.
template <int VT, bool VB2>
RF_TGT inline void decode(uint32_t m, const uint8_t*& vp, __m512& lo, __m512& hi) {
  if constexpr (VT == kI8) {
    // int8 values: expand bytes (VBMI2) or masked-load each half's bytes; sign-extend to
    // int32, convert to fp32 (exact), and expand in fp32 without VBMI2. The per-row scale is
    // applied once per output, not per weight.
    __m128i a, b;
    if constexpr (VB2) {
      const __m256i v = _mm256_maskz_expandloadu_epi8(static_cast<__mmask32>(m), vp);
      vp += _mm_popcnt_u32(m);
      a = _mm256_castsi256_si128(v);
      b = _mm256_extracti128_si256(v, 1);
      lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(a));
      hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
    } else {
      const __mmask16 m0 = static_cast<__mmask16>(m), m1 = static_cast<__mmask16>(m >> 16);
      const unsigned c0 = _mm_popcnt_u32(m0), c1 = _mm_popcnt_u32(m1);
      a = _mm_maskz_loadu_epi8(static_cast<__mmask16>(_bzhi_u32(0xffffu, c0)), vp);
      b = _mm_maskz_loadu_epi8(static_cast<__mmask16>(_bzhi_u32(0xffffu, c1)), vp + c0);
      vp += c0 + c1;
      lo = _mm512_maskz_expand_ps(m0, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(a)));
      hi = _mm512_maskz_expand_ps(m1, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)));
    }
  } else if constexpr (VT == kF32) {
    const __mmask16 m0 = static_cast<__mmask16>(m), m1 = static_cast<__mmask16>(m >> 16);
    lo = _mm512_maskz_expandloadu_ps(m0, vp);
    vp += 4 * _mm_popcnt_u32(m0);
    hi = _mm512_maskz_expandloadu_ps(m1, vp);
    vp += 4 * _mm_popcnt_u32(m1);
  } else if constexpr (VB2) {
    const __m512i v = _mm512_maskz_expandloadu_epi16(static_cast<__mmask32>(m), vp);
    vp += 2 * _mm_popcnt_u32(m);
    const __m256i a = _mm512_castsi512_si256(v), b = _mm512_extracti64x4_epi64(v, 1);
    if constexpr (VT == kF16) {
      lo = _mm512_cvtph_ps(a);
      hi = _mm512_cvtph_ps(b);
    } else {  // bf16 -> fp32 is the top half of the fp32 bits
      lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(a), 16));
      hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
    }
  } else {
    // No 16-bit expand: load each half's packed values (masked, so never past the row),
    // widen, then expand in fp32.
    const __mmask16 m0 = static_cast<__mmask16>(m), m1 = static_cast<__mmask16>(m >> 16);
    const unsigned c0 = _mm_popcnt_u32(m0), c1 = _mm_popcnt_u32(m1);
    const __m256i a = _mm256_maskz_loadu_epi16(static_cast<__mmask16>(_bzhi_u32(0xffffu, c0)), vp);
    const __m256i b = _mm256_maskz_loadu_epi16(static_cast<__mmask16>(_bzhi_u32(0xffffu, c1)), vp + 2 * c0);
    vp += 2 * (c0 + c1);
    __m512 fa, fb;
    if constexpr (VT == kF16) {
      fa = _mm512_cvtph_ps(a);
      fb = _mm512_cvtph_ps(b);
    } else {
      fa = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(a), 16));
      fb = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
    }
    lo = _mm512_maskz_expand_ps(m0, fa);
    hi = _mm512_maskz_expand_ps(m1, fb);
  }
}

// Software prefetch distances (bytes ahead in the values / bitmask streams). The hardware
// prefetcher alone reached ~12 GB/s of the ~23 GB/s DRAM read bandwidth (2 cores): the
// decode is long enough per byte that the streams run dry. 4 KiB ahead gets the full rate.
constexpr int64_t kPfValues = 4096, kPfMask = 1024;

// One mask word (32 columns) of a weight row against MT rows of x (x points at the word's
// first column, rows K apart; xm masks the x loads: all ones except on the last word).
template <int VT, bool VB2, int MT, int NA>
RF_TGT __attribute__((always_inline)) inline void word_step(uint32_t m, const uint8_t*& vp, const uint32_t* bmw,
                                                            const float* x, int64_t K, uint32_t xm,
                                                            __m512 (&acc)[MT][NA]) {
  _mm_prefetch(reinterpret_cast<const char*>(vp) + kPfValues, _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(bmw) + kPfMask, _MM_HINT_T0);
  __m512 lo, hi;
  decode<VT, VB2>(m, vp, lo, hi);
  if (xm != 0xffffffffu) {  // last word: drop padding values past column K (inf * 0 = nan)
    lo = _mm512_maskz_mov_ps(static_cast<__mmask16>(xm), lo);
    hi = _mm512_maskz_mov_ps(static_cast<__mmask16>(xm >> 16), hi);
  }
  RF_UNROLL for (int i = 0; i < MT; ++i) {
    const __m512 xl = _mm512_maskz_loadu_ps(static_cast<__mmask16>(xm), x + i * K);
    const __m512 xh = _mm512_maskz_loadu_ps(static_cast<__mmask16>(xm >> 16), x + i * K + 16);
    acc[i][0] = _mm512_fmadd_ps(xl, lo, acc[i][0]);
    acc[i][NA - 1] = _mm512_fmadd_ps(xh, hi, acc[i][NA - 1]);
  }
}

// MT (<= 8) rows of x (from m0) against weight row n, decoding each mask word once for all MT.
// Two accumulators per output (columns 0..15 / 16..31): with one, the two dependent FMAs per
// word (8 cycles of latency) capped M = 4 at half speed.
template <int VT, bool VB2, int MT>
RF_TGT void tile(const Problem& p, int64_t m0, int64_t n) {
  constexpr int NA = 2;
  const int64_t K = p.K, Kw = p.Kw;
  const uint32_t* bm = p.bm + n * Kw;
  const float* x = p.x + m0 * K;
  const uint8_t* vp = p.vals + esize<VT>() * static_cast<int64_t>(p.rs[n]);
  __m512 acc[MT][NA];
  RF_UNROLL for (int i = 0; i < MT; ++i)
    RF_UNROLL for (int a = 0; a < NA; ++a) acc[i][a] = _mm512_setzero_ps();
  for (int64_t w = 0; w + 1 < Kw; ++w) word_step<VT, VB2, MT, NA>(bm[w], vp, bm + w, x + 32 * w, K, 0xffffffffu, acc);
  // Last word: x past column K is never read (masked loads do not fault); weights there are 0.
  if (Kw > 0) word_step<VT, VB2, MT, NA>(bm[Kw - 1], vp, bm + Kw - 1, x + 32 * (Kw - 1), K, p.tail, acc);
  const float b = p.bias ? p.bias[n] : 0.f;
  const float sc = VT == kI8 ? p.scale[n] : 1.f;
  RF_UNROLL for (int i = 0; i < MT; ++i) {
    const __m512 s = NA == 2 ? _mm512_add_ps(acc[i][0], acc[i][NA - 1]) : acc[i][0];
    p.y[(m0 + i) * p.N + n] = _mm512_reduce_add_ps(s) * sc + b;
  }
}

template <int VT, bool VB2>
RF_TGT void row_small_m(const Problem& p, int64_t n) {
  switch (p.M) {
    case 1: return tile<VT, VB2, 1>(p, 0, n);
    case 2: return tile<VT, VB2, 2>(p, 0, n);
    case 3: return tile<VT, VB2, 3>(p, 0, n);
    case 4: return tile<VT, VB2, 4>(p, 0, n);
    case 5: return tile<VT, VB2, 5>(p, 0, n);
    case 6: return tile<VT, VB2, 6>(p, 0, n);
    case 7: return tile<VT, VB2, 7>(p, 0, n);
    default: return tile<VT, VB2, 8>(p, 0, n);
  }
}

// M > 8: decoding per tile of x rows would cost more than decoding R weight rows once into
// an fp32 buffer (stays in L1/L2) and running a dense MT x R register tile over it, so each
// loaded weight vector feeds MT FMAs and each x vector R.
template <int VT, bool VB2>
RF_TGT void decode_row(const Problem& p, int64_t n, float* out) {
  const uint32_t* bm = p.bm + n * p.Kw;
  const uint8_t* vp = p.vals + esize<VT>() * static_cast<int64_t>(p.rs[n]);
  const __m512 sc = _mm512_set1_ps(VT == kI8 ? p.scale[n] : 1.f);  // int8: scaled here, once per weight
  for (int64_t w = 0; w < p.Kw; ++w) {
    _mm_prefetch(reinterpret_cast<const char*>(vp) + kPfValues, _MM_HINT_T0);
    __m512 lo, hi;
    decode<VT, VB2>(bm[w], vp, lo, hi);
    if (w + 1 == p.Kw) {  // drop padding values past column K
      lo = _mm512_maskz_mov_ps(static_cast<__mmask16>(p.tail), lo);
      hi = _mm512_maskz_mov_ps(static_cast<__mmask16>(p.tail >> 16), hi);
    }
    if constexpr (VT == kI8) {
      lo = _mm512_mul_ps(lo, sc);
      hi = _mm512_mul_ps(hi, sc);
    }
    _mm512_storeu_ps(out + 32 * w, lo);
    _mm512_storeu_ps(out + 32 * w + 16, hi);
  }
}

// MT rows of x (from m0) against R decoded rows (buf, stride ld = 32 * Kw) starting at row n.
template <int MT, int R>
RF_TGT void dense_tile(const Problem& p, const float* buf, int64_t ld, int64_t m0, int64_t n) {
  const int64_t K = p.K;
  const float* x = p.x + m0 * K;
  __m512 acc[MT][R];
  RF_UNROLL for (int i = 0; i < MT; ++i)
    RF_UNROLL for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    // The buffer holds zero weights up to 32 * Kw; x past K is masked off (never read).
    const unsigned left = static_cast<unsigned>(std::min<int64_t>(K - k, 16));
    const __mmask16 xm = static_cast<__mmask16>(_bzhi_u32(0xffffu, left));
    __m512 wv[R];
    RF_UNROLL for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_ps(buf + r * ld + k);
    RF_UNROLL for (int i = 0; i < MT; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(xm, x + i * K + k);
      RF_UNROLL for (int r = 0; r < R; ++r) acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]);
    }
  }
  RF_UNROLL for (int i = 0; i < MT; ++i)
    RF_UNROLL for (int r = 0; r < R; ++r)
      p.y[(m0 + i) * p.N + n + r] = _mm512_reduce_add_ps(acc[i][r]) + (p.bias ? p.bias[n + r] : 0.f);
}

template <int R>
RF_TGT void dense_rows(const Problem& p, const float* buf, int64_t ld, int64_t n) {
  int64_t m = 0;
  for (; m + 4 <= p.M; m += 4) dense_tile<4, R>(p, buf, ld, m, n);
  if (p.M - m == 3) dense_tile<3, R>(p, buf, ld, m, n);
  if (p.M - m == 2) dense_tile<2, R>(p, buf, ld, m, n);
  if (p.M - m == 1) dense_tile<1, R>(p, buf, ld, m, n);
}

template <int VT, bool VB2>
RF_TGT bool rows_vec(const Problem& p, int64_t n0, int64_t n1, int64_t* bad) {
  if (p.M <= 8) {
    for (int64_t n = n0; n < n1; ++n) {
      if (!row_ok(p, n)) { *bad = n; return false; }
      row_small_m<VT, VB2>(p, n);
    }
    return true;
  }
  constexpr int R = 4;
  const int64_t ld = 32 * p.Kw;
  std::vector<float> buf(static_cast<size_t>(R * ld));
  for (int64_t n = n0; n < n1; n += R) {
    const int64_t rows = std::min<int64_t>(R, n1 - n);
    for (int64_t r = 0; r < rows; ++r) {
      if (!row_ok(p, n + r)) { *bad = n + r; return false; }
      decode_row<VT, VB2>(p, n + r, buf.data() + r * ld);
    }
    if (rows == R) dense_rows<R>(p, buf.data(), ld, n);
    else for (int64_t r = 0; r < rows; ++r) dense_rows<1>(p, buf.data() + r * ld, ld, n + r);
  }
  return true;
}

bool has_avx512() {  // Skylake-SP and later: F + BW + VL + DQ
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("bmi2");
}
bool has_vbmi2() { return has_avx512() && __builtin_cpu_supports("avx512vbmi2"); }
#else
bool has_avx512() { return false; }
bool has_vbmi2() { return false; }
#endif

int64_t best_isa() { return has_vbmi2() ? kVbmi2 : has_avx512() ? kAvx512 : kScalar; }

using RowsFn = bool (*)(const Problem&, int64_t, int64_t, int64_t*);

template <int VT>
RowsFn pick(int64_t isa) {
#if RAREFY_X86
  if (isa == kVbmi2) return rows_vec<VT, true>;
  if (isa == kAvx512) return rows_vec<VT, false>;
#endif
  return rows_scalar<VT>;
}

// ----------------------------------------------------------------------------- op
at::Tensor bitmap_impl(const char* f, const at::Tensor& x, const at::Tensor& bitmask, const at::Tensor& values,
                       const at::Tensor& row_start, const at::Tensor* scale, int64_t k,
                       const c10::optional<at::Tensor>& bias, int64_t isa) {
  for (const at::Tensor* t : {&x, &bitmask, &values, &row_start})
    RAREFY_CHECK_VALUE(t->device().is_cpu(), f, "all tensors must be on the CPU, got ", t->device());
  RAREFY_CHECK_TYPE(x.scalar_type() == at::kFloat, f, "x must be float32, got ", x.scalar_type());
  RAREFY_CHECK_TYPE(bitmask.scalar_type() == at::kInt, f, "bitmask must be int32, got ", bitmask.scalar_type());
  RAREFY_CHECK_TYPE(row_start.scalar_type() == at::kInt, f, "row_start must be int32, got ", row_start.scalar_type());
  const auto vt = values.scalar_type();
  if (scale) {
    RAREFY_CHECK_TYPE(vt == at::kChar, f, "values must be int8, got ", vt);
  } else {
    RAREFY_CHECK_TYPE(vt == at::kHalf || vt == at::kBFloat16 || vt == at::kFloat, f,
                     "values must be float16, bfloat16 or float32, got ", vt);
  }
  RAREFY_CHECK_VALUE(k >= 0, f, "k must be >= 0, got ", k);
  RAREFY_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == k, f, "x must be [..., K] with K = k = ", k, ", got ", rarefy::shape_str(x));
  const int64_t Kw = (k + 31) / 32;
  RAREFY_CHECK_VALUE(bitmask.dim() == 2 && bitmask.size(1) == Kw, f, "bitmask must be [N, ceil(k/32)] = [N, ", Kw,
                    "], got ", rarefy::shape_str(bitmask));
  const int64_t N = bitmask.size(0);
  RAREFY_CHECK_VALUE(row_start.dim() == 1 && row_start.size(0) == N, f, "row_start must be [N] = [", N, "], got ",
                    rarefy::shape_str(row_start));
  RAREFY_CHECK_VALUE(x.is_contiguous() && bitmask.is_contiguous() && values.is_contiguous() &&
                        row_start.is_contiguous(), f, "x, bitmask, values and row_start must be contiguous");
  const float* sptr = nullptr;
  if (scale) {
    const at::Tensor& s = *scale;
    RAREFY_CHECK_VALUE(s.device().is_cpu(), f, "scale must be a CPU tensor");
    RAREFY_CHECK_TYPE(s.scalar_type() == at::kFloat, f, "scale must be float32, got ", s.scalar_type());
    RAREFY_CHECK_VALUE(s.numel() == N && s.is_contiguous(), f, "scale must be contiguous with N = ", N,
                      " elements (one per output row), got ", rarefy::shape_str(s));
    sptr = s.data_ptr<float>();
  }
  const float* bptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    RAREFY_CHECK_VALUE(b.device().is_cpu(), f, "bias must be a CPU tensor");
    RAREFY_CHECK_TYPE(b.scalar_type() == at::kFloat, f, "bias must be float32, got ", b.scalar_type());
    RAREFY_CHECK_VALUE(b.dim() == 1 && b.size(0) == N && b.is_contiguous(), f,
                      "bias must be contiguous [N] = [", N, "], got ", rarefy::shape_str(b));
    bptr = b.data_ptr<float>();
  }
  const int64_t best = best_isa();
  if (isa == kAuto) isa = best;
  RAREFY_CHECK_VALUE(isa >= kScalar && isa <= best, f, "isa ", isa, " not available on this CPU (best ", best, ")");

  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty(out_shape, x.options());
  if (M == 0 || N == 0) return y;
  const int64_t tail_bits = k - 32 * (Kw - 1);  // 1..32 when Kw > 0
  Problem p{x.data_ptr<float>(),
            reinterpret_cast<const uint32_t*>(bitmask.data_ptr<int32_t>()),
            static_cast<const uint8_t*>(values.data_ptr()),
            row_start.data_ptr<int32_t>(),
            bptr,
            sptr,
            y.data_ptr<float>(),
            M, N, k, Kw, values.numel(),
            tail_bits >= 32 ? 0xffffffffu : (1u << tail_bits) - 1u};
  const RowsFn rows = vt == at::kChar ? pick<kI8>(isa) : vt == at::kHalf ? pick<kF16>(isa)
                     : vt == at::kBFloat16 ? pick<kBF16>(isa) : pick<kF32>(isa);

  // A chunk gets >= ~48 KiB of weight (average row bytes), so small layers skip fork/join.
  const double row_bytes = 4.0 * Kw + static_cast<double>(values.nbytes()) / N;
  const int64_t grain = std::max<int64_t>(1, static_cast<int64_t>(48 * 1024 / std::max(1.0, row_bytes)));
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    int64_t b = -1;
    if (!rows(p, n0, n1, &b)) bad.store(b);
  });
  if (const int64_t n = bad.load(); n >= 0)
    RAREFY_CHECK_VALUE(false, f, "row ", n, " needs values[", p.rs[n], " : ", p.rs[n] + row_count(p, n),
                      "] but values has ", p.nvals, " elements (bad row_start or bitmask)");
  return y;
}

at::Tensor bitmap_matmul(const at::Tensor& x, const at::Tensor& bitmask, const at::Tensor& values,
                         const at::Tensor& row_start, int64_t k, const c10::optional<at::Tensor>& bias,
                         int64_t isa) {
  return bitmap_impl("bitmap_matmul: ", x, bitmask, values, row_start, nullptr, k, bias, isa);
}

// int8 values with one fp32 scale per output row: y[m, n] = scale[n] * sum_k x[m, k] q[n, k] (+ bias).
at::Tensor bitmap_matmul_int8(const at::Tensor& x, const at::Tensor& bitmask, const at::Tensor& values,
                              const at::Tensor& row_start, const at::Tensor& scale, int64_t k,
                              const c10::optional<at::Tensor>& bias, int64_t isa) {
  return bitmap_impl("bitmap_matmul_int8: ", x, bitmask, values, row_start, &scale, k, bias, isa);
}

}  // namespace

// Schemas here, the matmul kernels for the CPU key only: they then stay opaque to
// torch.compile, which traces them with the shape-only kernels registered in Python
// (rarefy/kernels/sparse_cpu/__init__.py) instead of calling into this code.
TORCH_LIBRARY(rarefy_sparse, m) {
  m.def("bitmap_matmul_int8(Tensor x, Tensor bitmask, Tensor values, Tensor row_start, Tensor scale, int k, "
        "Tensor? bias=None, int isa=-1) -> Tensor");
  m.def("bitmap_matmul(Tensor x, Tensor bitmask, Tensor values, Tensor row_start, int k, Tensor? bias=None, "
        "int isa=-1) -> Tensor");
  m.def("best_isa() -> int", &best_isa);
}

TORCH_LIBRARY_IMPL(rarefy_sparse, CPU, m) {
  m.impl("bitmap_matmul_int8", &bitmap_matmul_int8);
  m.impl("bitmap_matmul", &bitmap_matmul);
}
