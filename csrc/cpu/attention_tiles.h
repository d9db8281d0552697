// Internals shared by the CPU attention's forward (attention.cpp) and backward
// (attention_backward.cpp): fp32 staging, register-tiled micro-kernels, work items.
// See attention.h. The matmuls are small register-tiled micro-kernels (4 rows x 16 columns)
// written with GCC vector types, so g++ -O3 -march=x86-64-v3 keeps their 8 accumulators in
// AVX2 registers and emits FMAs; everything else is plain loops. Work happens in fp32 copies
// of the inputs, padded so the tiles never need a scalar tail:
//   head dim padded to Dp (a multiple of 16) with zeros,
//   keys staged per block of BN, both row-major ([key][Dp], for P@V and dS@K) and transposed
//   ([d][BN], for Q@K^T and dO@V^T, which become sums of outer products over d),
//   query tiles of BM rows padded to a multiple of 4 rows with zeros.
// Masked and padded scores never reach a sum: they are replaced (a select, so stale or NaN
// scratch cannot leak) by -inf before the max and by 0 after the exp.
#pragma once

#include "cpu/attention.h"
#include "cpu/float_bits.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace engine {
namespace cpu {
namespace attention_detail {


constexpr int64_t BM = 32;      // query rows per tile: S, P, dP tiles of BM x BN fp32 fit in L1
constexpr int64_t BN = 64;      // keys per block
constexpr int64_t CHUNK = 256;  // documents longer than 2 * CHUNK are split into tasks of CHUNK rows
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

typedef float vf __attribute__((vector_size(32)));  // 8 fp32 lanes: one AVX2 register
typedef int32_t vi __attribute__((vector_size(32)));

inline vf vload(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return vf{x, x, x, x, x, x, x, x}; }
inline vi iota8(int32_t base) { return vi{0, 1, 2, 3, 4, 5, 6, 7} + base; }
inline float hsum(vf v) { float s = 0.0f; for (int i = 0; i < 8; ++i) s += v[i]; return s; }
inline float hmax(vf v) { float m = v[0]; for (int i = 1; i < 8; ++i) m = std::max(m, v[i]); return m; }
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// 2^x for the x <= ~0 that softmax feeds it (score minus row max, or minus lse):
// 2^x = 2^n * e^(f ln2) with n = round(x), |f| <= 1/2, and e^g by its degree-6 Taylor series
// (|g| <= 0.35, relative error < 2e-7). x <= -127 (masked scores are -inf) gives exactly 0.
inline vf exp2v(vf x) {
  const vf lo = splat(-127.0f);
  x = x < lo ? lo : x;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf n = (x + magic) - magic;
  const vf g = (x - n) * LN2;
  vf p = splat(1.0f / 720);
  p = p * g + 1.0f / 120;
  p = p * g + 1.0f / 24;
  p = p * g + 1.0f / 6;
  p = p * g + 0.5f;
  p = p * g + 1.0f;
  p = p * g + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;  // n = -127 -> 0.0f
  vf pow2n;
  std::memcpy(&pow2n, &bits, sizeof pow2n);
  return p * pow2n;
}

// dst[0, n) = src * mul in fp32, dst[n, np) = 0.
inline void load_row(const void* src, AttnType t, int64_t n, int64_t np, float mul, float* dst) {
  if (t == AttnType::F32) {
    const float* p = static_cast<const float*>(src);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = p[i] * mul;
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(src);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(p[i]) * mul;
  }
  for (int64_t i = n; i < np; ++i) dst[i] = 0.0f;
}

inline void store_row(void* dst, AttnType t, int64_t n, const float* src, float mul) {
  if (t == AttnType::F32) {
    float* p = static_cast<float*>(dst);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) p[i] = src[i] * mul;
  } else {
    uint16_t* p = static_cast<uint16_t*>(dst);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) p[i] = float_to_bf16(src[i] * mul);
  }
}

inline int64_t elem_size(AttnType t) { return t == AttnType::F32 ? 4 : 2; }

inline const void* row_of(const Strided& x, AttnType t, int64_t b, int64_t h, int64_t s) {
  return static_cast<const char*>(x.data) + (b * x.sb + h * x.sh + s * x.ss) * elem_size(t);
}

// ---- micro-kernels: 4 rows x 16 columns (two vectors) of fp32 accumulators ---------------

// O[i][0, 16) += sum_{t < n} A[i * ai + t * at] * Y[t * ldy][0, 16) for i < 4: with
// (ai, at) = (lda, 1) the rows of A times Y (P @ V, dS @ K); with (1, lda) its columns
// (P^T @ dO, dS^T @ Q).
inline void acc_4x16(const float* A, int64_t ai, int64_t at, const float* Y, int64_t ldy, int64_t n,
                     float* O, int64_t ldo) {
  vf o00 = vload(O), o01 = vload(O + 8), o10 = vload(O + ldo), o11 = vload(O + ldo + 8);
  vf o20 = vload(O + 2 * ldo), o21 = vload(O + 2 * ldo + 8);
  vf o30 = vload(O + 3 * ldo), o31 = vload(O + 3 * ldo + 8);
  for (int64_t t = 0; t < n; ++t) {
    const vf y0 = vload(Y + t * ldy), y1 = vload(Y + t * ldy + 8);
    const float* a = A + t * at;
    const float a0 = a[0], a1 = a[ai], a2 = a[2 * ai], a3 = a[3 * ai];
    o00 += a0 * y0; o01 += a0 * y1;
    o10 += a1 * y0; o11 += a1 * y1;
    o20 += a2 * y0; o21 += a2 * y1;
    o30 += a3 * y0; o31 += a3 * y1;
  }
  vstore(O, o00); vstore(O + 8, o01);
  vstore(O + ldo, o10); vstore(O + ldo + 8, o11);
  vstore(O + 2 * ldo, o20); vstore(O + 2 * ldo + 8, o21);
  vstore(O + 3 * ldo, o30); vstore(O + 3 * ldo + 8, o31);
}

// C[r][0, 16) = sum_c X[r][c] * Yt[c][0, 16) for r < 4 (Q @ K^T, dO @ V^T): acc_4x16 over
// the rows of X into a zeroed tile. Yt is a transposed key block (row stride BN), so each
// step is an outer product: 4 broadcasts, 2 loads, 8 FMAs.
inline void dot_4x16(const float* X, int64_t ldx, const float* Yt, int64_t d, float* C, int64_t ldc) {
  for (int r = 0; r < 4; ++r) {
    vstore(C + r * ldc, vf{});
    vstore(C + r * ldc + 8, vf{});
  }
  acc_4x16(X, ldx, 1, Yt, BN, d, C, ldc);
}

// ---- work items -----------------------------------------------------------------------------

struct Doc {
  int64_t b, start, end;  // positions inside row b
};

struct Task {
  int64_t doc, hk, lo, hi;  // forward: queries [lo, hi); backward: keys [lo, hi)
  bool split;               // the document is shared with other tasks
  double cost;
};

inline std::vector<Doc> documents(const AttentionShape& sh) {
  std::vector<Doc> docs;
  if (sh.cu_seqlens == nullptr) {
    for (int64_t b = 0; b < sh.batch; ++b) docs.push_back({b, 0, sh.seq});
    return docs;
  }
  for (int64_t i = 0; i < sh.n_docs; ++i) {
    const int64_t s = sh.cu_seqlens[i], e = sh.cu_seqlens[i + 1];
    if (e > s) docs.push_back({s / sh.seq, s % sh.seq, s % sh.seq + (e - s)});
  }
  return docs;
}

// Long documents are cut into CHUNK-row tasks so one long document still spreads over the
// cores; tasks are sorted by estimated cost (largest first) for the dynamic schedule.
inline std::vector<Task> make_tasks(const AttentionShape& sh, const std::vector<Doc>& docs, bool backward) {
  std::vector<Task> tasks;
  for (int64_t i = 0; i < static_cast<int64_t>(docs.size()); ++i) {
    const Doc& doc = docs[i];
    const int64_t len = doc.end - doc.start;
    const int64_t step = len > 2 * CHUNK ? CHUNK : len;
    for (int64_t lo = doc.start; lo < doc.end; lo += step) {
      const int64_t hi = std::min(doc.end, lo + step);
      double cost;  // query-key pairs
      if (!sh.causal) {
        cost = static_cast<double>(hi - lo) * len;
      } else if (backward) {  // keys [lo, hi) meet the queries after them
        const double a = doc.end - lo, b = doc.end - hi;
        cost = (a * a - b * b) / 2;
      } else {                // queries [lo, hi) meet the keys before them
        const double a = hi - doc.start, b = lo - doc.start;
        cost = (a * a - b * b) / 2;
      }
      for (int64_t hk = 0; hk < sh.kv_heads; ++hk)
        // + staging: each task converts its keys (and the forward its key prefix) to fp32.
        tasks.push_back({i, hk, lo, hi, step < len, cost + 16.0 * len});
    }
  }
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& x, const Task& y) { return x.cost > y.cost; });
  return tasks;
}

struct Scratch {
  std::vector<float> kt, kr, vt, v, q, o, dout, s, dp, dq, dk, dv, m, l, dd, lse2, row;
};

// Copies keys [k0, k1) of kv head hk to fp32: `transposed` as blocks of [d][BN] (the tail of
// the last block zeroed), `rows` as [key][Dp]. Either may be null.
inline void stage_keys(const Strided& x, AttnType t, int64_t b, int64_t hk, int64_t k0, int64_t k1,
                int64_t d, int64_t Dp, float* transposed, float* rows, float* tmp) {
  const int64_t n = k1 - k0;
  if (transposed != nullptr && n % BN) {
    float* last = transposed + (n / BN) * d * BN;
    for (int64_t c = 0; c < d; ++c)
      for (int64_t j = n % BN; j < BN; ++j) last[c * BN + j] = 0.0f;
  }
  for (int64_t j = 0; j < n; ++j) {
    float* r = rows != nullptr ? rows + j * Dp : tmp;
    load_row(row_of(x, t, b, hk, k0 + j), t, d, Dp, 1.0f, r);
    if (transposed != nullptr) {
      float* col = transposed + (j / BN) * d * BN + j % BN;
      for (int64_t c = 0; c < d; ++c) col[c * BN] = r[c];
    }
  }
}

// Number of keys of block [kb0, kb0 + nk) that query i sees.
inline int64_t visible(bool causal, int64_t i, int64_t kb0, int64_t nk) {
  return causal ? std::max<int64_t>(0, std::min(nk, i - kb0 + 1)) : nk;
}

template <typename Fn>
void run_tasks(const std::vector<Task>& tasks, int threads, Fn fn) {
  const int64_t n = static_cast<int64_t>(tasks.size());
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n)));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    Scratch w;  // per thread, reused across its tasks
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < n; ++t) fn(tasks[t], w);
  }
}

}  // namespace attention_detail
}  // namespace cpu
}  // namespace engine
