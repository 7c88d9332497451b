// Differential weight cache for one SwiGLU MLP on CPU, and the sparse MLP that reads it.
//
// A cache keeps the active neurons' weights of one MLP (gate row, up row, down column, each an
// H-vector) in a bounded pool of `cap` slots. The pool is compact: slots [0, n) hold the n
// active neurons, so the MLP reads the first n rows with no gather.
//
//   wc_update  new active-neuron mask -> XOR with the previous mask; removed neurons free their
//              slots, added neurons are copied into freed slots (paired replacement) or appended;
//              if fewer neurons are added than removed, the last valid slots move into the holes
//              below the new count. One contiguous copy per changed neuron and matrix.
//   wc_mlp     y = sum_{j<n} silu(g_j . x) * (u_j . x) * d_j  over pool rows g, u, d (fp16 or
//              fp32 weights, fp32 x / y), fused in one pass over the rows.
//
// State (owned by the Python class, rarefy/sparsity/weight_cache.py):
//   maps  int32 [1 + I + cap]: maps[0] = n, maps[1 + i] = slot of neuron i (-1 if inactive),
//         maps[1 + I + s] = neuron in slot s (-1 if free)
//   prev  bool  [I], the current (previous token's) mask
// Pool rows may be strided (gate and up interleaved per slot: row stride 2H) but each row is a
// contiguous H-vector; source rows likewise (gate [I, H], up [I, H], down^T [I, H]).
//
// ISA: AVX-512 (F/BW/VL, cvtph2ps widening of fp16 in registers) or scalar, picked at run time;
// the vector code uses __attribute__((target)) so the library loads on any x86-64. Threads:
// at::parallel_for (OpenMP, torch.get_num_threads()).

#include <ATen/Parallel.h>
#include "../rarefy_check.h"
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define RAREFY_X86 1
#include <immintrin.h>
#else
#define RAREFY_X86 0
#endif

namespace {

enum Isa : int64_t { kAuto = -1, kScalar = 0, kAvx512 = 1 };

#if RAREFY_X86
bool has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}
#else
bool has_avx512() { return false; }
#endif

int64_t best_isa() { return has_avx512() ? kAvx512 : kScalar; }

// ============================================================================ update

struct Job {
  int32_t dst;     // pool slot written
  int32_t src;     // source neuron (from_pool == 0) or pool slot (from_pool == 1)
  int32_t from_pool;
};

void check_row_matrix(const at::Tensor& t, const char* name, int64_t rows, int64_t H, at::ScalarType dt) {
  RAREFY_CHECK_VALUE(t.device().is_cpu(), "weight cache: ", name, " must be a CPU tensor");
  RAREFY_CHECK_TYPE(t.scalar_type() == dt, "weight cache: ", name, " must be ", dt, ", got ", t.scalar_type());
  RAREFY_CHECK_VALUE(t.dim() == 2 && (rows < 0 || t.size(0) == rows) && t.size(1) == H, "weight cache: ", name,
                    " must be [", rows < 0 ? "rows" : std::to_string(rows), ", ", H, "], got ", rarefy::shape_str(t));
  RAREFY_CHECK_VALUE(t.stride(1) == 1 || H == 1, "weight cache: ", name, " rows must be contiguous");
}

// 8 bool bytes -> bit 0 of each byte set iff the byte is nonzero (torch bools are 0/1, but a
// bool view of other bytes must not corrupt the bookkeeping).
inline uint64_t bool_bits(uint64_t a) {
  a |= a >> 4;
  a |= a >> 2;
  a |= a >> 1;
  return a & 0x0101010101010101ull;
}

// Returns the new number of active neurons, or -(mask's active count) if the mask has more
// active neurons than the pool has slots and no scores were given (nothing is changed then).
int64_t wc_update(const at::Tensor& mask, const c10::optional<at::Tensor>& scores, const at::Tensor& src_g,
                  const at::Tensor& src_u, const at::Tensor& src_d, const at::Tensor& pool_g,
                  const at::Tensor& pool_u, const at::Tensor& pool_d, const at::Tensor& maps,
                  const at::Tensor& prev) {
  const int64_t I = prev.size(0);
  const int64_t cap = pool_d.size(0);
  const int64_t H = pool_d.size(1);
  RAREFY_CHECK_TYPE(mask.scalar_type() == at::kBool, "mask must be a bool tensor, got ", mask.scalar_type());
  RAREFY_CHECK_VALUE(mask.device().is_cpu(), "mask must be a CPU tensor");
  RAREFY_CHECK_VALUE(mask.dim() == 1 && mask.size(0) == I, "mask must have shape [", I, "] (intermediate size), got ",
                    rarefy::shape_str(mask));
  RAREFY_CHECK_VALUE(mask.is_contiguous(), "mask must be contiguous");
  // State tensors: built by the Python class; checked cheaply against misuse.
  RAREFY_CHECK_VALUE(maps.scalar_type() == at::kInt && maps.is_contiguous() && maps.numel() == 1 + I + cap,
                    "weight cache: bad maps tensor");
  RAREFY_CHECK_VALUE(prev.scalar_type() == at::kBool && prev.is_contiguous(), "weight cache: bad prev tensor");
  const at::ScalarType dt = pool_d.scalar_type();
  RAREFY_CHECK_TYPE(dt == at::kHalf || dt == at::kFloat, "weight cache: pool must be float16 or float32");
  check_row_matrix(src_g, "gate source", I, H, dt);
  check_row_matrix(src_u, "up source", I, H, dt);
  check_row_matrix(src_d, "down^T source", I, H, dt);
  check_row_matrix(pool_g, "gate pool", cap, H, dt);
  check_row_matrix(pool_u, "up pool", cap, H, dt);
  check_row_matrix(pool_d, "down pool", cap, H, dt);

  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  uint8_t* pv = reinterpret_cast<uint8_t*>(prev.data_ptr<bool>());
  int32_t* mp = maps.data_ptr<int32_t>();
  int32_t* n2s = mp + 1;
  int32_t* s2n = mp + 1 + I;
  const int64_t n = mp[0];

  // Active count, 8 mask bytes at a time (any nonzero byte counts as true).
  int64_t count = 0;
  int64_t i8 = 0;
  for (; i8 + 8 <= I; i8 += 8) {
    uint64_t a;
    std::memcpy(&a, m + i8, 8);
    count += __builtin_popcountll(bool_bits(a));
  }
  for (int64_t i = i8; i < I; ++i) count += m[i] != 0;

  std::vector<uint8_t> topk;  // the effective mask when scores pick the top-`cap` neurons
  if (count > cap) {
    if (!scores.has_value() || !scores->defined()) return -count;
    const at::Tensor& s = *scores;
    RAREFY_CHECK_TYPE(s.scalar_type() == at::kFloat, "scores must be float32, got ", s.scalar_type());
    RAREFY_CHECK_VALUE(s.device().is_cpu() && s.dim() == 1 && s.size(0) == I && s.is_contiguous(),
                      "scores must be a contiguous CPU tensor of shape [", I, "], got ", rarefy::shape_str(s));
    const float* sc = s.data_ptr<float>();
    std::vector<int32_t> act;
    act.reserve(count);
    for (int64_t i = 0; i < I; ++i)
      if (m[i]) act.push_back(static_cast<int32_t>(i));
    // Highest score first; ties (and NaN, ranked last) broken by the lower neuron index.
    auto better = [sc](int32_t a, int32_t b) {
      const float x = sc[a], y = sc[b];
      const bool xn = std::isnan(x), yn = std::isnan(y);
      if (xn != yn) return yn;
      if (!xn && x != y) return x > y;
      return a < b;
    };
    std::nth_element(act.begin(), act.begin() + cap, act.end(), better);
    topk.assign(static_cast<size_t>(I), 0);
    for (int64_t k = 0; k < cap; ++k) topk[act[k]] = 1;
    m = topk.data();
    count = cap;
  }

  // XOR with the previous mask, 8 neurons per step. Removed neurons leave holes.
  std::vector<uint8_t> hole(static_cast<size_t>(n), 0);
  std::vector<int32_t> added;
  int64_t nrem = 0;
  auto change = [&](int64_t i) {
    if (pv[i]) {
      const int32_t s = n2s[i];
      hole[s] = 1;
      n2s[i] = -1;
      s2n[s] = -1;
      ++nrem;
      pv[i] = 0;
    } else {
      added.push_back(static_cast<int32_t>(i));
      pv[i] = 1;
    }
  };
  for (i8 = 0; i8 + 8 <= I; i8 += 8) {
    uint64_t a, b;
    std::memcpy(&a, m + i8, 8);
    std::memcpy(&b, pv + i8, 8);
    uint64_t x = bool_bits(a) ^ b;  // prev bytes are always 0 or 1
    while (x) {
      const int byte = __builtin_ctzll(x) >> 3;
      change(i8 + byte);
      x &= ~(0xFFull << (8 * byte));
    }
  }
  for (int64_t i = i8; i < I; ++i)
    if ((m[i] != 0) != (pv[i] != 0)) change(i);

  const int64_t nadd = static_cast<int64_t>(added.size());
  const int64_t n_new = n - nrem + nadd;
  TORCH_INTERNAL_ASSERT(n_new == count && n_new <= cap, "weight cache: inconsistent state");

  // Paired replacement: added neurons take the lowest holes, then append at n, n+1, ...
  std::vector<Job> jobs;
  jobs.reserve(static_cast<size_t>(std::max(nadd, nrem)));
  int64_t ai = 0;
  for (int64_t j = 0; j < n && ai < nadd; ++j) {
    if (!hole[j]) continue;
    const int32_t i = added[ai++];
    hole[j] = 0;
    s2n[j] = i;
    n2s[i] = static_cast<int32_t>(j);
    jobs.push_back({static_cast<int32_t>(j), i, 0});
  }
  for (int64_t j = n; ai < nadd; ++j) {
    const int32_t i = added[ai++];
    s2n[j] = i;
    n2s[i] = static_cast<int32_t>(j);
    jobs.push_back({static_cast<int32_t>(j), i, 0});
  }
  if (nrem > nadd) {
    // Fewer added than removed: holes below n_new are filled by moving the last valid slots
    // (slots >= n_new that are not holes; there are exactly as many of them as such holes).
    int64_t t = n - 1;
    for (int64_t j = 0; j < n_new; ++j) {
      if (!hole[j]) continue;
      while (hole[t]) --t;
      TORCH_INTERNAL_ASSERT(t >= n_new, "weight cache: compaction out of range");
      const int32_t i = s2n[t];
      s2n[j] = i;
      n2s[i] = static_cast<int32_t>(j);
      s2n[t] = -1;
      jobs.push_back({static_cast<int32_t>(j), static_cast<int32_t>(t), 1});
      --t;
    }
  }
  mp[0] = static_cast<int32_t>(n_new);

  // Copies: every job writes its own slot and reads a source row or a pool slot >= n_new that
  // no job writes, so they run in any order, in parallel when there is enough to copy.
  if (!jobs.empty()) {
    const size_t esz = pool_d.element_size();
    const size_t row = static_cast<size_t>(H) * esz;
    char* pg = static_cast<char*>(pool_g.data_ptr());
    char* pu = static_cast<char*>(pool_u.data_ptr());
    char* pd = static_cast<char*>(pool_d.data_ptr());
    const char* sg = static_cast<const char*>(src_g.data_ptr());
    const char* su = static_cast<const char*>(src_u.data_ptr());
    const char* sd = static_cast<const char*>(src_d.data_ptr());
    const size_t pgs = pool_g.stride(0) * esz, pus = pool_u.stride(0) * esz, pds = pool_d.stride(0) * esz;
    const size_t sgs = src_g.stride(0) * esz, sus = src_u.stride(0) * esz, sds = src_d.stride(0) * esz;
    const Job* J = jobs.data();
    auto sources = [&](const Job& jb, const char** f) {
      if (jb.from_pool) {
        f[0] = pg + jb.src * pgs; f[1] = pu + jb.src * pus; f[2] = pd + jb.src * pds;
      } else {
        f[0] = sg + jb.src * sgs; f[1] = su + jb.src * sus; f[2] = sd + jb.src * sds;
      }
    };
    // The source rows are scattered (one neuron here, one there): the hardware prefetcher
    // cannot guess the next one, so the rows of the job after next are requested while this
    // job copies. Prefetches never fault.
    constexpr int64_t kAhead = 2;
    auto prefetch_job = [&](const Job& jb) {
#if RAREFY_X86
      const char* f[3];
      sources(jb, f);
      for (int a = 0; a < 3; ++a)
        for (size_t o = 0; o < row; o += 64) _mm_prefetch(f[a] + o, _MM_HINT_T0);
#else
      (void)jb;
#endif
    };
    auto run = [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < std::min(e, b + kAhead); ++k) prefetch_job(J[k]);
      for (int64_t k = b; k < e; ++k) {
        const Job& jb = J[k];
        if (k + kAhead < e) prefetch_job(J[k + kAhead]);
        char* dg = pg + jb.dst * pgs;
        char* du = pu + jb.dst * pus;
        char* dd = pd + jb.dst * pds;
        const char* f[3];
        sources(jb, f);
        const char *fg = f[0], *fu = f[1], *fd = f[2];
        if (du == dg + row && fu == fg + row) {
          std::memcpy(dg, fg, 2 * row);  // gate and up rows adjacent at both ends: one copy
        } else {
          std::memcpy(dg, fg, row);
          std::memcpy(du, fu, row);
        }
        std::memcpy(dd, fd, row);
      }
    };
    const int64_t per_job = static_cast<int64_t>(3 * row);
    const int64_t grain = std::max<int64_t>(1, (128 * 1024) / per_job);
    at::parallel_for(0, static_cast<int64_t>(jobs.size()), grain, run);
  }
  return n_new;
}

// ============================================================================ sparse MLP

struct Mlp {
  const float* x;  // [M, H]
  const void* g;   // rows of gate (pool rows), stride gs elements
  const void* u;
  const void* d;   // rows of down^T
  int64_t gs, us, ds;
  int64_t n, H, M;
};

inline float silu_mul(float g, float u) { return g / (1.f + std::exp(-g)) * u; }

inline float to_f(float v) { return v; }
inline float to_f(uint16_t v) { return static_cast<float>(c10::Half(v, c10::Half::from_bits())); }

// Rows [j0, j1) of the pool: y_part[M, H] = sum_j h_j * d_j.
template <typename T>
void rows_scalar(const Mlp& p, int64_t j0, int64_t j1, float* y) {
  const T* G = static_cast<const T*>(p.g);
  const T* U = static_cast<const T*>(p.u);
  const T* D = static_cast<const T*>(p.d);
  const int64_t H = p.H;
  for (int64_t j = j0; j < j1; ++j) {
    const T* g = G + j * p.gs;
    const T* u = U + j * p.us;
    const T* d = D + j * p.ds;
    for (int64_t m = 0; m < p.M; ++m) {
      const float* x = p.x + m * H;
      float sg = 0.f, su = 0.f;
      for (int64_t k = 0; k < H; ++k) {
        sg += to_f(g[k]) * x[k];
        su += to_f(u[k]) * x[k];
      }
      const float h = silu_mul(sg, su);
      float* ym = y + m * H;
      for (int64_t k = 0; k < H; ++k) ym[k] += h * to_f(d[k]);
    }
  }
}

#if RAREFY_X86
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,f16c")))

AVX512_TARGET inline __m512 load16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
AVX512_TARGET inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
AVX512_TARGET inline __m512 load16(const uint16_t* p, __mmask16 k) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
}
AVX512_TARGET inline __m512 load16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }

inline void prefetch(const void* a) { _mm_prefetch(static_cast<const char*>(a), _MM_HINT_T0); }

// Horizontal sums of 8 vectors in one tree: lanes 0..3 of the result hold the sums of a..d,
// lanes 8..11 those of e..h (12 shuffles + 7 adds instead of 8 separate reductions).
AVX512_TARGET inline __m512 reduce8(__m512 a, __m512 b, __m512 c, __m512 d, __m512 e, __m512 f, __m512 g,
                                    __m512 h) {
  // per 128-bit lane: (a0+a2, b0+b2, a1+a3, b1+b3)
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 ef = _mm512_add_ps(_mm512_unpacklo_ps(e, f), _mm512_unpackhi_ps(e, f));
  const __m512 gh = _mm512_add_ps(_mm512_unpacklo_ps(g, h), _mm512_unpackhi_ps(g, h));
  // per lane: (a, b, c, d) partial sums
  const __m512 abcd = _mm512_add_ps(
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
  const __m512 efgh = _mm512_add_ps(
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ef), _mm512_castps_pd(gh))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ef), _mm512_castps_pd(gh))));
  // lanes: abcd0+abcd1, abcd2+abcd3, efgh0+efgh1, efgh2+efgh3
  const __m512 v = _mm512_add_ps(_mm512_shuffle_f32x4(abcd, efgh, _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_f32x4(abcd, efgh, _MM_SHUFFLE(3, 1, 3, 1)));
  // lane 0: sums of a..d, lane 2: sums of e..h
  return _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
}

// R consecutive pool rows: gate and up dot products for every row of x, then their
// contribution to y. While a block is read, the next block's rows (same offsets) are
// prefetched, one cache line at a time; prefetches never fault.
template <typename T, int R>
AVX512_TARGET void block_avx512(const Mlp& p, int64_t j0, float* y) {
  const T* G = static_cast<const T*>(p.g) + j0 * p.gs;
  const T* U = static_cast<const T*>(p.u) + j0 * p.us;
  const T* D = static_cast<const T*>(p.d) + j0 * p.ds;
  const int64_t H = p.H;
  constexpr int64_t kLine = 64 / sizeof(T);  // elements per cache line
  const int64_t Hv = H & ~int64_t(15);
  const __mmask16 tail = static_cast<__mmask16>((1u << (H - Hv)) - 1u);
  for (int64_t m = 0; m < p.M; ++m) {
    const float* x = p.x + m * H;
    __m512 ag[R], au[R];
    for (int r = 0; r < R; ++r) ag[r] = au[r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k < Hv; k += 16) {
      if (m == 0 && (k % kLine) == 0)
        for (int r = 0; r < R; ++r) {
          prefetch(G + (R + r) * p.gs + k);
          prefetch(U + (R + r) * p.us + k);
        }
      const __m512 xv = _mm512_loadu_ps(x + k);
      for (int r = 0; r < R; ++r) {
        ag[r] = _mm512_fmadd_ps(load16(G + r * p.gs + k), xv, ag[r]);
        au[r] = _mm512_fmadd_ps(load16(U + r * p.us + k), xv, au[r]);
      }
    }
    if (k < H) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail, x + k);
      for (int r = 0; r < R; ++r) {
        ag[r] = _mm512_fmadd_ps(load16(G + r * p.gs + k, tail), xv, ag[r]);
        au[r] = _mm512_fmadd_ps(load16(U + r * p.us + k, tail), xv, au[r]);
      }
    }
    float hv[R];
    if constexpr (R == 4) {
      alignas(64) float s[16];
      _mm512_store_ps(s, reduce8(ag[0], ag[1], ag[2], ag[3], au[0], au[1], au[2], au[3]));
      for (int r = 0; r < 4; ++r) hv[r] = silu_mul(s[r], s[8 + r]);
    } else {
      for (int r = 0; r < R; ++r) hv[r] = silu_mul(_mm512_reduce_add_ps(ag[r]), _mm512_reduce_add_ps(au[r]));
    }
    // Down: y_m += sum_r h_r * d_r, y in L1, read and written once per block.
    float* ym = y + m * H;
    __m512 hb[R];
    for (int r = 0; r < R; ++r) hb[r] = _mm512_set1_ps(hv[r]);
    k = 0;
    for (; k < Hv; k += 16) {
      if (m == 0 && (k % kLine) == 0)
        for (int r = 0; r < R; ++r) prefetch(D + (R + r) * p.ds + k);
      __m512 acc = _mm512_loadu_ps(ym + k);
      for (int r = 0; r < R; ++r) acc = _mm512_fmadd_ps(hb[r], load16(D + r * p.ds + k), acc);
      _mm512_storeu_ps(ym + k, acc);
    }
    if (k < H) {
      __m512 acc = _mm512_maskz_loadu_ps(tail, ym + k);
      for (int r = 0; r < R; ++r) acc = _mm512_fmadd_ps(hb[r], load16(D + r * p.ds + k, tail), acc);
      _mm512_mask_storeu_ps(ym + k, tail, acc);
    }
  }
}

template <typename T>
AVX512_TARGET void rows_avx512(const Mlp& p, int64_t j0, int64_t j1, float* y) {
  int64_t j = j0;
  for (; j + 4 <= j1; j += 4) block_avx512<T, 4>(p, j, y);
  for (; j < j1; ++j) block_avx512<T, 1>(p, j, y);
}
#endif

// y = sum_{j<n} silu(g_j . x) * (u_j . x) * d_j, x fp32 [..., H]; g, u, d: [>= n, H] rows.
at::Tensor wc_mlp(const at::Tensor& x, const at::Tensor& g, const at::Tensor& u, const at::Tensor& d, int64_t n,
                  int64_t isa) {
  RAREFY_CHECK_VALUE(x.device().is_cpu(), "sparse mlp: x must be a CPU tensor");
  RAREFY_CHECK_TYPE(x.scalar_type() == at::kFloat, "sparse mlp: x must be float32, got ", x.scalar_type());
  RAREFY_CHECK_VALUE(x.dim() >= 1 && x.is_contiguous(), "sparse mlp: x must be a contiguous [..., H] tensor");
  const int64_t H = x.size(-1);
  const at::ScalarType dt = d.scalar_type();
  RAREFY_CHECK_TYPE(dt == at::kHalf || dt == at::kFloat, "sparse mlp: weights must be float16 or float32, got ", dt);
  RAREFY_CHECK_VALUE(n >= 0 && d.dim() == 2 && n <= d.size(0), "sparse mlp: n = ", n, " out of range for ", rarefy::shape_str(d));
  check_row_matrix(g, "gate rows", -1, H, dt);
  check_row_matrix(u, "up rows", -1, H, dt);
  check_row_matrix(d, "down^T rows", -1, H, dt);
  RAREFY_CHECK_VALUE(g.size(0) >= n && u.size(0) >= n, "sparse mlp: fewer than n = ", n, " gate/up rows");
  const int64_t best = best_isa();
  if (isa == kAuto) isa = best;
  RAREFY_CHECK_VALUE(isa >= kScalar && isa <= best, "sparse mlp: isa ", isa, " not available (best ", best, ")");

  const int64_t M = x.numel() / std::max<int64_t>(1, H);
  at::Tensor y = at::empty(x.sizes(), x.options());
  float* yp = y.data_ptr<float>();
  const int64_t MH = M * H;
  if (MH == 0) return y;
  if (n == 0) {
    std::fill(yp, yp + MH, 0.f);
    return y;
  }
  Mlp p{x.data_ptr<float>(), g.data_ptr(), u.data_ptr(), d.data_ptr(), g.stride(0), u.stride(0), d.stride(0),
        n, H, M};
  const bool half = dt == at::kHalf;
  void (*rows)(const Mlp&, int64_t, int64_t, float*) = half ? rows_scalar<uint16_t> : rows_scalar<float>;
#if RAREFY_X86
  if (isa == kAvx512) rows = half ? rows_avx512<uint16_t> : rows_avx512<float>;
#endif

  // Rows in blocks of 4, split over threads; each thread accumulates its own y (L1-resident
  // for decode sizes), summed at the end. A thread gets >= ~48 KiB of weights.
  constexpr int64_t kBlock = 4;
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
  const int64_t block_bytes = kBlock * 3 * H * static_cast<int64_t>(d.element_size());
  const int64_t grain = std::max<int64_t>(1, (48 * 1024) / std::max<int64_t>(1, block_bytes));
  const int64_t T = std::max<int>(1, at::get_num_threads());
  thread_local std::vector<float> part;  // per calling thread: [T, M, H] partial sums
  if (static_cast<int64_t>(part.size()) < T * MH) part.resize(T * MH);
  std::vector<char> used(static_cast<size_t>(T), 0);
  float* P = part.data();
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    const int64_t t = std::min<int64_t>(at::get_thread_num(), T - 1);
    float* yt = P + t * MH;
    if (!used[t]) std::fill(yt, yt + MH, 0.f);
    used[t] = 1;
    rows(p, b0 * kBlock, std::min(b1 * kBlock, n), yt);
  });
  bool first = true;
  for (int64_t t = 0; t < T; ++t) {
    if (!used[t]) continue;
    const float* yt = P + t * MH;
    if (first) std::memcpy(yp, yt, sizeof(float) * MH);
    else
      for (int64_t k = 0; k < MH; ++k) yp[k] += yt[k];
    first = false;
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(rarefy_wcache, m) {
  m.def("update(Tensor mask, Tensor? scores, Tensor src_g, Tensor src_u, Tensor src_d, Tensor pool_g, "
        "Tensor pool_u, Tensor pool_d, Tensor maps, Tensor prev) -> int",
        &wc_update);
  m.def("sparse_mlp(Tensor x, Tensor g, Tensor u, Tensor d, int n, int isa=-1) -> Tensor", &wc_mlp);
  m.def("best_isa() -> int", &best_isa);
}
