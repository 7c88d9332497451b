// fp16-weight GEMV for CPU decode: y[m, n] = sum_k x[m, k] * float(w[n, k]) (+ bias[n]).
//
// x fp32 [..., K] (M = rows), w fp16 [N, K] (nn.Linear layout), bias fp32 [N] (optional), y fp32 [M, N].
// Weights are stored in half the bytes of fp32 and widened to fp32 in registers; all math is
// fp32 FMA. Batch-1 decode is memory bound, so the win is the halved weight traffic.
//
// Work split: N is cut into blocks of R weight rows, blocks are spread over threads with
// at::parallel_for (OpenMP, honours torch.get_num_threads()). Inside a block every tile of up
// to MT rows of x is run against the R weight rows while they are still in L1, so each weight
// byte comes from DRAM once per call whatever M is.
//
// ISA: AVX-512F, AVX2+FMA+F16C and scalar paths, chosen at run time. The vector functions use
// __attribute__((target(...))) so the library loads on any x86-64 (and builds elsewhere).
// Each output element is produced by one thread in a fixed order: results do not depend on
// the thread count.
//
// Registered as a torch op (torch.ops.rarefy_gemv.gemv_f16) rather than a pybind module: the
// lighter headers roughly halve the build time.

#include <ATen/Parallel.h>
#include "../rarefy_check.h"
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
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

struct Problem {
  const float* x;     // [M, K]
  const uint16_t* w;  // [N, K] fp16 bits
  const float* bias;  // [N] or nullptr
  float* y;           // [M, N]
  int64_t M, N, K;
};

// ----------------------------------------------------------------------------- scalar
float half_to_float(uint16_t h) {
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

void rows_scalar(const Problem& p, int64_t n0, int64_t n1) {
  std::vector<float> wf(static_cast<size_t>(p.K));
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wr = p.w + n * p.K;
    for (int64_t k = 0; k < p.K; ++k) wf[k] = half_to_float(wr[k]);
    for (int64_t m = 0; m < p.M; ++m) {
      const float* xr = p.x + m * p.K;
      float s[4] = {0.f, 0.f, 0.f, 0.f};
      int64_t k = 0;
      for (; k + 4 <= p.K; k += 4)
        for (int j = 0; j < 4; ++j) s[j] += xr[k + j] * wf[k + j];
      for (; k < p.K; ++k) s[0] += xr[k] * wf[k];
      float acc = (s[0] + s[1]) + (s[2] + s[3]);
      p.y[m * p.N + n] = acc + (p.bias ? p.bias[n] : 0.f);
    }
  }
}

#if RAREFY_X86
// The hardware prefetcher alone reaches only ~60% of DRAM bandwidth on the 4 short interleaved
// row streams of a block. So while a block is read, its tiles prefetch the next block's rows
// (same offsets, one block ahead), which brings the kernel to the read-bandwidth limit; the
// first block of a thread's range is requested up front. Prefetches never fault, so running
// past the end of w is harmless.
inline void prefetch_t0(uintptr_t a) { _mm_prefetch(reinterpret_cast<const char*>(a), _MM_HINT_T0); }

void prefetch_first_block(const Problem& p, int64_t n0, int64_t n1) {
  const char* a = reinterpret_cast<const char*>(p.w + n0 * p.K);
  const char* e = reinterpret_cast<const char*>(p.w + std::min(n1, n0 + 4) * p.K);
  for (; a < e; a += 64) _mm_prefetch(a, _MM_HINT_T0);
}

// ----------------------------------------------------------------------------- AVX-512F
// One tile: MT rows of x against R consecutive weight rows, 16 k per step. With `prefetch`
// (first tile of a block), each step also prefetches the next block's rows at the same k.
template <int MT, int R>
__attribute__((target("avx512f"))) void tile_avx512(const Problem& p, int64_t m0, int64_t n0, bool prefetch) {
  const int64_t K = p.K;
  const uint16_t* w = p.w + n0 * K;
  const float* x = p.x + m0 * K;
  __m512 acc[MT][R];
  for (int i = 0; i < MT; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
  int64_t k = 0;
  const uintptr_t pf = reinterpret_cast<uintptr_t>(w) + sizeof(uint16_t) * R * K;  // next block
  for (; k + 16 <= K; k += 16) {
    if (prefetch)
      for (int r = 0; r < R; ++r) prefetch_t0(pf + sizeof(uint16_t) * (r * K + k));
    __m512 wv[R];
    for (int r = 0; r < R; ++r)
      wv[r] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + k)));
    for (int i = 0; i < MT; ++i) {
      const __m512 xv = _mm512_loadu_ps(x + i * K + k);
      for (int r = 0; r < R; ++r) acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]);
    }
  }
  if (k < K) {  // tail: zero-padded weights, masked x
    const int rem = static_cast<int>(K - k);
    const __mmask16 mask = static_cast<__mmask16>((1u << rem) - 1u);
    __m512 wv[R];
    for (int r = 0; r < R; ++r) {
      alignas(32) uint16_t buf[16] = {0};
      std::memcpy(buf, w + r * K + k, sizeof(uint16_t) * rem);
      wv[r] = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(buf)));
    }
    for (int i = 0; i < MT; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + i * K + k);
      for (int r = 0; r < R; ++r) acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]);
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int r = 0; r < R; ++r) {
      const float b = p.bias ? p.bias[n0 + r] : 0.f;
      p.y[(m0 + i) * p.N + n0 + r] = _mm512_reduce_add_ps(acc[i][r]) + b;
    }
}

// All rows of x against R weight rows; the first tile streams the rows in from DRAM (and
// prefetches ahead), later tiles find them in L1.
template <int R>
__attribute__((target("avx512f"))) void block_avx512(const Problem& p, int64_t n0) {
  int64_t m = 0;
  for (; m + 4 <= p.M; m += 4) tile_avx512<4, R>(p, m, n0, m == 0);
  switch (p.M - m) {
    case 3: tile_avx512<3, R>(p, m, n0, m == 0); break;
    case 2: tile_avx512<2, R>(p, m, n0, m == 0); break;
    case 1: tile_avx512<1, R>(p, m, n0, m == 0); break;
    default: break;
  }
}

__attribute__((target("avx512f"))) void rows_avx512(const Problem& p, int64_t n0, int64_t n1) {
  prefetch_first_block(p, n0, n1);
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) block_avx512<4>(p, n);
  for (; n < n1; ++n) block_avx512<1>(p, n);
}

// ----------------------------------------------------------------------------- AVX2 + F16C
__attribute__((target("avx2,fma,f16c"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 16 ymm registers: MT <= 2 with R = 4 keeps 8 accumulators + 4 weights + 1 x live.
template <int MT, int R>
__attribute__((target("avx2,fma,f16c"))) void tile_avx2(const Problem& p, int64_t m0, int64_t n0, bool prefetch) {
  const int64_t K = p.K;
  const uint16_t* w = p.w + n0 * K;
  const float* x = p.x + m0 * K;
  __m256 acc[MT][R];
  for (int i = 0; i < MT; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm256_setzero_ps();
  int64_t k = 0;
  const uintptr_t pf = reinterpret_cast<uintptr_t>(w) + sizeof(uint16_t) * R * K;  // next block
  for (; k + 8 <= K; k += 8) {
    if (prefetch)
      for (int r = 0; r < R; ++r) prefetch_t0(pf + sizeof(uint16_t) * (r * K + k));
    __m256 wv[R];
    for (int r = 0; r < R; ++r)
      wv[r] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * K + k)));
    for (int i = 0; i < MT; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * K + k);
      for (int r = 0; r < R; ++r) acc[i][r] = _mm256_fmadd_ps(xv, wv[r], acc[i][r]);
    }
  }
  if (k < K) {
    const int rem = static_cast<int>(K - k);
    __m256 wv[R];
    for (int r = 0; r < R; ++r) {
      alignas(16) uint16_t buf[8] = {0};
      std::memcpy(buf, w + r * K + k, sizeof(uint16_t) * rem);
      wv[r] = _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)));
    }
    for (int i = 0; i < MT; ++i) {
      alignas(32) float xb[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      std::memcpy(xb, x + i * K + k, sizeof(float) * rem);
      const __m256 xv = _mm256_load_ps(xb);
      for (int r = 0; r < R; ++r) acc[i][r] = _mm256_fmadd_ps(xv, wv[r], acc[i][r]);
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int r = 0; r < R; ++r) {
      const float b = p.bias ? p.bias[n0 + r] : 0.f;
      p.y[(m0 + i) * p.N + n0 + r] = hsum256(acc[i][r]) + b;
    }
}

template <int R>
__attribute__((target("avx2,fma,f16c"))) void block_avx2(const Problem& p, int64_t n0) {
  int64_t m = 0;
  for (; m + 2 <= p.M; m += 2) tile_avx2<2, R>(p, m, n0, m == 0);
  if (m < p.M) tile_avx2<1, R>(p, m, n0, m == 0);
}

__attribute__((target("avx2,fma,f16c"))) void rows_avx2(const Problem& p, int64_t n0, int64_t n1) {
  prefetch_first_block(p, n0, n1);
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) block_avx2<4>(p, n);
  for (; n < n1; ++n) block_avx2<1>(p, n);
}

bool has_avx512() { return __builtin_cpu_supports("avx512f"); }
bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
#else
bool has_avx512() { return false; }
bool has_avx2() { return false; }
#endif

int64_t best_isa() { return has_avx512() ? kAvx512 : has_avx2() ? kAvx2 : kScalar; }

// ----------------------------------------------------------------------------- op
at::Tensor gemv_f16(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                    int64_t isa) {
  RAREFY_CHECK_VALUE(x.device().is_cpu() && w.device().is_cpu(), "gemv_f16: x and w must be CPU tensors");
  RAREFY_CHECK_TYPE(x.scalar_type() == at::kFloat, "gemv_f16: x must be float32, got ", x.scalar_type());
  RAREFY_CHECK_TYPE(w.scalar_type() == at::kHalf, "gemv_f16: w must be float16, got ", w.scalar_type());
  RAREFY_CHECK_VALUE(x.dim() >= 1, "gemv_f16: x must be [..., K], got a scalar");
  RAREFY_CHECK_VALUE(w.dim() == 2, "gemv_f16: w must be 2-D [N, K], got ", rarefy::shape_str(w));
  RAREFY_CHECK_VALUE(x.size(-1) == w.size(1), "gemv_f16: K mismatch: x ", rarefy::shape_str(x), " vs w ", rarefy::shape_str(w));
  RAREFY_CHECK_VALUE(x.is_contiguous(), "gemv_f16: x must be contiguous");
  RAREFY_CHECK_VALUE(w.is_contiguous(), "gemv_f16: w must be contiguous");
  const float* bptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    RAREFY_CHECK_VALUE(b.device().is_cpu(), "gemv_f16: bias must be a CPU tensor");
    RAREFY_CHECK_TYPE(b.scalar_type() == at::kFloat, "gemv_f16: bias must be float32, got ", b.scalar_type());
    RAREFY_CHECK_VALUE(b.dim() == 1 && b.size(0) == w.size(0), "gemv_f16: bias must be [N] = [", w.size(0),
                      "], got ", rarefy::shape_str(b));
    RAREFY_CHECK_VALUE(b.is_contiguous(), "gemv_f16: bias must be contiguous");
    bptr = b.data_ptr<float>();
  }
  const int64_t best = best_isa();
  if (isa == kAuto) isa = best;
  RAREFY_CHECK_VALUE(isa >= kScalar && isa <= best, "gemv_f16: isa ", isa, " not available (best ", best, ")");

  const int64_t N = w.size(0), K = w.size(1);
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty(out_shape, x.options());
  if (M == 0 || N == 0) return y;
  Problem p{x.data_ptr<float>(), reinterpret_cast<const uint16_t*>(w.data_ptr<at::Half>()), bptr,
            y.data_ptr<float>(), M, N, K};

  void (*rows)(const Problem&, int64_t, int64_t) = rows_scalar;
#if RAREFY_X86
  if (isa == kAvx512) rows = rows_avx512;
  else if (isa == kAvx2) rows = rows_avx2;
#endif
  // Blocks of 4 weight rows; a thread gets at least ~64 KiB of weights so tiny layers skip
  // the fork/join.
  constexpr int64_t kBlock = 4;
  const int64_t nblocks = (N + kBlock - 1) / kBlock;
  const int64_t grain = std::max<int64_t>(1, (32 * 1024) / std::max<int64_t>(1, kBlock * K));
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    rows(p, b0 * kBlock, std::min(b1 * kBlock, N));
  });
  return y;
}

}  // namespace

// The kernel is registered for the CPU key only, so torch.compile traces the op with the
// shape-only fake kernel registered in Python (rarefy/kernels/gemv_cpu/__init__.py).
TORCH_LIBRARY(rarefy_gemv, m) {
  m.def("gemv_f16(Tensor x, Tensor w, Tensor? bias=None, int isa=-1) -> Tensor");
  m.def("best_isa() -> int", &best_isa);
}

TORCH_LIBRARY_IMPL(rarefy_gemv, CPU, m) {
  m.impl("gemv_f16", &gemv_f16);
}
