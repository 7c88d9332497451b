// Low-bit weight GEMV / small-batch GEMM for CPU decode:
//   ternary_gemv  ternary weights in rarefy's 2-bit layout v1 (docs/lowbit-formats.md)
//   int8_gemv     weight-only int8, per output channel or per group of input columns
//   gguf_gemv     GGUF Q4_0 / Q4_1 / Q8_0 blocks read in place from the file's bytes
// y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]), x fp32 [M, K], y fp32 [M, N].
//
// All three run integer dot products on quantized activations, the way bitnet.cpp's I2_S and
// llama.cpp's Q8 paths do (Wang et al., arXiv:2410.16144; llama.cpp ggml-cpu quants): the
// weight bytes are unpacked in registers (shift + mask, no table) and multiplied against int8
// activations with AVX-512 VNNI vpdpbusd (u8 x s8 -> s32, four products per lane), or AVX2
// vpmaddubsw + vpmaddwd, or plain C++ (the portable path). docs/lowbit-kernels.md (CPU part)
// records why: on this CPU the table-lookup variants (T-MAC / bitnet.cpp TL: a per-quad table
// byte -> sum of four activations, scalar or with vpgatherdd) were ~18x slower than VNNI, and
// a bf16 path (vpmultishiftqb unpack + vdpbf16ps) ~5x slower (probe_ternary.cpp).
//
// Activations ("act modes"), chosen per call, quantized once per call on the calling thread:
//   fixed16 (ternary / int8 default): per row of x, q1 = round(x * 127/amax), and a second int8
//            plane q2 = round((x * 127/amax - q1) * 254): x ~ (q1 + q2/254) * amax/127, error
//            <= amax / 64516 per element. Two planes cost two dot products; weights are read once.
//   int8    (ternary / int8 with act_quant="int8"): BitNet's per-token absmax int8,
//            q = round(x * 127 / max(amax, 1e-5)) -- exactly rarefy's fake_quant_int8_per_token.
//   q8 block (GGUF): per block of 32, q = round(x * 127/amax_b), d = amax_b / 127 (llama.cpp's
//            Q8_0 / Q8_1 activations, kept in fp32).
// A row of x holding NaN or inf gives a NaN output row.
//
// Ternary / int8 weights are cut into "chunks" of 64 packed bytes (256 ternary columns, 64 int8
// columns). For ternary, sub-vector i = (byte >> 2i) & 3 holds columns 4j + i (j = byte), so the
// activations are stored per chunk as four 64-byte vectors X_i[j] = q[256c + 4j + i]: the
// vpdpbusd lane l then covers columns 256c + 16l .. +15. Codes are value + 1 (0..2), so
// sum (c - 1) q = sum c q - sum q; int8 weights are flipped to unsigned (w + 128) for vpdpbusd
// and 128 sum q is subtracted (AVX2 uses the sign trick instead). These corrections are
// precomputed per lane / per group of the activations.
//
// Scales: "segment" mode (per tensor, per channel, or groups spanning >= 4 chunks): the int32
// dot product of a whole group is reduced once and multiplied by its scale. "lane" mode (groups
// of >= 16 ternary / 4 int8 columns): each chunk's int32 lanes are converted and multiplied by
// a vector holding each lane's group scale. Other group sizes run the portable path.
//
// Work split: rows of W in blocks of 4, spread over torch's thread pool (at::parallel_for);
// inside a block every tile of rows of x runs while the block's weights are in L1/L2, so the
// weights come from memory once per call. Each output is summed by one thread in a fixed order.
// Vector code uses __attribute__((target)) so the library loads on any x86-64 and the path is
// picked at run time (isa argument: -1 best, 0 scalar, 1 AVX2, 2 AVX-512).

#include <ATen/Parallel.h>
#include "../rarefy_check.h"
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define RAREFY_X86 1
#include <immintrin.h>
#else
#define RAREFY_X86 0
#endif

namespace {

enum Isa : int64_t { kAuto = -1, kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
enum Act : int64_t { kFixed16 = 0, kInt8 = 1 };
enum Qt : int { kQ4_0 = 0, kQ4_1 = 1, kQ8_0 = 2 };

constexpr int64_t kRowBlock = 4;  // rows of W per work item (tiles of x reuse them from cache)
constexpr int64_t kPrefetchBytes = 8192;  // software prefetch distance in the weight stream

inline float h2f(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }
inline uint16_t ld16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
// The quantization multiplier 127 / amax, rounded as torch's `127.0 / amax` is (reciprocal,
// then times 127: two roundings), so that the int8 mode reproduces fake_quant_int8_per_token
// (and BitNet's activation_quant) bit for bit.
inline float act_scale(float amax) { return (1.f / amax) * 127.f; }
inline int8_t q8(float v) {  // round half to even (default FP environment), clamp to +-127
  float r = std::nearbyint(v);
  r = std::min(127.f, std::max(-127.f, r));
  return static_cast<int8_t>(r);
}

// 64-byte aligned scratch for the prepared activations, one per calling thread.
struct Arena {
  uint8_t* base;
  size_t off = 0;
  template <typename T>
  T* take(size_t count) {
    T* p = reinterpret_cast<T*>(base + off);
    off += (count * sizeof(T) + 63) & ~size_t(63);
    return p;
  }
};
uint8_t* scratch(size_t bytes) {
  thread_local std::vector<uint8_t> buf;
  if (buf.size() < bytes + 64) buf.resize(bytes + 64);
  const uintptr_t p = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<uint8_t*>((p + 63) & ~uintptr_t(63));
}
size_t up64(size_t b) { return (b + 63) & ~size_t(63); }

// ============================================================================ ternary / int8

struct Lin {
  const uint8_t* w;  // [N, kb]
  int64_t N, K, kb;  // kb: bytes per row
  bool ter;
  int64_t nch, chunkcols, lanecols;
  uint64_t tailmask;  // bytes of the last chunk inside the row
  int64_t pfd;        // software prefetch distance (bytes ahead in the weight stream, whole rows)
  // scales: element (n, g) at sc[n * sc_row + g]
  const void* sc;
  bool sc16;
  int64_t sc_row, G, ng;
  bool lane;
  int64_t S, nseg;        // segment mode: chunks per segment, segments per row
  const int32_t* lidx;    // lane mode: [nch][16] lane -> group offset from the chunk's first group
  // activations: P virtual rows (M rows x planes), p = m * planes + plane
  int64_t M, P, planes;
  const int8_t* xq;       // [P][xstride] chunk-arranged
  int64_t xstride;
  const int8_t* xn;       // [P][xnstride] natural order
  int64_t xnstride;
  const int32_t* lcorr;   // [P][nch][16]
  const int64_t* gcorr;   // [P][nseg]
  const float* dq;        // [P] plane weight (NaN for rows of x with NaN/inf)
  const float* bias;
  float* y;
};

inline float scale_at(const Lin& L, int64_t n, int64_t g) {
  const int64_t i = n * L.sc_row + g;
  return L.sc16 ? h2f(static_cast<const uint16_t*>(L.sc)[i]) : static_cast<const float*>(L.sc)[i];
}

// Combine the planes of each row of x and write y (rows n >= N are dropped).
template <int R, int PT>
inline void lin_store(const Lin& L, int64_t n0, int64_t p0, const float (&F)[R][PT]) {
  for (int r = 0; r < R; ++r) {
    const int64_t n = n0 + r;
    if (n >= L.N) break;
    const float b = L.bias ? L.bias[n] : 0.f;
    for (int pp = 0; pp < PT; pp += static_cast<int>(L.planes)) {
      const int64_t p = p0 + pp;
      float v = L.dq[p] * F[r][pp];
      if (L.planes == 2) v += L.dq[p + 1] * F[r][pp + 1];
      L.y[(p / L.planes) * L.N + n] = v + b;
    }
  }
}

// ----------------------------------------------------------------------------- scalar
void lin_rows_scalar(const Lin& L, int64_t n0, int64_t n1) {
  const int64_t G = L.G;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = L.w + n * L.kb;
    for (int64_t p = 0; p < L.P; p += L.planes) {
      float acc[2] = {0.f, 0.f};
      for (int64_t pl = 0; pl < L.planes; ++pl) {
        const int8_t* x = L.xn + (p + pl) * L.xnstride;
        float F = 0.f;
        for (int64_t g = 0, k0 = 0; k0 < L.K; ++g, k0 += G) {
          const int64_t k1 = std::min(L.K, k0 + G);
          int64_t T = 0;
          if (L.ter) {
            for (int64_t k = k0; k < k1; ++k) T += ((((w[k >> 2] >> (2 * (k & 3))) & 3)) - 1) * x[k];
          } else {
            const int8_t* ws = reinterpret_cast<const int8_t*>(w);
            for (int64_t k = k0; k < k1; ++k) T += ws[k] * x[k];
          }
          F += scale_at(L, n, g) * static_cast<float>(T);
        }
        acc[pl] = F;
      }
      float v = L.dq[p] * acc[0];
      if (L.planes == 2) v += L.dq[p + 1] * acc[1];
      L.y[(p / L.planes) * L.N + n] = v + (L.bias ? L.bias[n] : 0.f);
    }
  }
}

#if RAREFY_X86
#define RF_UNROLL _Pragma("GCC unroll 16")
#define RF_512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,f16c,fma,bmi2")))
#define RF_256 __attribute__((target("avx2,fma,f16c,bmi2")))

// (inline asm: GCC 12 dropped _mm_prefetch from the inlined tile loops, together with the flag
// that guards it; an asm statement cannot be dropped)
inline void prefetch(const void* a) { asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(a))); }

// ----------------------------------------------------------------------------- AVX-512 (VNNI)
// One chunk of R weight rows, unpacked to unsigned bytes: ternary -> 4 vectors of codes 0..2,
// int8 -> 1 vector of w + 128. With pf, also prefetch the next row block at the same offset.
template <bool TER, int R>
RF_512 __attribute__((always_inline)) inline void unpack512(const Lin& L, const uint8_t* const (&wr)[R], int64_t c,
                                                            bool pf, __m512i (&u)[R][TER ? 4 : 1]) {
  const __m512i m3 = _mm512_set1_epi8(3);
  RF_UNROLL for (int r = 0; r < R; ++r) {
    const uint8_t* a = wr[r] + 64 * c;
    if (pf) prefetch(a + L.pfd);
    const __m512i v = (c == L.nch - 1) ? _mm512_maskz_loadu_epi8(L.tailmask, a) : _mm512_loadu_si512(a);
    if constexpr (TER) {
      u[r][0] = _mm512_and_si512(v, m3);
      u[r][1] = _mm512_and_si512(_mm512_srli_epi16(v, 2), m3);
      u[r][2] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m3);
      u[r][3] = _mm512_and_si512(_mm512_srli_epi16(v, 6), m3);
    } else {
      u[r][0] = _mm512_xor_si512(v, _mm512_set1_epi8(static_cast<char>(0x80)));
    }
  }
}

// Segment mode: int32 dot products over whole segments (flushed to int64 every 128 chunks),
// one scale per segment. NA = 2 splits the ternary sub-vectors over two accumulators to halve
// the vpdpbusd dependency chains when the tile is small.
template <bool TER, int R, int PT>
RF_512 void seg_tile512(const Lin& L, int64_t n0, int64_t p0, bool pf) {
  constexpr int SUB = TER ? 4 : 1;
  constexpr int NA = (TER && R * PT <= 4) ? 2 : 1;
  const uint8_t* wr[R];
  RF_UNROLL for (int r = 0; r < R; ++r) wr[r] = L.w + std::min(n0 + r, L.N - 1) * L.kb;
  float F[R][PT] = {};
  for (int64_t g = 0; g < L.nseg; ++g) {
    const int64_t c0 = g * L.S, c1 = std::min(c0 + L.S, L.nch);
    int64_t T[R][PT] = {};
    for (int64_t cb = c0; cb < c1; cb += 128) {
      const int64_t ce = std::min(cb + 128, c1);
      __m512i acc[NA][R][PT];
      RF_UNROLL for (int a = 0; a < NA; ++a) RF_UNROLL for (int r = 0; r < R; ++r) RF_UNROLL for (int pp = 0; pp < PT; ++pp)
          acc[a][r][pp] = _mm512_setzero_si512();
      for (int64_t c = cb; c < ce; ++c) {
        __m512i u[R][SUB];
        unpack512<TER, R>(L, wr, c, pf, u);
        RF_UNROLL for (int pp = 0; pp < PT; ++pp) {
          const int8_t* X = L.xq + (p0 + pp) * L.xstride + c * 64 * SUB;
          RF_UNROLL for (int i = 0; i < SUB; ++i) {
            const __m512i xv = _mm512_load_si512(X + 64 * i);
            RF_UNROLL for (int r = 0; r < R; ++r) acc[i % NA][r][pp] = _mm512_dpbusd_epi32(acc[i % NA][r][pp], u[r][i], xv);
          }
        }
      }
      RF_UNROLL for (int r = 0; r < R; ++r) RF_UNROLL for (int pp = 0; pp < PT; ++pp) {
        __m512i s = acc[0][r][pp];
        if constexpr (NA == 2) s = _mm512_add_epi32(s, acc[1][r][pp]);
        T[r][pp] += _mm512_reduce_add_epi32(s);
      }
    }
    RF_UNROLL for (int r = 0; r < R; ++r) {
      const float s = scale_at(L, std::min(n0 + r, L.N - 1), g);
      RF_UNROLL for (int pp = 0; pp < PT; ++pp)
        F[r][pp] += s * static_cast<float>(T[r][pp] + L.gcorr[(p0 + pp) * L.nseg + g]);
    }
  }
  lin_store<R, PT>(L, n0, p0, F);
}

// Sums of the 16 int32 lanes of each of v[0..3], as 4 int64 (one shuffle tree instead of four
// reductions: decode rows are short, so per-row reductions weigh as much as the dot products).
RF_512 __attribute__((always_inline)) inline void hsum4_512(const __m512i (&v)[4], int64_t (&out)[4]) {
  const __m512i t01 = _mm512_add_epi32(_mm512_shuffle_i32x4(v[0], v[1], 0x44), _mm512_shuffle_i32x4(v[0], v[1], 0xEE));
  const __m512i t23 = _mm512_add_epi32(_mm512_shuffle_i32x4(v[2], v[3], 0x44), _mm512_shuffle_i32x4(v[2], v[3], 0xEE));
  __m512i u = _mm512_add_epi32(_mm512_shuffle_i32x4(t01, t23, 0x88), _mm512_shuffle_i32x4(t01, t23, 0xDD));
  u = _mm512_add_epi32(u, _mm512_shuffle_epi32(u, _MM_PERM_BADC));
  u = _mm512_add_epi32(u, _mm512_shuffle_epi32(u, _MM_PERM_CDAB));
  alignas(64) int32_t b[16];
  _mm512_store_si512(b, u);
  RF_UNROLL for (int r = 0; r < 4; ++r) out[r] = b[4 * r];
}

// Ternary, one row of x (P = planes virtual rows), one segment per row (per tensor, or one scale
// per row as fuse_lowbit stacks them), at most 128 chunks (no int32 flush): 8 rows of W at a
// time (rows n0 .. min(n0 + 8, nend) are written); the two planes of fixed16 are combined in
// int32 (254 * a1 + a2, |.| < 2^31 for <= 128 chunks) before a shared reduction of 4 rows.
template <int PL>
RF_512 void ter_row1_tile512(const Lin& L, int64_t n0, int64_t nend, bool pf) {
  constexpr int R = 8;
  const __m512i m3 = _mm512_set1_epi8(3);
  const uint8_t* wr[R];
  RF_UNROLL for (int r = 0; r < R; ++r) wr[r] = L.w + std::min(n0 + r, L.N - 1) * L.kb;
  __m512i acc[PL][R];
  RF_UNROLL for (int a = 0; a < PL; ++a) RF_UNROLL for (int r = 0; r < R; ++r) acc[a][r] = _mm512_setzero_si512();
  for (int64_t c = 0; c < L.nch; ++c) {
    __m512i v[R];
    const bool tail = c == L.nch - 1;
    RF_UNROLL for (int r = 0; r < R; ++r) {
      const uint8_t* a = wr[r] + 64 * c;
      if (pf) prefetch(a + L.pfd);
      v[r] = tail ? _mm512_maskz_loadu_epi8(L.tailmask, a) : _mm512_loadu_si512(a);
    }
    RF_UNROLL for (int i = 0; i < 4; ++i) {
      __m512i xv[PL];
      RF_UNROLL for (int pl = 0; pl < PL; ++pl) xv[pl] = _mm512_load_si512(L.xq + pl * L.xstride + c * 256 + 64 * i);
      RF_UNROLL for (int r = 0; r < R; ++r) {
        const __m512i u = _mm512_and_si512(i ? _mm512_srli_epi16(v[r], 2 * i) : v[r], m3);
        RF_UNROLL for (int pl = 0; pl < PL; ++pl) acc[pl][r] = _mm512_dpbusd_epi32(acc[pl][r], u, xv[pl]);
      }
    }
  }
  __m512i t[2][4];
  RF_UNROLL for (int r = 0; r < R; ++r) {
    if constexpr (PL == 2) t[r / 4][r % 4] = _mm512_add_epi32(_mm512_mullo_epi32(acc[0][r], _mm512_set1_epi32(254)), acc[1][r]);
    else t[r / 4][r % 4] = acc[0][r];
  }
  int64_t T[2][4];
  hsum4_512(t[0], T[0]);
  hsum4_512(t[1], T[1]);
  const int64_t g = PL == 2 ? 254 * L.gcorr[0] + L.gcorr[1] : L.gcorr[0];
  const float d = L.dq[PL - 1];  // fixed16: d/254 multiplies 254 * (q1 part) + (q2 part)
  RF_UNROLL for (int r = 0; r < R; ++r) {
    const int64_t n = n0 + r;
    if (n >= nend) break;
    const float v = d * (scale_at(L, n, 0) * static_cast<float>(T[r / 4][r % 4] + g));
    L.y[n] = L.bias ? v + L.bias[n] : v;
  }
}

// The 16 lane scales of chunk c of row n (lane mode).
RF_512 __attribute__((always_inline)) inline __m512 lane_scales512(const Lin& L, int64_t n, int64_t c) {
  const int64_t g0 = (c * L.chunkcols) / L.G;
  const int64_t cnt = std::min<int64_t>(16, L.ng - g0);
  const __mmask16 m = static_cast<__mmask16>(_bzhi_u32(0xffffu, static_cast<unsigned>(cnt)));
  const int64_t i = n * L.sc_row + g0;
  const __m512 v = L.sc16 ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(L.sc) + i))
                          : _mm512_maskz_loadu_ps(m, static_cast<const float*>(L.sc) + i);
  return _mm512_permutexvar_ps(_mm512_load_si512(L.lidx + 16 * c), v);
}

// Lane mode: per chunk, int32 lanes (started at the activation correction) -> fp32 * lane scale.
template <bool TER, int R, int PT>
RF_512 void lane_tile512(const Lin& L, int64_t n0, int64_t p0, bool pf) {
  constexpr int SUB = TER ? 4 : 1;
  const uint8_t* wr[R];
  int64_t nr[R];
  RF_UNROLL for (int r = 0; r < R; ++r) {
    nr[r] = std::min(n0 + r, L.N - 1);
    wr[r] = L.w + nr[r] * L.kb;
  }
  __m512 F[R][PT];
  RF_UNROLL for (int r = 0; r < R; ++r) RF_UNROLL for (int pp = 0; pp < PT; ++pp) F[r][pp] = _mm512_setzero_ps();
  for (int64_t c = 0; c < L.nch; ++c) {
    __m512i u[R][SUB];
    unpack512<TER, R>(L, wr, c, pf, u);
    __m512 ls[R];
    RF_UNROLL for (int r = 0; r < R; ++r) ls[r] = lane_scales512(L, nr[r], c);
    RF_UNROLL for (int pp = 0; pp < PT; ++pp) {
      const int8_t* X = L.xq + (p0 + pp) * L.xstride + c * 64 * SUB;
      const __m512i corr = _mm512_load_si512(L.lcorr + ((p0 + pp) * L.nch + c) * 16);
      __m512i acc[R];
      RF_UNROLL for (int r = 0; r < R; ++r) acc[r] = corr;
      RF_UNROLL for (int i = 0; i < SUB; ++i) {
        const __m512i xv = _mm512_load_si512(X + 64 * i);
        RF_UNROLL for (int r = 0; r < R; ++r) acc[r] = _mm512_dpbusd_epi32(acc[r], u[r][i], xv);
      }
      RF_UNROLL for (int r = 0; r < R; ++r) F[r][pp] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r]), ls[r], F[r][pp]);
    }
  }
  float f[R][PT];
  RF_UNROLL for (int r = 0; r < R; ++r) RF_UNROLL for (int pp = 0; pp < PT; ++pp) f[r][pp] = _mm512_reduce_add_ps(F[r][pp]);
  lin_store<R, PT>(L, n0, p0, f);
}

// ----------------------------------------------------------------------------- AVX2
// The same chunks, as two 32-byte halves. Ternary: vpmaddubsw of codes (0..2) x int8 activations
// (pairs <= 508, four sub-vectors summed in int16 <= 2032), then vpmaddwd with ones. int8 weights:
// the sign trick, maddubs(|w|, sign(x, w)) (pairs <= 32258), so no correction term.
template <bool TER, int R>
RF_256 __attribute__((always_inline)) inline void unpack256(const Lin& L, const uint8_t* const (&wr)[R], int64_t c,
                                                            bool pf, __m256i (&u)[R][2][TER ? 4 : 1],
                                                            __m256i (&raw)[R][2]) {
  const __m256i m3 = _mm256_set1_epi8(3);
  RF_UNROLL for (int r = 0; r < R; ++r) {
    const uint8_t* a = wr[r] + 64 * c;
    if (pf) prefetch(a + L.pfd);
    __m256i v[2];
    if (c == L.nch - 1 && L.tailmask != ~uint64_t(0)) {
      alignas(64) uint8_t buf[64] = {0};
      std::memcpy(buf, a, static_cast<size_t>(__builtin_popcountll(L.tailmask)));
      v[0] = _mm256_load_si256(reinterpret_cast<const __m256i*>(buf));
      v[1] = _mm256_load_si256(reinterpret_cast<const __m256i*>(buf + 32));
    } else {
      v[0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
      v[1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 32));
    }
    RF_UNROLL for (int h = 0; h < 2; ++h) {
      raw[r][h] = v[h];
      if constexpr (TER) {
        u[r][h][0] = _mm256_and_si256(v[h], m3);
        u[r][h][1] = _mm256_and_si256(_mm256_srli_epi16(v[h], 2), m3);
        u[r][h][2] = _mm256_and_si256(_mm256_srli_epi16(v[h], 4), m3);
        u[r][h][3] = _mm256_and_si256(_mm256_srli_epi16(v[h], 6), m3);
      } else {
        u[r][h][0] = _mm256_abs_epi8(v[h]);
      }
    }
  }
}

// int32 lanes (8) of half h of a chunk for one weight row against one virtual row.
template <bool TER>
RF_256 __attribute__((always_inline)) inline __m256i dot_half256(const __m256i (&u)[TER ? 4 : 1], __m256i raw,
                                                                 const int8_t* X, int h) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i s;
  if constexpr (TER) {
    s = _mm256_maddubs_epi16(u[0], _mm256_load_si256(reinterpret_cast<const __m256i*>(X + 32 * h)));
    RF_UNROLL for (int i = 1; i < 4; ++i)
      s = _mm256_add_epi16(s, _mm256_maddubs_epi16(u[i], _mm256_load_si256(reinterpret_cast<const __m256i*>(X + 64 * i + 32 * h))));
  } else {
    const __m256i xv = _mm256_load_si256(reinterpret_cast<const __m256i*>(X + 32 * h));
    s = _mm256_maddubs_epi16(u[0], _mm256_sign_epi8(xv, raw));
  }
  return _mm256_madd_epi16(s, ones);
}

RF_256 inline int64_t hsum256_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}
RF_256 inline float hsum256_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <bool TER, int R, int PT>
RF_256 void seg_tile256(const Lin& L, int64_t n0, int64_t p0, bool pf) {
  constexpr int SUB = TER ? 4 : 1;
  const uint8_t* wr[R];
  RF_UNROLL for (int r = 0; r < R; ++r) wr[r] = L.w + std::min(n0 + r, L.N - 1) * L.kb;
  float F[R][PT] = {};
  for (int64_t g = 0; g < L.nseg; ++g) {
    const int64_t c0 = g * L.S, c1 = std::min(c0 + L.S, L.nch);
    int64_t T[R][PT] = {};
    for (int64_t cb = c0; cb < c1; cb += 128) {
      const int64_t ce = std::min(cb + 128, c1);
      __m256i acc[R][PT];
      RF_UNROLL for (int r = 0; r < R; ++r) RF_UNROLL for (int pp = 0; pp < PT; ++pp) acc[r][pp] = _mm256_setzero_si256();
      for (int64_t c = cb; c < ce; ++c) {
        __m256i u[R][2][SUB], raw[R][2];
        unpack256<TER, R>(L, wr, c, pf, u, raw);
        RF_UNROLL for (int pp = 0; pp < PT; ++pp) {
          const int8_t* X = L.xq + (p0 + pp) * L.xstride + c * 64 * SUB;
          RF_UNROLL for (int r = 0; r < R; ++r) RF_UNROLL for (int h = 0; h < 2; ++h)
            acc[r][pp] = _mm256_add_epi32(acc[r][pp], dot_half256<TER>(u[r][h], raw[r][h], X, h));
        }
      }
      RF_UNROLL for (int r = 0; r < R; ++r) RF_UNROLL for (int pp = 0; pp < PT; ++pp) T[r][pp] += hsum256_epi32(acc[r][pp]);
    }
    RF_UNROLL for (int r = 0; r < R; ++r) {
      const float s = scale_at(L, std::min(n0 + r, L.N - 1), g);
      RF_UNROLL for (int pp = 0; pp < PT; ++pp)
        F[r][pp] += s * static_cast<float>(T[r][pp] + L.gcorr[(p0 + pp) * L.nseg + g]);
    }
  }
  lin_store<R, PT>(L, n0, p0, F);
}

template <bool TER, int R, int PT>
RF_256 void lane_tile256(const Lin& L, int64_t n0, int64_t p0, bool pf) {
  constexpr int SUB = TER ? 4 : 1;
  const uint8_t* wr[R];
  int64_t nr[R];
  RF_UNROLL for (int r = 0; r < R; ++r) {
    nr[r] = std::min(n0 + r, L.N - 1);
    wr[r] = L.w + nr[r] * L.kb;
  }
  __m256 F[R][PT];
  RF_UNROLL for (int r = 0; r < R; ++r) RF_UNROLL for (int pp = 0; pp < PT; ++pp) F[r][pp] = _mm256_setzero_ps();
  for (int64_t c = 0; c < L.nch; ++c) {
    __m256i u[R][2][SUB], raw[R][2];
    unpack256<TER, R>(L, wr, c, pf, u, raw);
    __m256 ls[R][2];
    const int64_t g0 = (c * L.chunkcols) / L.G;
    RF_UNROLL for (int r = 0; r < R; ++r) {
      alignas(32) float s[16];
      for (int l = 0; l < 16; ++l) s[l] = scale_at(L, nr[r], g0 + L.lidx[16 * c + l]);
      ls[r][0] = _mm256_load_ps(s);
      ls[r][1] = _mm256_load_ps(s + 8);
    }
    RF_UNROLL for (int pp = 0; pp < PT; ++pp) {
      const int8_t* X = L.xq + (p0 + pp) * L.xstride + c * 64 * SUB;
      const int32_t* corr = L.lcorr + ((p0 + pp) * L.nch + c) * 16;
      RF_UNROLL for (int h = 0; h < 2; ++h) {
        const __m256i cv = _mm256_load_si256(reinterpret_cast<const __m256i*>(corr + 8 * h));
        RF_UNROLL for (int r = 0; r < R; ++r) {
          const __m256i a = _mm256_add_epi32(cv, dot_half256<TER>(u[r][h], raw[r][h], X, h));
          F[r][pp] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), ls[r][h], F[r][pp]);
        }
      }
    }
  }
  float f[R][PT];
  RF_UNROLL for (int r = 0; r < R; ++r) RF_UNROLL for (int pp = 0; pp < PT; ++pp) f[r][pp] = hsum256_ps(F[r][pp]);
  lin_store<R, PT>(L, n0, p0, f);
}

bool has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi") &&
         __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
}
bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
         __builtin_cpu_supports("bmi2");
}
#else
bool has_avx512() { return false; }
bool has_avx2() { return false; }
#endif

int64_t best_isa() { return has_avx512() ? kAvx512 : has_avx2() ? kAvx2 : kScalar; }

// ----------------------------------------------------------------------------- activation quantization
// max |x[0..n)| and whether every element is finite; quantize with round-half-to-even and clamp
// to +-127: q1 = round(x * s), and (q2 != nullptr) q2 = round((x * s - q1) * 254). The vector
// versions do the same IEEE operations as the scalar one (mul, round to nearest even), so all
// paths produce identical bytes -- and the same bytes as the torch mirror in ref.py.
float row_amax_scalar(const float* x, int64_t n, bool* finite) {
  float amax = 0.f;
  bool fin = true;
  for (int64_t k = 0; k < n; ++k) {
    const float a = std::fabs(x[k]);
    fin &= std::isfinite(a);
    amax = std::max(amax, a);
  }
  *finite = fin;
  return amax;
}
void row_quant_scalar(const float* x, int64_t n, float s, int8_t* q1, int8_t* q2) {
  for (int64_t k = 0; k < n; ++k) {
    const float t = x[k] * s;
    const float r1 = std::min(127.f, std::max(-127.f, std::nearbyint(t)));
    q1[k] = static_cast<int8_t>(r1);
    if (q2) q2[k] = q8((t - r1) * 254.f);
  }
}
#if RAREFY_X86
RF_512 float row_amax512(const float* x, int64_t n, bool* finite) {
  __m512 mx = _mm512_setzero_ps();
  __mmask16 ok = 0xffff;
  const __m512 big = _mm512_set1_ps(std::numeric_limits<float>::max());
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 m = static_cast<__mmask16>(_bzhi_u32(0xffffu, static_cast<unsigned>(std::min<int64_t>(16, n - k))));
    const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(m, x + k));
    ok &= _mm512_cmp_ps_mask(a, big, _CMP_LE_OQ);
    mx = _mm512_max_ps(mx, a);
  }
  *finite = ok == 0xffff;
  return _mm512_reduce_max_ps(mx);
}
RF_512 void row_quant512(const float* x, int64_t n, float s, int8_t* q1, int8_t* q2) {
  const __m512 sv = _mm512_set1_ps(s), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  const __m512 f254 = _mm512_set1_ps(254.f);
  constexpr int R = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 m = static_cast<__mmask16>(_bzhi_u32(0xffffu, static_cast<unsigned>(std::min<int64_t>(16, n - k))));
    const __m512 t = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + k), sv);
    const __m512 r1 = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_roundscale_ps(t, R)));
    _mm_mask_storeu_epi8(q1 + k, m, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r1)));
    if (q2) {
      const __m512 r2 = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(t, r1), f254), R);
      _mm_mask_storeu_epi8(q2 + k, m, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(lo, r2)))));
    }
  }
}
RF_256 __attribute__((always_inline)) inline __m128i pack16_256(__m256 a, __m256 b) {  // 16 fp32 (integral) -> int8
  const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(_mm256_cvtps_epi32(a), _mm256_cvtps_epi32(b)), _mm256_setzero_si256());
  return _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 3, 6, 7)));
}
RF_256 float row_amax256(const float* x, int64_t n, bool* finite) {
  __m256 mx = _mm256_setzero_ps();
  int ok = 0xff;
  const __m256 big = _mm256_set1_ps(std::numeric_limits<float>::max());
  const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 a = _mm256_and_ps(_mm256_loadu_ps(x + k), absm);
    ok &= _mm256_movemask_ps(_mm256_cmp_ps(a, big, _CMP_LE_OQ));
    mx = _mm256_max_ps(mx, a);
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, mx);
  bool fin = ok == 0xff;
  float amax = row_amax_scalar(x + k, n - k, finite);
  *finite = *finite && fin;
  for (int i = 0; i < 8; ++i) amax = std::max(amax, t[i]);
  return amax;
}
RF_256 void row_quant256(const float* x, int64_t n, float s, int8_t* q1, int8_t* q2) {
  const __m256 sv = _mm256_set1_ps(s), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  const __m256 f254 = _mm256_set1_ps(254.f);
  constexpr int R = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    __m256 t[2], r1[2];
    for (int h = 0; h < 2; ++h) {
      t[h] = _mm256_mul_ps(_mm256_loadu_ps(x + k + 8 * h), sv);
      r1[h] = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_round_ps(t[h], R)));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q1 + k), pack16_256(r1[0], r1[1]));
    if (q2) {
      __m256 r2[2];
      for (int h = 0; h < 2; ++h)
        r2[h] = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(t[h], r1[h]), f254), R)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q2 + k), pack16_256(r2[0], r2[1]));
    }
  }
  row_quant_scalar(x + k, n - k, s, q1 + k, q2 ? q2 + k : nullptr);
}
#endif
float row_amax(const float* x, int64_t n, bool* finite, int64_t isa) {
#if RAREFY_X86
  if (isa == kAvx512) return row_amax512(x, n, finite);
  if (isa == kAvx2) return row_amax256(x, n, finite);
#endif
  return row_amax_scalar(x, n, finite);
}
void row_quant(const float* x, int64_t n, float s, int8_t* q1, int8_t* q2, int64_t isa) {
#if RAREFY_X86
  if (isa == kAvx512) return row_quant512(x, n, s, q1, q2);
  if (isa == kAvx2) return row_quant256(x, n, s, q1, q2);
#endif
  row_quant_scalar(x, n, s, q1, q2);
}

#if RAREFY_X86
// A row block of up to 4 rows of W against all P virtual rows, in tiles of 8/4/2/1 virtual rows
// (pairs of planes stay in one tile). Only the first tile streams (and prefetches) the weights.
template <bool TER, bool LANE, bool V512>
void lin_block(const Lin& L, int64_t n0) {
  int64_t p = 0;
  bool first = true;
  auto run = [&](auto R_, auto PT_) {
    constexpr int R = decltype(R_)::value, PT = decltype(PT_)::value;
    for (int64_t r = 0; r < kRowBlock; r += R) {
      if (n0 + r >= L.N) break;
      if constexpr (V512) {
        if constexpr (LANE) lane_tile512<TER, R, PT>(L, n0 + r, p, first);
        else seg_tile512<TER, R, PT>(L, n0 + r, p, first);
      } else {
        if constexpr (LANE) lane_tile256<TER, R, PT>(L, n0 + r, p, first);
        else seg_tile256<TER, R, PT>(L, n0 + r, p, first);
      }
    }
    first = false;
    p += PT;
  };
  using I1 = std::integral_constant<int, 1>;
  using I2 = std::integral_constant<int, 2>;
  using I4 = std::integral_constant<int, 4>;
  using I8 = std::integral_constant<int, 8>;
  while (L.P - p >= 8) run(I1{}, I8{});
  if (L.P - p >= 4) {
    if constexpr (LANE) run(I1{}, I4{});
    else run(I2{}, I4{});
  }
  if (L.P - p >= 2) {
    if constexpr (LANE) run(I2{}, I2{});
    else run(I4{}, I2{});
  }
  if (L.P - p >= 1) {
    if constexpr (LANE) run(I2{}, I1{});
    else run(I4{}, I1{});
  }
}
#endif

// ----------------------------------------------------------------------------- activations
// Per chunk: ternary activations rearranged as X_i[j] = q[256c + 4j + i] (the column of bits
// 2i..2i+1 of packed byte j), and the lane corrections -off * (sum of q over each vpdpbusd lane:
// 16 columns for ternary, 4 for int8).
void arrange_scalar(const int8_t* q, int8_t* xq, int32_t* lcorr, int64_t nch, int32_t off, bool ter) {
  const int64_t lc = ter ? 16 : 4;
  for (int64_t c = 0; c < nch; ++c) {
    if (ter)
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 64; ++j) xq[c * 256 + 64 * i + j] = q[c * 256 + 4 * j + i];
    for (int64_t l = 0; l < 16; ++l) {
      int32_t s = 0;
      for (int64_t t = 0; t < lc; ++t) s += q[(c * 16 + l) * lc + t];
      lcorr[c * 16 + l] = -off * s;
    }
  }
}
#if RAREFY_X86
RF_512 void arrange512(const int8_t* q, int8_t* xq, int32_t* lcorr, int64_t nch, int32_t off, bool ter) {
  alignas(64) uint8_t d[64];
  for (int t = 0; t < 64; ++t) d[t] = static_cast<uint8_t>(4 * (t % 16) + t / 16);  // 16 bytes of each column class
  const __m512i D = _mm512_load_si512(d), ones = _mm512_set1_epi8(1), neg = _mm512_set1_epi32(-off);
  for (int64_t c = 0; c < nch; ++c) {
    __m512i s = _mm512_setzero_si512();
    if (ter) {
      __m512i B[4];
      for (int k = 0; k < 4; ++k) B[k] = _mm512_permutexvar_epi8(D, _mm512_load_si512(q + 256 * c + 64 * k));
      const __m512i T0 = _mm512_shuffle_i64x2(B[0], B[1], 0x44), T1 = _mm512_shuffle_i64x2(B[0], B[1], 0xEE);
      const __m512i T2 = _mm512_shuffle_i64x2(B[2], B[3], 0x44), T3 = _mm512_shuffle_i64x2(B[2], B[3], 0xEE);
      const __m512i X[4] = {_mm512_shuffle_i64x2(T0, T2, 0x88), _mm512_shuffle_i64x2(T0, T2, 0xDD),
                            _mm512_shuffle_i64x2(T1, T3, 0x88), _mm512_shuffle_i64x2(T1, T3, 0xDD)};
      for (int i = 0; i < 4; ++i) {
        _mm512_store_si512(xq + 256 * c + 64 * i, X[i]);
        s = _mm512_dpbusd_epi32(s, ones, X[i]);  // lane l: columns 16l..16l+15 over the four X_i
      }
    } else {
      s = _mm512_dpbusd_epi32(s, ones, _mm512_load_si512(q + 64 * c));
    }
    _mm512_store_si512(lcorr + 16 * c, _mm512_mullo_epi32(s, neg));
  }
}
#endif
void arrange(const int8_t* q, int8_t* xq, int32_t* lcorr, int64_t nch, int32_t off, bool ter, int64_t isa) {
#if RAREFY_X86
  if (isa == kAvx512) return arrange512(q, xq, lcorr, nch, off, ter);
#endif
  arrange_scalar(q, xq, lcorr, nch, off, ter);
}

// Quantize x (M rows) into P = M * planes virtual rows: natural order (xn) and chunk-arranged
// (xq), lane and segment corrections (-off * sums of q), plane weights dq.
void lin_prep(Lin& L, const float* x, int64_t act, int64_t off, int64_t isa, Arena& A) {
  const int64_t K = L.K, M = L.M, P = L.P, SUB = L.ter ? 4 : 1;
  const int64_t kpad = L.nch * L.chunkcols;
  L.xnstride = kpad;
  L.xstride = L.nch * 64 * SUB;  // = kpad
  int8_t* xn = A.take<int8_t>(P * kpad);
  int8_t* xq = L.ter ? A.take<int8_t>(P * kpad) : xn;
  int32_t* lcorr = A.take<int32_t>(P * L.nch * 16);
  int64_t* gcorr = A.take<int64_t>(P * std::max<int64_t>(1, L.nseg));
  float* dq = A.take<float>(P);
  L.xn = xn, L.xq = xq, L.lcorr = lcorr, L.gcorr = gcorr, L.dq = dq;
  at::parallel_for(0, M, 4, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = x + m * K;
      bool finite = true;
      const float amax = row_amax(xr, K, &finite, isa);
      for (int64_t pl = 0; pl < L.planes; ++pl) std::memset(xn + (m * L.planes + pl) * kpad, 0, kpad);
      const float nan = std::numeric_limits<float>::quiet_NaN();
      if (act == kInt8) {
        const float s = act_scale(std::max(amax, 1e-5f));
        if (finite) row_quant(xr, K, s, xn + m * kpad, nullptr, isa);
        dq[m] = finite ? static_cast<float>(1.0 / static_cast<double>(s)) : nan;
      } else {
        const float s = amax > 0.f ? act_scale(amax) : 0.f;
        if (finite && amax > 0.f) row_quant(xr, K, s, xn + 2 * m * kpad, xn + (2 * m + 1) * kpad, isa);
        const double d = amax > 0.f ? 1.0 / static_cast<double>(s) : 0.0;
        dq[2 * m] = finite ? static_cast<float>(d) : nan;
        dq[2 * m + 1] = finite ? static_cast<float>(d / 254.0) : nan;
      }
      for (int64_t pl = 0; pl < L.planes; ++pl) {
        const int64_t p = m * L.planes + pl;
        const int8_t* q = xn + p * kpad;
        int32_t* lr = lcorr + p * L.nch * 16;
        arrange(q, L.ter ? xq + p * kpad : nullptr, lr, L.nch, static_cast<int32_t>(off), L.ter, isa);
        for (int64_t g = 0; g < L.nseg; ++g) {
          int64_t s = 0;
          for (int64_t l = g * L.S * 16; l < std::min(L.nch, (g + 1) * L.S) * 16; ++l) s += lr[l];
          gcorr[p * L.nseg + g] = s;
        }
      }
    }
  });
}

// Scale layout and mode of a call (see the header): fills sc_row/G/ng/lane/S/nseg/lidx.
// Returns false if only the portable path handles this group size.
bool lin_mode(Lin& L, int64_t group_size, int64_t scale_rows, Arena& A) {
  L.lidx = nullptr;
  if (group_size <= 0) {  // per tensor (ternary) or per output channel (int8)
    L.G = std::max<int64_t>(L.K, 1), L.ng = 1, L.sc_row = scale_rows == 1 ? 0 : 1;
    L.lane = false, L.S = std::max<int64_t>(L.nch, 1), L.nseg = 1;
    return true;
  }
  L.G = group_size, L.ng = L.K / group_size, L.sc_row = L.ng;
  if (group_size == L.K) {  // one scale per row (stacked per-tensor layers, fuse_lowbit): one segment
    L.lane = false, L.S = std::max<int64_t>(L.nch, 1), L.nseg = 1;
    return true;
  }
  if (group_size % L.chunkcols == 0 && group_size / L.chunkcols >= 4) {
    L.lane = false, L.S = group_size / L.chunkcols, L.nseg = L.ng;
    return true;
  }
  L.S = 1, L.nseg = 0;
  if (group_size % L.lanecols != 0) return false;
  L.lane = true;
  int32_t* lidx = A.take<int32_t>(std::max<int64_t>(1, L.nch) * 16);
  for (int64_t c = 0; c < L.nch; ++c) {
    const int64_t g0 = (c * L.chunkcols) / L.G;
    const int64_t cnt = std::min<int64_t>(16, L.ng - g0);
    for (int64_t l = 0; l < 16; ++l) {
      const int64_t g = (c * L.chunkcols + l * L.lanecols) / L.G - g0;
      lidx[16 * c + l] = static_cast<int32_t>(std::min(g, cnt - 1));
    }
  }
  L.lidx = lidx;
  return true;
}

// x [..., K] float32 -> contiguous [M, K]; out_shape = [..., N]
at::Tensor check_x(const at::Tensor& x, const char* fn, int64_t N, std::vector<int64_t>& out_shape) {
  RAREFY_CHECK_VALUE(x.device().is_cpu(), fn, ": x must be a CPU tensor");
  RAREFY_CHECK_TYPE(x.scalar_type() == at::kFloat, fn, ": x must be float32, got ", x.scalar_type());
  RAREFY_CHECK_VALUE(x.dim() >= 1, fn, ": x must be [M, K] (or [..., K]), got a scalar");
  out_shape.assign(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  const int64_t K = x.size(-1);
  at::Tensor x2 = x.dim() == 2 ? x : x.reshape({-1, K});
  return x2.is_contiguous() ? x2 : x2.contiguous();
}
const float* check_bias(const c10::optional<at::Tensor>& bias, int64_t N, const char* fn) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  const at::Tensor& b = *bias;
  RAREFY_CHECK_VALUE(b.device().is_cpu() && b.scalar_type() == at::kFloat && b.dim() == 1 && b.size(0) == N &&
                        b.is_contiguous(),
                    fn, ": bias must be a contiguous float32 CPU tensor [", N, "]");
  return b.data_ptr<float>();
}
int64_t pick_isa(int64_t isa, const char* fn) {
  const int64_t best = best_isa();
  if (isa == kAuto) return best;
  RAREFY_CHECK_VALUE(isa >= kScalar && isa <= best, fn, ": isa ", isa, " not available on this CPU (best ", best, ")");
  return isa;
}

at::Tensor lin_gemv(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& scale, int64_t group_size,
                    int64_t act, const c10::optional<at::Tensor>& bias, int64_t isa, bool ter) {
  const char* fn = ter ? "ternary_gemv" : "int8_gemv";
  RAREFY_CHECK_VALUE(w.device().is_cpu() && w.dim() == 2 && w.is_contiguous(), fn,
                    ": weight must be a contiguous 2-D CPU tensor");
  RAREFY_CHECK_TYPE(w.scalar_type() == (ter ? at::kByte : at::kChar), fn, ": weight must be ",
                   ter ? "uint8" : "int8", ", got ", w.scalar_type());
  std::vector<int64_t> out_shape;
  const at::Tensor x = check_x(x_in, fn, w.size(0), out_shape);
  const int64_t K = x.size(1);
  const int64_t N = w.size(0), kb = w.size(1);
  RAREFY_CHECK_VALUE(kb == (ter ? (K + 3) / 4 : K), fn, ": weight has ", kb, " bytes per row, expected ",
                    ter ? (K + 3) / 4 : K, " for K = ", K);
  RAREFY_CHECK_VALUE(act == kFixed16 || act == kInt8, fn, ": unknown activation mode ", act);
  RAREFY_CHECK_VALUE(scale.device().is_cpu() && scale.dim() == 2 && scale.is_contiguous(), fn,
                    ": scale must be a contiguous 2-D CPU tensor");
  RAREFY_CHECK_TYPE(scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kHalf, fn,
                   ": scale must be float32 or float16, got ", scale.scalar_type());
  RAREFY_CHECK_VALUE(group_size == -1 || group_size > 0, fn, ": group size must be positive (or -1: none), got ",
                    group_size);
  if (group_size > 0) {
    RAREFY_CHECK_VALUE(K % group_size == 0 && (!ter || group_size % 4 == 0), fn, ": bad group size ", group_size);
    RAREFY_CHECK_VALUE(scale.size(0) == N && scale.size(1) == K / group_size, fn, ": scale must be [", N, ", ",
                      K / group_size, "], got ", rarefy::shape_str(scale));
  } else if (ter) {
    RAREFY_CHECK_VALUE(scale.numel() == 1, fn, ": per-tensor scale must be [1, 1], got ", rarefy::shape_str(scale));
  } else {
    RAREFY_CHECK_VALUE(scale.size(0) == N && scale.size(1) == 1, fn, ": per-channel scale must be [", N,
                      ", 1], got ", rarefy::shape_str(scale));
  }
  RAREFY_CHECK_VALUE(K < (int64_t(1) << 24), fn, ": K = ", K, " is too large");
  const float* bptr = check_bias(bias, N, fn);
  isa = pick_isa(isa, fn);

  const int64_t M = x.size(0);
  at::Tensor y = at::empty(out_shape, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) {
    y.zero_();
    if (bptr) y.add_(*bias);
    return y;
  }
  Lin L{};
  L.w = static_cast<const uint8_t*>(w.data_ptr());
  L.N = N, L.K = K, L.kb = kb, L.ter = ter;
  L.chunkcols = ter ? 256 : 64, L.lanecols = ter ? 16 : 4;
  L.nch = (kb + 63) / 64;
  {  // prefetch whole rows ahead, at least kPrefetchBytes: short rows are consumed fast
    const int64_t rows = std::max<int64_t>(kRowBlock, (kPrefetchBytes + kb - 1) / kb);
    L.pfd = ((rows + kRowBlock - 1) / kRowBlock) * kRowBlock * kb;
  }
  const int64_t tb = kb - (L.nch - 1) * 64;
  L.tailmask = tb >= 64 ? ~uint64_t(0) : ((uint64_t(1) << tb) - 1);
  L.sc = scale.data_ptr(), L.sc16 = scale.scalar_type() == at::kHalf;
  L.M = M, L.planes = act == kInt8 ? 1 : 2, L.P = M * L.planes;
  L.bias = bptr, L.y = y.data_ptr<float>();

  const int64_t kpad = L.nch * L.chunkcols;
  const size_t bytes = 2 * up64(L.P * kpad) + up64(L.P * L.nch * 16 * 4) + up64(L.P * (L.nch + 1) * 8) +
                       up64(L.P * 4) + up64((L.nch + 1) * 16 * 4) + 256;
  Arena A{scratch(bytes)};
  if (!lin_mode(L, group_size, scale.size(0), A)) isa = kScalar;
  if (isa == kScalar) {  // the portable path walks groups itself
    L.G = group_size > 0 ? group_size : K;
    L.ng = K / L.G;
    L.sc_row = group_size > 0 ? L.ng : (scale.size(0) == 1 ? 0 : 1);
  }
  const int64_t off = ter ? 1 : (isa == kAvx512 ? 128 : 0);
  lin_prep(L, x.data_ptr<float>(), act, off, isa, A);

  // one row of x, ternary, one segment per row: the row-batched AVX-512 tile
  const bool row1 = isa == kAvx512 && ter && M == 1 && !L.lane && L.nseg == 1 && L.nch <= 128;
  // A work item is a block of 4 rows; give each thread at least ~32 KiB of weights.
  const int64_t nblocks = (N + kRowBlock - 1) / kRowBlock;
  const int64_t grain = std::max<int64_t>(1, (32 * 1024) / std::max<int64_t>(1, kRowBlock * kb));
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * kRowBlock, n1 = std::min(b1 * kRowBlock, N);
    if (isa == kScalar) return lin_rows_scalar(L, n0, n1);
#if RAREFY_X86
    if (row1) {
      for (int64_t n = n0; n < n1; n += 8) L.planes == 2 ? ter_row1_tile512<2>(L, n, n1, true) : ter_row1_tile512<1>(L, n, n1, true);
      return;
    }
    for (int64_t n = n0; n < n1; n += kRowBlock) {
      if (isa == kAvx512) {
        if (ter) L.lane ? lin_block<true, true, true>(L, n) : lin_block<true, false, true>(L, n);
        else L.lane ? lin_block<false, true, true>(L, n) : lin_block<false, false, true>(L, n);
      } else {
        if (ter) L.lane ? lin_block<true, true, false>(L, n) : lin_block<true, false, false>(L, n);
        else L.lane ? lin_block<false, true, false>(L, n) : lin_block<false, false, false>(L, n);
      }
    }
#endif
  });
  return y;
}

at::Tensor ternary_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, int64_t group_size,
                        int64_t act, const c10::optional<at::Tensor>& bias, int64_t isa) {
  return lin_gemv(x, packed, scale, group_size, act, bias, isa, true);
}
at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale, int64_t group_size,
                     int64_t act, const c10::optional<at::Tensor>& bias, int64_t isa) {
  return lin_gemv(x, qweight, scale, group_size, act, bias, isa, false);
}

// ============================================================================ GGUF blocks

struct GG {
  const uint8_t* w;
  int64_t N, K, nb, rowbytes;
  int qt;
  int64_t M, planes;  // planes: 1 (int8 per block) or 2 (q1 + q2 / 254 per block)
  // per virtual row p = m * planes + plane:
  const int8_t* xn;   // [P][xnstride] natural q, padded with zeros
  int64_t xnstride;
  const int8_t* xa;   // AVX-512 Q4: [P][ngrp][128] (lanes of block i: q[0..15] | q[16..31])
  const int32_t* corr;  // AVX-512 [P][ngrp][16]: Q4_0 -8 * lane sums, Q8_0 -128 * lane sums
  const int16_t* ps8; // AVX2 Q4_0: [P][nb][16] 8 * (q[2j] + q[2j+1])
  // per row of x:
  const float* dx;    // [M][nb]  activation block scales (plane 2 weighs dx / 254)
  const float* sx;    // [M][nb]  dx * (sum q1 + sum q2 / 254)   (Q4_1)
  int64_t ngrp;       // AVX-512: groups of 4 blocks (Q4) or 2 (Q8)
  const float* dxe;   // [M][ngrp][16]: each lane's block dx
  const float* sxe;   // Q4_1 [M][ngrp][16]: [0, sx0, 0, sx1, ...]
  const uint8_t* bad; // [M]
  const float* bias;
  float* y;
};

constexpr int kBlockBytes[3] = {18, 20, 34};
constexpr float kInv254 = 1.f / 254.f;

inline void gg_store(const GG& g, int64_t n, int64_t m, float v) {
  g.y[m * g.N + n] = g.bad[m] ? std::numeric_limits<float>::quiet_NaN() : v + (g.bias ? g.bias[n] : 0.f);
}

void gg_rows_scalar(const GG& g, int64_t n0, int64_t n1) {
  const int BS = kBlockBytes[g.qt];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = g.w + n * g.rowbytes;
    for (int64_t m = 0; m < g.M; ++m) {
      float F = 0.f;
      for (int64_t b = 0; b < g.nb; ++b) {
        const uint8_t* blk = row + b * BS;
        const float d = h2f(ld16(blk));
        float f = 0.f;
        for (int64_t pl = 0; pl < g.planes; ++pl) {
          const int8_t* xb = g.xn + (m * g.planes + pl) * g.xnstride + 32 * b;
          int32_t s = 0;
          if (g.qt == kQ8_0) {
            const int8_t* qs = reinterpret_cast<const int8_t*>(blk + 2);
            for (int j = 0; j < 32; ++j) s += qs[j] * xb[j];
          } else {
            const uint8_t* qs = blk + (g.qt == kQ4_0 ? 2 : 4);
            const int o = g.qt == kQ4_0 ? 8 : 0;
            for (int j = 0; j < 16; ++j) s += ((qs[j] & 15) - o) * xb[j] + ((qs[j] >> 4) - o) * xb[j + 16];
          }
          f += pl == 0 ? static_cast<float>(s) : static_cast<float>(s) * kInv254;
        }
        F += d * g.dx[m * g.nb + b] * f;
        if (g.qt == kQ4_1) F += h2f(ld16(blk + 2)) * g.sx[m * g.nb + b];
      }
      gg_store(g, n, m, F);
    }
  }
}

#if RAREFY_X86
// AVX-512: a group of 4 (Q4) or 2 (Q8) blocks = 72 / 80 / 68 bytes is loaded with two
// (masked) 64-byte loads; vpermt2b gathers the quant bytes into one register (block i in
// 128-bit lane i for Q4, 256-bit half i for Q8) and the fp16 headers into the low bytes of
// another. Q4: low nibbles x q[0..15], high nibbles x q[16..31] (two vpdpbusd); Q8: w + 128.
struct GGIdx {
  alignas(64) uint8_t q[3][64];
  alignas(64) uint8_t h[3][64];
  alignas(64) int32_t e[3][16];
  GGIdx() {
    for (int qt = 0; qt < 3; ++qt) {
      const int BS = kBlockBytes[qt];
      for (int t = 0; t < 64; ++t) {
        q[qt][t] = qt == kQ8_0 ? static_cast<uint8_t>(BS * (t / 32) + 2 + t % 32)
                               : static_cast<uint8_t>(BS * (t / 16) + (qt == kQ4_0 ? 2 : 4) + t % 16);
        h[qt][t] = 0;
      }
      const int hb = qt == kQ4_1 ? 4 : 2;  // header bytes per block
      const int nbk = qt == kQ8_0 ? 2 : 4;
      for (int i = 0; i < nbk; ++i)
        for (int t = 0; t < hb; ++t) h[qt][hb * i + t] = static_cast<uint8_t>(BS * i + t);
      for (int l = 0; l < 16; ++l) e[qt][l] = qt == kQ8_0 ? l / 8 : qt == kQ4_0 ? l / 4 : 2 * (l / 4);
    }
  }
};
const GGIdx kGGIdx;

template <int QT, int R, int PT, int PL>
RF_512 void gg_tile512(const GG& g, int64_t n0, int64_t m0, bool pf) {
  // R weight rows (rows past N repeat the last one; their outputs are dropped) against PT rows
  // of x: R * PT independent accumulators, and each activation vector is loaded once for R rows.
  constexpr int BS = kBlockBytes[QT];
  constexpr int GB = (QT == kQ8_0 ? 2 : 4) * BS;
  constexpr uint64_t hmask = QT == kQ4_0 ? 0xffull : QT == kQ4_1 ? 0xffffull : 0xfull;
  const uint8_t* row[R];
  RF_UNROLL for (int r = 0; r < R; ++r) row[r] = g.w + std::min(n0 + r, g.N - 1) * g.rowbytes;
  const __m512i iq = _mm512_load_si512(kGGIdx.q[QT]), ih = _mm512_load_si512(kGGIdx.h[QT]);
  const __m512i ie = _mm512_load_si512(kGGIdx.e[QT]);
  const __m512i m15 = _mm512_set1_epi8(15);
  __m512 F[R][PT];
  RF_UNROLL for (int r = 0; r < R; ++r) RF_UNROLL for (int pp = 0; pp < PT; ++pp) F[r][pp] = _mm512_setzero_ps();
  for (int64_t gi = 0; gi < g.ngrp; ++gi) {
    const int64_t off = gi * GB, rem = g.rowbytes - off;
    __m512i lo[R], hi[R];
    __m512 hf[R], dexp[R];
    RF_UNROLL for (int r = 0; r < R; ++r) {
      const uint8_t* a = row[r] + off;
      if (pf) prefetch(a + kRowBlock * g.rowbytes), prefetch(a + kRowBlock * g.rowbytes + 64);
      __m512i v0, v1;
      if (rem >= 128) {
        v0 = _mm512_loadu_si512(a);
        v1 = _mm512_loadu_si512(a + 64);
      } else {
        v0 = _mm512_maskz_loadu_epi8(_bzhi_u64(~0ull, static_cast<unsigned>(std::min<int64_t>(rem, 64))), a);
        v1 = _mm512_maskz_loadu_epi8(_bzhi_u64(~0ull, static_cast<unsigned>(std::max<int64_t>(rem - 64, 0))), a + 64);
      }
      const __m512i q = _mm512_permutex2var_epi8(v0, iq, v1);
      const __m512i h = _mm512_maskz_permutex2var_epi8(hmask, v0, ih, v1);
      hf[r] = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
      dexp[r] = _mm512_permutexvar_ps(ie, hf[r]);
      if constexpr (QT == kQ8_0) {
        lo[r] = _mm512_xor_si512(q, _mm512_set1_epi8(static_cast<char>(0x80)));
      } else {
        lo[r] = _mm512_and_si512(q, m15);
        hi[r] = _mm512_and_si512(_mm512_srli_epi16(q, 4), m15);
      }
    }
    RF_UNROLL for (int pp = 0; pp < PT; ++pp) {
      const int64_t m = m0 + pp;
      const int64_t gx = m * g.ngrp + gi;
      __m512 f[R][PL];
      RF_UNROLL for (int pl = 0; pl < PL; ++pl) {
        const int64_t p = m * PL + pl, px = p * g.ngrp + gi;
        __m512i acc[R];
        const __m512i init = QT == kQ4_1 ? _mm512_setzero_si512() : _mm512_load_si512(g.corr + 16 * px);
        if constexpr (QT == kQ8_0) {
          const __m512i xv = _mm512_load_si512(g.xn + p * g.xnstride + 64 * gi);
          RF_UNROLL for (int r = 0; r < R; ++r) acc[r] = _mm512_dpbusd_epi32(init, lo[r], xv);
        } else {
          const __m512i xl = _mm512_load_si512(g.xa + 128 * px), xh = _mm512_load_si512(g.xa + 128 * px + 64);
          RF_UNROLL for (int r = 0; r < R; ++r)
            acc[r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(init, lo[r], xl), hi[r], xh);
        }
        RF_UNROLL for (int r = 0; r < R; ++r) f[r][pl] = _mm512_cvtepi32_ps(acc[r]);
      }
      const __m512 dxe = _mm512_load_ps(g.dxe + 16 * gx);
      __m512 sxe;
      if constexpr (QT == kQ4_1) sxe = _mm512_load_ps(g.sxe + 16 * gx);
      RF_UNROLL for (int r = 0; r < R; ++r) {
        __m512 v = f[r][0];
        if constexpr (PL == 2) v = _mm512_fmadd_ps(f[r][1], _mm512_set1_ps(kInv254), v);
        F[r][pp] = _mm512_fmadd_ps(v, _mm512_mul_ps(dexp[r], dxe), F[r][pp]);
        if constexpr (QT == kQ4_1) F[r][pp] = _mm512_fmadd_ps(hf[r], sxe, F[r][pp]);
      }
    }
  }
  RF_UNROLL for (int r = 0; r < R; ++r) {
    if (n0 + r >= g.N) break;
    RF_UNROLL for (int pp = 0; pp < PT; ++pp) gg_store(g, n0 + r, m0 + pp, _mm512_reduce_add_ps(F[r][pp]));
  }
}

// AVX2, llama.cpp-style, one block (32 weights) per step, activations in natural order.
template <int QT, int PT, int PL>
RF_256 void gg_tile256(const GG& g, int64_t n, int64_t m0, bool pf) {
  constexpr int BS = kBlockBytes[QT];
  const uint8_t* row = g.w + n * g.rowbytes;
  const __m256i ones = _mm256_set1_epi16(1);
  const __m128i m15 = _mm_set1_epi8(15);
  __m256 F[PT];
  float Fm[PT] = {};
  RF_UNROLL for (int pp = 0; pp < PT; ++pp) F[pp] = _mm256_setzero_ps();
  for (int64_t b = 0; b < g.nb; ++b) {
    const uint8_t* blk = row + b * BS;
    if (pf && (b & 1) == 0) prefetch(blk + kRowBlock * g.rowbytes + 64);
    const float d = _cvtsh_ss(ld16(blk));
    __m256i wv, aw;
    if constexpr (QT == kQ8_0) {
      wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
      aw = _mm256_abs_epi8(wv);
    } else {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (QT == kQ4_0 ? 2 : 4)));
      wv = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m15), _mm_and_si128(v, m15));
    }
    const float mw = QT == kQ4_1 ? _cvtsh_ss(ld16(blk + 2)) : 0.f;
    RF_UNROLL for (int pp = 0; pp < PT; ++pp) {
      const int64_t m = m0 + pp;
      __m256 f[PL];
      RF_UNROLL for (int pl = 0; pl < PL; ++pl) {
        const int64_t p = m * PL + pl;
        const __m256i X = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.xn + p * g.xnstride + 32 * b));
        __m256i s;
        if constexpr (QT == kQ8_0) {
          s = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(X, wv));
        } else {
          s = _mm256_maddubs_epi16(wv, X);
          if constexpr (QT == kQ4_0)
            s = _mm256_sub_epi16(s, _mm256_load_si256(reinterpret_cast<const __m256i*>(g.ps8 + 16 * (p * g.nb + b))));
        }
        f[pl] = _mm256_cvtepi32_ps(_mm256_madd_epi16(s, ones));
      }
      if constexpr (PL == 2) f[0] = _mm256_fmadd_ps(f[1], _mm256_set1_ps(kInv254), f[0]);
      F[pp] = _mm256_fmadd_ps(f[0], _mm256_set1_ps(d * g.dx[m * g.nb + b]), F[pp]);
      if constexpr (QT == kQ4_1) Fm[pp] += mw * g.sx[m * g.nb + b];
    }
  }
  RF_UNROLL for (int pp = 0; pp < PT; ++pp) gg_store(g, n, m0 + pp, hsum256_ps(F[pp]) + Fm[pp]);
}

template <int QT, bool V512, int PL>
void gg_block(const GG& g, int64_t n0) {
  const int64_t n1 = std::min(n0 + kRowBlock, g.N);
  int64_t m = 0;
  bool first = true;
  auto run = [&](auto PT_) {
    constexpr int PT = decltype(PT_)::value;
    if constexpr (V512) {
      constexpr int R = PT * PL <= 4 ? 2 : 1;  // small tiles: two weight rows at a time
      for (int64_t n = n0; n < n1; n += R) gg_tile512<QT, R, PT, PL>(g, n, m, first);
    } else {
      for (int64_t n = n0; n < n1; ++n) gg_tile256<QT, PT, PL>(g, n, m, first);
    }
    first = false;
    m += PT;
  };
  while (g.M - m >= 8) run(std::integral_constant<int, 8>{});
  if (g.M - m >= 4) run(std::integral_constant<int, 4>{});
  if (g.M - m >= 2) run(std::integral_constant<int, 2>{});
  if (g.M - m >= 1) run(std::integral_constant<int, 1>{});
}
#endif

#if RAREFY_X86
// The AVX-512 arrangement of one virtual row (q: ngrp groups, zero padded): Q4 activations as
// [q[0..15] of blocks 0-3 | q[16..31] of blocks 0-3] per group (two 128-bit lane shuffles) and
// the offset corrections (-8 / -128 times the sums each vpdpbusd lane sees).
RF_512 void gg_arrange512(const int8_t* q, int qt, int64_t ngrp, int8_t* xa, int32_t* corr) {
  const __m512i ones = _mm512_set1_epi8(1), zero = _mm512_setzero_si512();
  for (int64_t gi = 0; gi < ngrp; ++gi) {
    if (qt == kQ8_0) {
      const __m512i s = _mm512_dpbusd_epi32(zero, ones, _mm512_load_si512(q + 64 * gi));
      _mm512_store_si512(corr + 16 * gi, _mm512_sub_epi32(zero, _mm512_slli_epi32(s, 7)));
      continue;
    }
    const __m512i a = _mm512_load_si512(q + 128 * gi), b = _mm512_load_si512(q + 128 * gi + 64);
    const __m512i lo = _mm512_shuffle_i64x2(a, b, 0x88), hi = _mm512_shuffle_i64x2(a, b, 0xDD);
    _mm512_store_si512(xa + 128 * gi, lo);
    _mm512_store_si512(xa + 128 * gi + 64, hi);
    if (qt == kQ4_0) {
      const __m512i s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, ones, lo), ones, hi);
      _mm512_store_si512(corr + 16 * gi, _mm512_sub_epi32(zero, _mm512_slli_epi32(s, 3)));
    }
  }
}
// Per-lane block scales of one row of x: dxe (every lane: its block's dx) and, for Q4_1,
// sxe = [0, sx0, 0, sx1, 0, sx2, 0, sx3, 0 ...].
RF_512 void gg_scales512(const float* dx, const float* sx, int qt, int64_t nb, int64_t ngrp, float* dxe, float* sxe) {
  const int64_t bpg = qt == kQ8_0 ? 2 : 4;
  const __m512i ie = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m512i i8 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i is = _mm512_setr_epi32(0, 0, 0, 1, 0, 2, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0);
  for (int64_t gi = 0; gi < ngrp; ++gi) {
    const int64_t b0 = gi * bpg;
    const __mmask16 m = static_cast<__mmask16>(_bzhi_u32(0xffffu, static_cast<unsigned>(std::min(bpg, nb - b0))));
    _mm512_store_ps(dxe + 16 * gi, _mm512_permutexvar_ps(qt == kQ8_0 ? i8 : ie, _mm512_maskz_loadu_ps(m, dx + b0)));
    if (sxe) _mm512_store_ps(sxe + 16 * gi, _mm512_maskz_permutexvar_ps(0x00AA, is, _mm512_maskz_loadu_ps(m, sx + b0)));
  }
}
#endif

// Per row of x and block of 32: amax, d = amax/127, t = x * 127/amax, q1 = round(t) and (two
// planes) q2 = round((t - q1) * 254); then the per-path arrangements and corrections.
void gg_prep(GG& g, const float* x, int64_t isa, Arena& A) {
  const int64_t M = g.M, nb = g.nb, K = g.K, PL = g.planes, P = M * PL;
  const int64_t bpg = g.qt == kQ8_0 ? 2 : 4;
  g.ngrp = (nb + bpg - 1) / bpg;
  g.xnstride = g.ngrp * bpg * 32;
  int8_t* xn = A.take<int8_t>(P * g.xnstride);
  float* dx = A.take<float>(M * nb);
  float* sx = A.take<float>(M * nb);
  uint8_t* bad = A.take<uint8_t>(M);
  int8_t* xa = nullptr;
  int32_t* corr = nullptr;
  float *dxe = nullptr, *sxe = nullptr;
  int16_t* ps8 = nullptr;
  if (isa == kAvx512) {
    if (g.qt != kQ8_0) xa = A.take<int8_t>(P * g.ngrp * 128);
    corr = A.take<int32_t>(P * g.ngrp * 16);
    dxe = A.take<float>(M * g.ngrp * 16);
    if (g.qt == kQ4_1) sxe = A.take<float>(M * g.ngrp * 16);
  }
  if (isa == kAvx2 && g.qt == kQ4_0) ps8 = A.take<int16_t>(P * nb * 16);
  g.xn = xn, g.dx = dx, g.sx = sx, g.bad = bad, g.xa = xa, g.corr = corr, g.dxe = dxe, g.sxe = sxe, g.ps8 = ps8;
  at::parallel_for(0, M, 4, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = x + m * K;
      int8_t* q1 = xn + (m * PL) * g.xnstride;
      int8_t* q2 = PL == 2 ? xn + (m * PL + 1) * g.xnstride : nullptr;
      std::memset(q1, 0, PL * g.xnstride);  // the planes of a row are adjacent
      bool finite = true;
      for (int64_t b = 0; b < nb; ++b) {
        bool fin = true;
        const float amax = row_amax(xr + 32 * b, 32, &fin, isa);
        finite &= fin;
        if (fin && amax > 0.f) row_quant(xr + 32 * b, 32, act_scale(amax), q1 + 32 * b, q2 ? q2 + 32 * b : nullptr, isa);
        int32_t s1 = 0, s2 = 0;
        for (int j = 0; j < 32; ++j) s1 += q1[32 * b + j], s2 += q2 ? q2[32 * b + j] : 0;
        dx[m * nb + b] = amax / 127.f;
        sx[m * nb + b] = dx[m * nb + b] * (static_cast<float>(s1) + static_cast<float>(s2) * kInv254);
      }
      bad[m] = finite ? 0 : 1;
      if (!finite) {  // keep the integer paths clean; the row's outputs are NaN
        std::memset(q1, 0, PL * g.xnstride);
        for (int64_t b = 0; b < nb; ++b) dx[m * nb + b] = sx[m * nb + b] = 0.f;
      }
#if RAREFY_X86
      if (isa == kAvx512) {
        gg_scales512(dx + m * nb, sx + m * nb, g.qt, nb, g.ngrp, dxe + m * g.ngrp * 16,
                     sxe ? sxe + m * g.ngrp * 16 : nullptr);
        for (int64_t pl = 0; pl < PL; ++pl) {
          const int64_t p = m * PL + pl;
          gg_arrange512(xn + p * g.xnstride, g.qt, g.ngrp, xa ? xa + p * g.ngrp * 128 : nullptr, corr + p * g.ngrp * 16);
        }
      }
#endif
      if (ps8)
        for (int64_t pl = 0; pl < PL; ++pl) {
          const int64_t p = m * PL + pl;
          const int8_t* q = xn + p * g.xnstride;
          for (int64_t b = 0; b < nb; ++b)
            for (int j = 0; j < 16; ++j)
              ps8[16 * (p * nb + b) + j] = static_cast<int16_t>(8 * (q[32 * b + 2 * j] + q[32 * b + 2 * j + 1]));
        }
    }
  });
}

at::Tensor gguf_gemv(const at::Tensor& x_in, const at::Tensor& blocks, int64_t qt, int64_t N, int64_t K, int64_t act,
                     const c10::optional<at::Tensor>& bias, int64_t isa) {
  const char* fn = "gguf_gemv";
  RAREFY_CHECK_VALUE(qt >= 0 && qt <= 2, fn, ": unknown block type ", qt);
  RAREFY_CHECK_VALUE(act == kFixed16 || act == kInt8, fn, ": unknown activation mode ", act);
  RAREFY_CHECK_VALUE(N >= 0 && K >= 0 && K % 32 == 0, fn, ": K = ", K, " must be a multiple of 32");
  std::vector<int64_t> out_shape;
  const at::Tensor x = check_x(x_in, fn, N, out_shape);
  RAREFY_CHECK_VALUE(x.size(1) == K, fn, ": x has ", x.size(1), " columns, the weight ", K);
  RAREFY_CHECK_VALUE(blocks.device().is_cpu() && blocks.is_contiguous(), fn, ": blocks must be a contiguous CPU tensor");
  RAREFY_CHECK_TYPE(blocks.scalar_type() == at::kByte, fn, ": blocks must be uint8, got ", blocks.scalar_type());
  const int64_t nb = K / 32, rowbytes = nb * kBlockBytes[qt];
  RAREFY_CHECK_VALUE(blocks.numel() == N * rowbytes, fn, ": ", blocks.numel(), " bytes, expected ", N * rowbytes);
  const float* bptr = check_bias(bias, N, fn);
  isa = pick_isa(isa, fn);
  const int64_t M = x.size(0);
  at::Tensor y = at::empty(out_shape, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) {
    y.zero_();
    if (bptr) y.add_(*bias);
    return y;
  }
  GG g{};
  g.w = static_cast<const uint8_t*>(blocks.data_ptr());
  g.N = N, g.K = K, g.nb = nb, g.rowbytes = rowbytes, g.qt = static_cast<int>(qt), g.M = M;
  g.bias = bptr, g.y = y.data_ptr<float>();
  g.planes = act == kInt8 ? 1 : 2;
  const int64_t P = M * g.planes;
  const int64_t gmax = (nb + 1) / 2 + 1;  // groups of 2 blocks bound both group sizes
  const size_t bytes = up64(P * gmax * 64) + 2 * up64(M * nb * 4) + up64(M) + up64(P * gmax * 128) +
                       up64(P * gmax * 64) + 2 * up64(M * gmax * 64) + up64(P * nb * 32) + 1024;
  Arena A{scratch(bytes)};
  gg_prep(g, x.data_ptr<float>(), isa, A);
  const int64_t nblocks = (N + kRowBlock - 1) / kRowBlock;
  const int64_t grain = std::max<int64_t>(1, (32 * 1024) / std::max<int64_t>(1, kRowBlock * rowbytes));
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * kRowBlock, n1 = std::min(b1 * kRowBlock, N);
    if (isa == kScalar) return gg_rows_scalar(g, n0, n1);
#if RAREFY_X86
    for (int64_t n = n0; n < n1; n += kRowBlock) {
      const bool two = g.planes == 2;
      switch (g.qt * 2 + (isa == kAvx512 ? 1 : 0)) {
        case 0: two ? gg_block<kQ4_0, false, 2>(g, n) : gg_block<kQ4_0, false, 1>(g, n); break;
        case 1: two ? gg_block<kQ4_0, true, 2>(g, n) : gg_block<kQ4_0, true, 1>(g, n); break;
        case 2: two ? gg_block<kQ4_1, false, 2>(g, n) : gg_block<kQ4_1, false, 1>(g, n); break;
        case 3: two ? gg_block<kQ4_1, true, 2>(g, n) : gg_block<kQ4_1, true, 1>(g, n); break;
        case 4: two ? gg_block<kQ8_0, false, 2>(g, n) : gg_block<kQ8_0, false, 1>(g, n); break;
        default: two ? gg_block<kQ8_0, true, 2>(g, n) : gg_block<kQ8_0, true, 1>(g, n); break;
      }
    }
#endif
  });
  return y;
}

}  // namespace

// Schemas here, kernels registered for the CPU key only: the ops then stay opaque to
// torch.compile, which traces them with the fake (shape-only) kernels registered in Python
// (rarefy/kernels/lowbit_cpu/__init__.py) instead of calling into this code.
TORCH_LIBRARY(rarefy_lowbit, m) {
  m.def("ternary_gemv(Tensor x, Tensor packed, Tensor scale, int group_size, int act, Tensor? bias, int isa) -> Tensor");
  m.def("int8_gemv(Tensor x, Tensor qweight, Tensor scale, int group_size, int act, Tensor? bias, int isa) -> Tensor");
  m.def("gguf_gemv(Tensor x, Tensor blocks, int qtype, int N, int K, int act, Tensor? bias, int isa) -> Tensor");
  m.def("best_isa() -> int", &best_isa);
}

TORCH_LIBRARY_IMPL(rarefy_lowbit, CPU, m) {
  m.impl("ternary_gemv", &ternary_gemv);
  m.impl("int8_gemv", &int8_gemv);
  m.impl("gguf_gemv", &gguf_gemv);
}
