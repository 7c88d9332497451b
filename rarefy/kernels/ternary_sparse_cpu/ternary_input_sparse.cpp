// Input-sparse ternary GEMV / small-batch GEMM for CPU: ternary weights x activation sparsity.
//
//   y[m, n] = bias[n] + s * sum_i xm[m, i] * q[n, i],   xm[m, i] = x[m, i] if |x[m, i]| >= t else 0
//
// x fp32 [M, K]; q in {-1, 0, +1} stored in the TRANSPOSED ternary layout ("layout T1",
// docs/lowbit-formats.md): wt uint8 [K, Nb], Nb = ceil(N/4), byte p of row i holds the codes
// c = q + 1 of outputs 4p .. 4p+3 of input i (output 4p+j in bits 2j..2j+1; padding outputs
// past N hold code 1 = value 0); s the per-tensor scale; y fp32 [M, N].
//
// Why: an input channel that is inactive for every token is one contiguous run of Nb bytes
// that is never read (N/4 bytes: 1/8 of what the fp16 input-sparse kernel skips per channel),
// and an active one is one contiguous stream. Batch-1 decode reads d of the packed weight at
// input density d.
//
// Steps:
//  1. Compaction (one pass over x): the active list idx[0..nact) = channels with
//     |x[m, i]| >= t for some token (union over the batch), packed values xs[m][j] (each token
//     keeps its own mask) and their sums sx[m] = sum_j xs[m][j]. NaN never passes.
//  2. Activations in 16-bit fixed point (as the dense ternary kernel's default "fixed16" mode,
//     same error bound): per token xq = round(xs * 32767 / amax), amax = max |xs| over the
//     token's active values, so xs ~ xq * amax / 32767 with error <= amax / 65534 per element.
//     Since q = c - 1 (codes c in {0, 1, 2}), y = bias + s * amax/32767 * (sum_j xq[j] c[n, j]
//     - sum_j xq[j]): integer sums, exact (|sum| < 2 * 32767 * K fits int32 for K < 32768).
//  3. Active rows are taken in pairs (j0, j1): 16 bytes of each are interleaved (unpacklo/hi
//     + zero-extension to 16 bits), so each 32-bit lane holds the codes of one output for both
//     inputs; per bit pair a shift, an and and one vpdpwssd (AVX512-VNNI; vpmaddwd + vpaddd
//     without it) add c0 * xq[j0] + c1 * xq[j1] to the lane: ~16 vector ops per 128 weights.
//  4. The output bytes are cut into stripes of 64-byte blocks over threads (at::parallel_for;
//     narrow layers at M <= 4 cut the active row pairs over threads instead, see the op;
//     each thread owns its stripe of y, no atomics). Per stripe and tile of up to 4 tokens the
//     active row pairs are streamed in groups of kGroup rows side by side: per block the int32
//     accumulators (4 bit pairs x up to 64 bytes: 16 zmm) are loaded from a stripe buffer
//     (L1/L2), the group's rows added, and stored back; each row is read as a contiguous stream
//     with software prefetch 512 bytes ahead. Integer sums: results are exact and identical on
//     every code path and thread count.
//
// ISA: AVX-512 VNNI, AVX-512 (F+BW+VL+DQ) and portable scalar, chosen at run time
// (__attribute__((target))). Codes 0b11 are not checked (they read as +2; the loader refuses
// them, as for layout v1). An input that is NaN never passes the threshold; +-inf passes and
// gives a NaN output row (its fixed-point scale is inf).
//
// Registered as torch.ops.rarefy_ternary_sparse.ternary_input_sparse.

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

enum Isa : int64_t { kAuto = -1, kScalar = 0, kAvx512 = 1, kVnni = 2 };

constexpr int64_t kBlock = 64;   // bytes of a packed row per register block (256 outputs)
constexpr int64_t kGroup = 32;   // active rows streamed side by side per pass over a stripe
constexpr int64_t kPf = 512;     // prefetch distance along a row, bytes

struct Job {
  const uint8_t* w;       // [K, Nb]
  const float* bias;      // [N] or nullptr
  float* y;               // [M, N]
  int64_t M, K, N, Nb;
  const int32_t* idx;     // [npair * 2] active rows (the last one repeated when nact is odd)
  const int32_t* xp;      // [M, npair] (xq[j0] & 0xffff) | (xq[j1] << 16)
  const int16_t* xq;      // [M, npair * 2]
  const int64_t* sx;      // [M] sum of xq
  const float* mul;       // [M] s * amax / 32767
  int64_t npair;
  int64_t qa, qb;         // the row pairs this call sums: [qa, qb) (all, except in the K split)
};

// y[m, 4p + j] for p in [p0, p1) from the stripe buffer acc [MT][4][L].
void finish(const Job& J, int64_t m0, int MT, int64_t p0, int64_t p1, const int32_t* acc) {
  const int64_t L = p1 - p0;
  for (int t = 0; t < MT; ++t) {
    float* y = J.y + (m0 + t) * J.N;
    const int64_t sx = J.sx[m0 + t];
    const float mul = J.mul[m0 + t];
    for (int64_t p = p0; p < p1; ++p)
      for (int j = 0; j < 4; ++j) {
        const int64_t n = 4 * p + j;
        if (n < J.N)
          y[n] = mul * static_cast<float>(static_cast<int64_t>(acc[(t * 4 + j) * L + (p - p0)]) - sx) +
                 (J.bias ? J.bias[n] : 0.f);
      }
  }
}

// ----------------------------------------------------------------------------- scalar
// keep != nullptr (K split, M <= 4): sum into keep [M][4][L] and do not finish.
void stripe_scalar(const Job& J, int64_t p0, int64_t p1, int32_t* keep) {
  const int64_t L = p1 - p0;
  std::vector<int32_t> buf(keep ? 0 : static_cast<size_t>(4 * 4 * std::max<int64_t>(L, 1)));
  int32_t* acc = keep ? keep : buf.data();
  for (int64_t m0 = 0; m0 < J.M; m0 += 4) {
    const int MT = static_cast<int>(std::min<int64_t>(4, J.M - m0));
    std::fill(acc, acc + MT * 4 * L, 0);
    for (int64_t a = 2 * J.qa; a < 2 * J.qb; ++a) {
      const uint8_t* row = J.w + static_cast<int64_t>(J.idx[a]) * J.Nb;
      for (int t = 0; t < MT; ++t) {
        const int32_t xv = J.xq[(m0 + t) * 2 * J.npair + a];
        if (xv == 0) continue;
        int32_t* at = acc + t * 4 * L;
        for (int64_t p = p0; p < p1; ++p) {
          const int32_t b = row[p];
          for (int j = 0; j < 4; ++j) at[j * L + (p - p0)] += xv * ((b >> (2 * j)) & 3);
        }
      }
    }
    if (!keep) finish(J, m0, MT, p0, p1, acc);
  }
}

#if RAREFY_X86
#define RF_TGT __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,bmi2")))
#define RF_UNROLL _Pragma("GCC unroll 16")

// One block (CH 16-byte chunks at stripe byte p) for MT tokens over the row pairs [q0, q1).
template <int MT, int CH, bool VNNI>
RF_TGT __attribute__((always_inline)) inline void block_pairs(const Job& J, int64_t m0, int64_t pabs, int64_t prel,
                                                              int64_t L, int64_t q0, int64_t q1, int32_t* acc,
                                                              int64_t valid) {
  __m512i r[MT][4][CH];
  __mmask16 lm[CH];
  RF_UNROLL for (int c = 0; c < CH; ++c)
    lm[c] = static_cast<__mmask16>(_bzhi_u32(0xffffu, static_cast<unsigned>(std::clamp<int64_t>(valid - 16 * c, 0, 16))));
  RF_UNROLL for (int t = 0; t < MT; ++t)
    RF_UNROLL for (int j = 0; j < 4; ++j)
      RF_UNROLL for (int c = 0; c < CH; ++c)
        r[t][j][c] = _mm512_maskz_loadu_epi32(lm[c], acc + (t * 4 + j) * L + prel + 16 * c);
  const __m512i three = _mm512_set1_epi16(3);
  for (int64_t q = q0; q < q1; ++q) {
    const uint8_t* ra = J.w + static_cast<int64_t>(J.idx[2 * q]) * J.Nb + pabs;
    const uint8_t* rb = J.w + static_cast<int64_t>(J.idx[2 * q + 1]) * J.Nb + pabs;
    _mm_prefetch(reinterpret_cast<const char*>(ra) + kPf, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(rb) + kPf, _MM_HINT_T0);
    __m512i xb[MT];
    RF_UNROLL for (int t = 0; t < MT; ++t) xb[t] = _mm512_set1_epi32(J.xp[(m0 + t) * J.npair + q]);
    RF_UNROLL for (int c = 0; c < CH; ++c) {
      const __m128i a = _mm_maskz_loadu_epi8(lm[c], ra + 16 * c);
      const __m128i b = _mm_maskz_loadu_epi8(lm[c], rb + 16 * c);
      const __m256i ab = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_unpacklo_epi8(a, b)),
                                                 _mm_unpackhi_epi8(a, b), 1);
      const __m512i v = _mm512_cvtepu8_epi16(ab);  // lane l: (a[l], b[l]) as 16-bit
      RF_UNROLL for (int j = 0; j < 4; ++j) {
        const __m512i cj = _mm512_and_si512(_mm512_srli_epi16(v, 2 * j), three);
        RF_UNROLL for (int t = 0; t < MT; ++t) {
          if constexpr (VNNI) r[t][j][c] = _mm512_dpwssd_epi32(r[t][j][c], cj, xb[t]);
          else r[t][j][c] = _mm512_add_epi32(r[t][j][c], _mm512_madd_epi16(cj, xb[t]));
        }
      }
    }
  }
  RF_UNROLL for (int t = 0; t < MT; ++t)
    RF_UNROLL for (int j = 0; j < 4; ++j)
      RF_UNROLL for (int c = 0; c < CH; ++c)
        _mm512_mask_storeu_epi32(acc + (t * 4 + j) * L + prel + 16 * c, lm[c], r[t][j][c]);
}

template <int MT, int CH, bool VNNI>
RF_TGT void tile_vec(const Job& J, int64_t m0, int64_t p0, int64_t p1, int32_t* acc, bool fin) {
  const int64_t L = p1 - p0;
  constexpr int64_t step = 16 * CH;
  std::memset(acc, 0, sizeof(int32_t) * MT * 4 * L);
  for (int64_t q0 = J.qa; q0 < J.qb; q0 += kGroup / 2) {
    const int64_t q1 = std::min<int64_t>(J.qb, q0 + kGroup / 2);
    for (int64_t p = p0; p < p1; p += step)
      block_pairs<MT, CH, VNNI>(J, m0, p, p - p0, L, q0, q1, acc, std::min<int64_t>(step, p1 - p));
  }
  if (fin) finish(J, m0, MT, p0, p1, acc);
}

template <bool VNNI>
RF_TGT void stripe_vec(const Job& J, int64_t p0, int64_t p1, int32_t* keep) {
  const int64_t L = p1 - p0;
  std::vector<int32_t> buf(keep ? 0 : static_cast<size_t>(4 * 4 * std::max<int64_t>(L, 1) + 64));
  int32_t* acc = keep ? keep : buf.data();
  for (int64_t m0 = 0; m0 < J.M; m0 += 4) {
    switch (std::min<int64_t>(4, J.M - m0)) {
      case 1: tile_vec<1, 4, VNNI>(J, m0, p0, p1, acc, !keep); break;
      case 2: tile_vec<2, 2, VNNI>(J, m0, p0, p1, acc, !keep); break;
      case 3: tile_vec<3, 1, VNNI>(J, m0, p0, p1, acc, !keep); break;
      default: tile_vec<4, 1, VNNI>(J, m0, p0, p1, acc, !keep); break;
    }
  }
}

bool has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("bmi2");
}
bool has_vnni() { return has_avx512() && __builtin_cpu_supports("avx512vnni"); }
#else
bool has_avx512() { return false; }
bool has_vnni() { return false; }
#endif

int64_t best_isa() { return has_vnni() ? kVnni : has_avx512() ? kAvx512 : kScalar; }

at::Tensor ternary_input_sparse(const at::Tensor& x, const at::Tensor& wt, const at::Tensor& scale, int64_t n,
                                double threshold, const c10::optional<at::Tensor>& bias, int64_t isa,
                                int64_t ksplit) {
  const char* f = "ternary_input_sparse: ";
  for (const at::Tensor* t : {&x, &wt, &scale})
    RAREFY_CHECK_VALUE(t->device().is_cpu(), f, "all tensors must be on the CPU, got ", t->device());
  RAREFY_CHECK_TYPE(x.scalar_type() == at::kFloat, f, "x must be float32, got ", x.scalar_type());
  RAREFY_CHECK_TYPE(wt.scalar_type() == at::kByte, f, "wt must be uint8 (transposed ternary layout), got ",
                   wt.scalar_type());
  RAREFY_CHECK_VALUE(n >= 0, f, "n must be >= 0, got ", n);
  const int64_t Nb = (n + 3) / 4;
  RAREFY_CHECK_VALUE(wt.dim() == 2 && wt.size(1) == Nb && wt.is_contiguous(), f,
                    "wt must be contiguous [K, ceil(n/4)] = [K, ", Nb, "], got ", rarefy::shape_str(wt));
  const int64_t K = wt.size(0);
  RAREFY_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == K, f, "x must be [..., K] with K = ", K, " (wt's rows), got ",
                    rarefy::shape_str(x));
  RAREFY_CHECK_VALUE(x.is_contiguous(), f, "x must be contiguous");
  RAREFY_CHECK_VALUE(scale.numel() == 1 && (scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kHalf),
                    f, "scale must be one float32/float16 value (per-tensor scale), got ", scale.scalar_type(), " ",
                    rarefy::shape_str(scale));
  RAREFY_CHECK_VALUE(std::isfinite(threshold) && threshold >= 0, f, "threshold must be a finite number >= 0, got ",
                    threshold);
  const float* bptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    RAREFY_CHECK_VALUE(b.device().is_cpu(), f, "bias must be a CPU tensor");
    RAREFY_CHECK_TYPE(b.scalar_type() == at::kFloat, f, "bias must be float32, got ", b.scalar_type());
    RAREFY_CHECK_VALUE(b.dim() == 1 && b.size(0) == n && b.is_contiguous(), f, "bias must be contiguous [n] = [", n,
                      "], got ", rarefy::shape_str(b));
    bptr = b.data_ptr<float>();
  }
  const int64_t best = best_isa();
  if (isa == kAuto) isa = best;
  RAREFY_CHECK_VALUE(isa >= kScalar && isa <= best, f, "isa ", isa, " not available on this CPU (best ", best, ")");

  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  at::Tensor y = at::empty(out_shape, x.options());
  if (M == 0 || n == 0) return y;
  const float s = scale.scalar_type() == at::kFloat ? scale.data_ptr<float>()[0]
                                                   : static_cast<float>(scale.data_ptr<c10::Half>()[0]);
  RAREFY_CHECK_VALUE(K < 32768, f, "K must be < 32768 (int32 sums of 16-bit activations), got ", K);

  // 1. compaction (union of the tokens' masks)
  const float* xd = x.data_ptr<float>();
  const float t = static_cast<float>(threshold);
  std::vector<int32_t> idx;
  idx.reserve(static_cast<size_t>(K) + 1);
  for (int64_t i = 0; i < K; ++i) {
    bool act = false;
    for (int64_t m = 0; m < M && !act; ++m) act = std::fabs(xd[m * K + i]) >= t;  // NaN: false
    if (act) idx.push_back(static_cast<int32_t>(i));
  }
  const int64_t nact = static_cast<int64_t>(idx.size());
  if (nact % 2) idx.push_back(idx.back());  // pad the last pair with a zero activation
  const int64_t npair = static_cast<int64_t>(idx.size()) / 2;
  // 2. 16-bit fixed point per token
  std::vector<int16_t> xq(static_cast<size_t>(std::max<int64_t>(1, M * 2 * npair)), 0);
  std::vector<int32_t> xp(static_cast<size_t>(std::max<int64_t>(1, M * npair)), 0);
  std::vector<int64_t> sx(static_cast<size_t>(M), 0);
  std::vector<float> mul(static_cast<size_t>(M), 0.f);
  for (int64_t m = 0; m < M; ++m) {
    float amax = 0.f;
    for (int64_t a = 0; a < nact; ++a) {
      const float v = xd[m * K + idx[a]];
      if (std::fabs(v) >= t) amax = std::max(amax, std::fabs(v));
    }
    const float inv = amax > 0.f ? 32767.f / amax : 0.f;
    mul[m] = amax > 0.f ? s * (amax / 32767.f) : 0.f;
    if (!std::isfinite(amax)) mul[m] = std::numeric_limits<float>::quiet_NaN();
    int64_t sum = 0;
    for (int64_t a = 0; a < nact; ++a) {
      const float v = xd[m * K + idx[a]];
      const int32_t q = (std::fabs(v) >= t && std::isfinite(inv)) ? static_cast<int32_t>(std::nearbyint(v * inv)) : 0;
      const int32_t qc = std::clamp(q, -32767, 32767);
      xq[m * 2 * npair + a] = static_cast<int16_t>(qc);
      sum += qc;
    }
    sx[m] = sum;
    for (int64_t q = 0; q < npair; ++q)
      xp[m * npair + q] = static_cast<int32_t>((static_cast<uint32_t>(static_cast<uint16_t>(xq[m * 2 * npair + 2 * q]))) |
                                               (static_cast<uint32_t>(static_cast<uint16_t>(xq[m * 2 * npair + 2 * q + 1])) << 16));
  }
  Job J{wt.data_ptr<uint8_t>(), bptr, y.data_ptr<float>(), M, K, n, Nb, idx.data(), xp.data(), xq.data(), sx.data(),
        mul.data(), npair, 0, npair};
  auto stripe = [&](const Job& j, int64_t p0, int64_t p1, int32_t* keep) {
#if RAREFY_X86
    if (isa == kVnni) return stripe_vec<true>(j, p0, p1, keep);
    if (isa == kAvx512) return stripe_vec<false>(j, p0, p1, keep);
#endif
    stripe_scalar(j, p0, p1, keep);
  };

  // 4. K split for narrow layers (fewer 64-byte blocks than 2 per thread) at M <= 4: the row
  // pairs are cut into one contiguous part per thread, each summed over all of y into its own
  // int32 buffer, then added (integer sums: exact, so the result does not depend on the split).
  const int64_t blocks = (Nb + kBlock - 1) / kBlock;
  const int64_t threads = at::get_num_threads();
  if (ksplit != 0 && M <= 4 && threads > 1 && (ksplit == 1 || blocks < 2 * threads) && npair >= 2 * threads) {
    const int64_t parts = threads;
    const int64_t per = (npair + parts - 1) / parts;
    const int64_t len = M * 4 * Nb;
    std::vector<int32_t> part(static_cast<size_t>(parts * len));
    at::parallel_for(0, parts, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        Job j = J;
        j.qa = std::min<int64_t>(npair, i * per);
        j.qb = std::min<int64_t>(npair, (i + 1) * per);
        if (j.qa < j.qb) stripe(j, 0, Nb, part.data() + i * len);
        else std::fill(part.begin() + i * len, part.begin() + (i + 1) * len, 0);
      }
    });
    for (int64_t i = 1; i < parts; ++i)
      for (int64_t e = 0; e < len; ++e) part[e] += part[i * len + e];
    finish(J, 0, static_cast<int>(M), 0, Nb, part.data());
    return y;
  }

  // 3. otherwise stripes of whole 64-byte blocks over threads; a chunk gets >= ~32 KiB of weight
  const double block_bytes = static_cast<double>(kBlock) * std::max<int64_t>(1, nact);
  const int64_t grain = std::max<int64_t>(1, static_cast<int64_t>(32 * 1024 / block_bytes));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    stripe(J, b0 * kBlock, std::min<int64_t>(Nb, b1 * kBlock), nullptr);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(rarefy_ternary_sparse, m) {
  m.def("ternary_input_sparse(Tensor x, Tensor wt, Tensor scale, int n, float threshold, Tensor? bias=None, "
        "int isa=-1, int ksplit=-1) -> Tensor");
  m.def("best_isa() -> int", &best_isa);
}

// CPU kernel only; the Python side registers a shape-only fake, so torch.compile traces around it.
TORCH_LIBRARY_IMPL(rarefy_ternary_sparse, CPU, m) { m.impl("ternary_input_sparse", &ternary_input_sparse); }
