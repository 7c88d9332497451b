// Design probe for the ternary CPU kernel (not part of the extension): one 1024 x 4096 ternary
// GEMV (M = 1, layout v1, weights hot in L2, one thread), computed by each candidate inner loop.
// benchmarks/cpu_lowbit_gemv.py --probe builds and runs it; docs/lowbit-kernels.md cites it.
//
//   vnni-4acc     int8 activations; codes masked in place (b & 0x03, 0x0C, 0x30, 0xC0), four
//                 vpdpbusd accumulators recombined with shifts at the end (no per-byte shifts)
//   vnni-shift    int8 activations; codes shifted down ((b >> 2i) & 3), one accumulator per row
//                 (what the extension ships, act_quant="int8")
//   vnni-shift-2p the same on two activation planes (the extension's default 16-bit activations)
//   bf16          bf16 activations; vpmultishiftqb + mask turns codes into bf16 weights, vdpbf16ps
//   bf16-hi/lo    the same with x split into two bf16 parts (near-fp32 activations)
//   tl-scalar     T-MAC / bitnet.cpp TL idea: per 4 activations a 256-entry fp32 table
//                 byte -> sum (c_i - 1) x_i, one table load + add per byte
//   tl-gather     the same table read 16 bytes at a time with vpgatherdd
//   fp32-dense    fp32 weights, FMA (the same matrix as 16x the bytes), for scale
// and for weight-only int8 (the same 1024 x 4096 shape, int8 codes, 4 MiB):
//   int8-vnni-2p  w + 128 (one xor) x two int8 activation planes, vpdpbusd (what int8_gemv ships)
//   int8-widen    int8 -> int32 -> fp32 in registers, FMA with fp32 activations (exact)
//
// Build: g++ -O3 -fopenmp -o probe probe_ternary.cpp   (needs AVX-512 VNNI/VBMI/BF16 to run)

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#define TGT __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,avx512bf16,bmi2")))

namespace {
constexpr int N = 1024, K = 4096, KB = K / 4;

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// activations for the VNNI loops: chunk c of 64 packed bytes, sub-vector i: X_i[j] = q[256c + 4j + i]
void arrange(const std::vector<int8_t>& q, int8_t* xp) {
  for (int c = 0; c < KB; c += 64)
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 64; ++j) xp[4 * c + 64 * i + j] = q[4 * (c + j) + i];
}

TGT void vnni_4acc(const uint8_t* W, const int8_t* xp, int32_t qsum, float inv, float* y) {
  const __m512i m0 = _mm512_set1_epi8(0x03), m1 = _mm512_set1_epi8(0x0C), m2 = _mm512_set1_epi8(0x30),
                m3 = _mm512_set1_epi8(static_cast<char>(0xC0));
  for (int n = 0; n < N; n += 2) {
    __m512i a[2][4];
    for (int r = 0; r < 2; ++r)
      for (int i = 0; i < 4; ++i) a[r][i] = _mm512_setzero_si512();
    for (int c = 0; c < KB; c += 64) {
      const __m512i* X = reinterpret_cast<const __m512i*>(xp + 4 * c);
      for (int r = 0; r < 2; ++r) {
        const __m512i w = _mm512_loadu_si512(W + static_cast<size_t>(n + r) * KB + c);
        a[r][0] = _mm512_dpbusd_epi32(a[r][0], _mm512_and_si512(w, m0), _mm512_load_si512(X));
        a[r][1] = _mm512_dpbusd_epi32(a[r][1], _mm512_and_si512(w, m1), _mm512_load_si512(X + 1));
        a[r][2] = _mm512_dpbusd_epi32(a[r][2], _mm512_and_si512(w, m2), _mm512_load_si512(X + 2));
        a[r][3] = _mm512_dpbusd_epi32(a[r][3], _mm512_and_si512(w, m3), _mm512_load_si512(X + 3));
      }
    }
    for (int r = 0; r < 2; ++r) {
      __m512i t = _mm512_add_epi32(_mm512_srai_epi32(a[r][3], 2), a[r][2]);
      t = _mm512_add_epi32(_mm512_srai_epi32(t, 2), a[r][1]);
      t = _mm512_add_epi32(_mm512_srai_epi32(t, 2), a[r][0]);
      y[n + r] = static_cast<float>(_mm512_reduce_add_epi32(t) - qsum) * inv;
    }
  }
}

template <int PL>
TGT void vnni_shift(const uint8_t* W, const int8_t* const* xp, const int32_t* qsum, const float* inv, float* y) {
  const __m512i m3 = _mm512_set1_epi8(3);
  for (int n = 0; n < N; n += 4) {
    __m512i a[4][PL];
    for (int r = 0; r < 4; ++r)
      for (int p = 0; p < PL; ++p) a[r][p] = _mm512_setzero_si512();
    for (int c = 0; c < KB; c += 64) {
      __m512i u[4][4];
      for (int r = 0; r < 4; ++r) {
        const __m512i w = _mm512_loadu_si512(W + static_cast<size_t>(n + r) * KB + c);
        u[r][0] = _mm512_and_si512(w, m3);
        u[r][1] = _mm512_and_si512(_mm512_srli_epi16(w, 2), m3);
        u[r][2] = _mm512_and_si512(_mm512_srli_epi16(w, 4), m3);
        u[r][3] = _mm512_and_si512(_mm512_srli_epi16(w, 6), m3);
      }
      for (int p = 0; p < PL; ++p)
        for (int i = 0; i < 4; ++i) {
          const __m512i xv = _mm512_load_si512(xp[p] + 4 * c + 64 * i);
          for (int r = 0; r < 4; ++r) a[r][p] = _mm512_dpbusd_epi32(a[r][p], u[r][i], xv);
        }
    }
    for (int r = 0; r < 4; ++r) {
      float s = 0.f;
      for (int p = 0; p < PL; ++p) s += static_cast<float>(_mm512_reduce_add_epi32(a[r][p]) - qsum[p]) * inv[p];
      y[n + r] = s;
    }
  }
}

// bf16: word w of a 32-column step = code << 7 = bf16(code * 2^-126); x pre-scaled by 2^100.
template <bool SPLIT>
TGT void bf16_dot(const uint8_t* W, const uint16_t* xh, const uint16_t* xl, float xsum, float* y) {
  alignas(64) uint8_t ctrl[64];
  for (int w = 0; w < 32; ++w) {
    ctrl[2 * w] = static_cast<uint8_t>((2 * w - 7) & 63);
    ctrl[2 * w + 1] = static_cast<uint8_t>(2 * w + 1);
  }
  const __m512i C = _mm512_load_si512(ctrl), AM = _mm512_set1_epi16(0x0180);
  for (int n = 0; n < N; n += 2) {
    __m512 a[2][4];
    for (int r = 0; r < 2; ++r)
      for (int i = 0; i < 4; ++i) a[r][i] = _mm512_setzero_ps();
    for (int c = 0; c < KB; c += 16)
      for (int h = 0; h < 2; ++h) {
        const __m512bh X = reinterpret_cast<__m512bh>(_mm512_loadu_si512(xh + 4 * c + 32 * h));
        __m512bh XL;
        if (SPLIT) XL = reinterpret_cast<__m512bh>(_mm512_loadu_si512(xl + 4 * c + 32 * h));
        for (int r = 0; r < 2; ++r) {
          int64_t q;
          std::memcpy(&q, W + static_cast<size_t>(n + r) * KB + c + 8 * h, 8);
          const __m512i wv = _mm512_and_si512(_mm512_multishift_epi64_epi8(C, _mm512_set1_epi64(q)), AM);
          a[r][h] = _mm512_dpbf16_ps(a[r][h], reinterpret_cast<__m512bh>(wv), X);
          if (SPLIT) a[r][2 + h] = _mm512_dpbf16_ps(a[r][2 + h], reinterpret_cast<__m512bh>(wv), XL);
        }
      }
    for (int r = 0; r < 2; ++r) {
      const __m512 s = _mm512_add_ps(_mm512_add_ps(a[r][0], a[r][1]), _mm512_add_ps(a[r][2], a[r][3]));
      y[n + r] = _mm512_reduce_add_ps(s) * 67108864.f - xsum;  // * 2^26
    }
  }
}

void tl_scalar(const uint8_t* W, const float* T, float* y) {
  for (int n = 0; n < N; ++n) {
    const uint8_t* w = W + static_cast<size_t>(n) * KB;
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (int j = 0; j < KB; j += 4) {
      s0 += T[static_cast<size_t>(j) * 256 + w[j]];
      s1 += T[static_cast<size_t>(j + 1) * 256 + w[j + 1]];
      s2 += T[static_cast<size_t>(j + 2) * 256 + w[j + 2]];
      s3 += T[static_cast<size_t>(j + 3) * 256 + w[j + 3]];
    }
    y[n] = (s0 + s1) + (s2 + s3);
  }
}

TGT void tl_gather(const uint8_t* W, const float* T, float* y) {
  const __m512i base = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(256));
  for (int n = 0; n < N; ++n) {
    const uint8_t* w = W + static_cast<size_t>(n) * KB;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (int j = 0; j < KB; j += 32) {
      const __m512i i0 = _mm512_add_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j))), base);
      const __m512i i1 = _mm512_add_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j + 16))), base);
      a0 = _mm512_add_ps(a0, _mm512_i32gather_ps(i0, T + static_cast<size_t>(j) * 256, 4));
      a1 = _mm512_add_ps(a1, _mm512_i32gather_ps(i1, T + static_cast<size_t>(j + 16) * 256, 4));
    }
    y[n] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  }
}

TGT void fp32_dense(const float* W, const float* x, float* y) {
  for (int n = 0; n < N; n += 4) {
    __m512 a[4];
    for (int r = 0; r < 4; ++r) a[r] = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 16) {
      const __m512 xv = _mm512_loadu_ps(x + k);
      for (int r = 0; r < 4; ++r) a[r] = _mm512_fmadd_ps(_mm512_loadu_ps(W + static_cast<size_t>(n + r) * K + k), xv, a[r]);
    }
    for (int r = 0; r < 4; ++r) y[n + r] = _mm512_reduce_add_ps(a[r]);
  }
}

TGT void int8_vnni_2p(const int8_t* W, const int8_t* x1, const int8_t* x2, float* y) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int n = 0; n < N; n += 4) {
    __m512i a[4][2];
    for (int r = 0; r < 4; ++r) a[r][0] = a[r][1] = _mm512_setzero_si512();
    for (int k = 0; k < K; k += 64) {
      const __m512i xa = _mm512_load_si512(x1 + k), xb = _mm512_load_si512(x2 + k);
      for (int r = 0; r < 4; ++r) {
        const __m512i u = _mm512_xor_si512(_mm512_loadu_si512(W + static_cast<size_t>(n + r) * K + k), flip);
        a[r][0] = _mm512_dpbusd_epi32(a[r][0], u, xa);
        a[r][1] = _mm512_dpbusd_epi32(a[r][1], u, xb);
      }
    }
    for (int r = 0; r < 4; ++r)
      y[n + r] = static_cast<float>(_mm512_reduce_add_epi32(a[r][0])) + static_cast<float>(_mm512_reduce_add_epi32(a[r][1]));
  }
}

TGT void int8_widen(const int8_t* W, const float* x, float* y) {
  for (int n = 0; n < N; n += 4) {
    __m512 a[4];
    for (int r = 0; r < 4; ++r) a[r] = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 16) {
      const __m512 xv = _mm512_loadu_ps(x + k);
      for (int r = 0; r < 4; ++r) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(W + static_cast<size_t>(n + r) * K + k));
        a[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), xv, a[r]);
      }
    }
    for (int r = 0; r < 4; ++r) y[n + r] = _mm512_reduce_add_ps(a[r]);
  }
}

uint16_t bf16_rne(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return static_cast<uint16_t>((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}
float from_bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}
}  // namespace

int main() {
  if (!__builtin_cpu_supports("avx512vnni") || !__builtin_cpu_supports("avx512vbmi") ||
      !__builtin_cpu_supports("avx512bf16")) {
    std::printf("probe needs AVX-512 VNNI, VBMI and BF16\n");
    return 0;
  }
  std::mt19937 rng(0);
  std::vector<uint8_t> W(static_cast<size_t>(N) * KB);
  for (auto& b : W) {
    uint8_t v = 0;
    for (int t = 0; t < 4; ++t) v |= static_cast<uint8_t>(rng() % 3) << (2 * t);
    b = v;
  }
  std::normal_distribution<float> nd;
  std::vector<float> x(K), Wf(static_cast<size_t>(N) * K);
  for (auto& v : x) v = nd(rng);
  for (size_t i = 0; i < Wf.size(); ++i) Wf[i] = static_cast<float>(((W[i / 4] >> (2 * (i % 4))) & 3)) - 1.f;
  std::vector<double> yr(N);
  for (int n = 0; n < N; ++n) {
    double s = 0;
    for (int k = 0; k < K; ++k) s += static_cast<double>(Wf[static_cast<size_t>(n) * K + k]) * x[k];
    yr[n] = s;
  }
  // int8 planes (q1, q2 = the 16-bit extension), bf16 hi/lo, TL tables
  float amax = 0;
  for (float v : x) amax = std::max(amax, std::fabs(v));
  const float s = 127.f / amax;
  std::vector<int8_t> q1(K), q2(K);
  int32_t qs[2] = {0, 0};
  for (int k = 0; k < K; ++k) {
    const float t = x[k] * s, r = std::nearbyint(t);
    q1[k] = static_cast<int8_t>(r);
    q2[k] = static_cast<int8_t>(std::nearbyint((t - r) * 254.f));
    qs[0] += q1[k], qs[1] += q2[k];
  }
  int8_t* xp1 = static_cast<int8_t*>(std::aligned_alloc(64, K));
  int8_t* xp2 = static_cast<int8_t*>(std::aligned_alloc(64, K));
  arrange(q1, xp1);
  arrange(q2, xp2);
  const int8_t* planes[2] = {xp1, xp2};
  const float inv[2] = {1.f / s, 1.f / (254.f * s)};
  std::vector<uint16_t> xh(K), xl(K);
  float xsum = 0;
  for (int k = 0; k < K; ++k) {
    const float v = x[k] * 1.2676506e30f;  // 2^100
    xh[k] = bf16_rne(v);
    xl[k] = bf16_rne(v - from_bf16(xh[k]));
    xsum += x[k];
  }
  std::vector<float> T(static_cast<size_t>(KB) * 256);
  for (int j = 0; j < KB; ++j)
    for (int b = 0; b < 256; ++b) {
      float t = 0;
      for (int i = 0; i < 4; ++i) t += static_cast<float>(((b >> (2 * i)) & 3) - 1) * x[4 * j + i];
      T[static_cast<size_t>(j) * 256 + b] = t;
    }
  std::vector<float> y(N);
  auto run = [&](const char* name, auto f) {
    double best = 1e9;
    for (int r = 0; r < 200; ++r) {
      const double t0 = now();
      f();
      best = std::min(best, now() - t0);
    }
    double err = 0, mag = 0;
    for (int n = 0; n < N; ++n) err = std::max(err, std::fabs(y[n] - yr[n])), mag = std::max(mag, std::fabs(yr[n]));
    std::printf("%-14s %8.1f us   max |err| / max |y| = %.1e\n", name, best * 1e6, err / mag);
  };
  run("vnni-4acc", [&] { vnni_4acc(W.data(), xp1, qs[0], inv[0], y.data()); });
  run("vnni-shift", [&] { vnni_shift<1>(W.data(), planes, qs, inv, y.data()); });
  run("vnni-shift-2p", [&] { vnni_shift<2>(W.data(), planes, qs, inv, y.data()); });
  run("bf16", [&] { bf16_dot<false>(W.data(), xh.data(), xl.data(), xsum, y.data()); });
  run("bf16-hi/lo", [&] { bf16_dot<true>(W.data(), xh.data(), xl.data(), xsum, y.data()); });
  run("tl-scalar", [&] { tl_scalar(W.data(), T.data(), y.data()); });
  run("tl-gather", [&] { tl_gather(W.data(), T.data(), y.data()); });
  run("fp32-dense", [&] { fp32_dense(Wf.data(), x.data(), y.data()); });
  // weight-only int8 (times only: these compute a different product)
  std::vector<int8_t> W8(static_cast<size_t>(N) * K);
  for (auto& v : W8) v = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
  auto time_only = [&](const char* name, auto f) {
    double best = 1e9;
    for (int r = 0; r < 200; ++r) {
      const double t0 = now();
      f();
      best = std::min(best, now() - t0);
    }
    std::printf("%-14s %8.1f us\n", name, best * 1e6);
  };
  int8_t* n1 = static_cast<int8_t*>(std::aligned_alloc(64, K));
  int8_t* n2 = static_cast<int8_t*>(std::aligned_alloc(64, K));
  std::memcpy(n1, q1.data(), K);
  std::memcpy(n2, q2.data(), K);
  time_only("int8-vnni-2p", [&] { int8_vnni_2p(W8.data(), n1, n2, y.data()); });
  time_only("int8-widen", [&] { int8_widen(W8.data(), x.data(), y.data()); });
  std::free(n1);
  std::free(n2);
  std::free(xp1);
  std::free(xp2);
  return 0;
}
