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
#include "cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace engine {
namespace cpu {

namespace {

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

inline float bf16_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // NaN
  return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

// dst[0, n) = src * mul in fp32, dst[n, np) = 0.
void load_row(const void* src, AttnType t, int64_t n, int64_t np, float mul, float* dst) {
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

void store_row(void* dst, AttnType t, int64_t n, const float* src, float mul) {
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

// C[r][0, 16) = sum_c X[r][c] * Yt[c][0, 16) for r < 4. Yt is a transposed key block (row
// stride BN), so each step is an outer product: 4 broadcasts, 2 loads, 8 FMAs.
inline void dot_4x16(const float* X, int64_t ldx, const float* Yt, int64_t d, float* C, int64_t ldc) {
  vf c00{}, c01{}, c10{}, c11{}, c20{}, c21{}, c30{}, c31{};
  for (int64_t c = 0; c < d; ++c) {
    const vf y0 = vload(Yt + c * BN), y1 = vload(Yt + c * BN + 8);
    const float x0 = X[c], x1 = X[ldx + c], x2 = X[2 * ldx + c], x3 = X[3 * ldx + c];
    c00 += x0 * y0; c01 += x0 * y1;
    c10 += x1 * y0; c11 += x1 * y1;
    c20 += x2 * y0; c21 += x2 * y1;
    c30 += x3 * y0; c31 += x3 * y1;
  }
  vstore(C, c00); vstore(C + 8, c01);
  vstore(C + ldc, c10); vstore(C + ldc + 8, c11);
  vstore(C + 2 * ldc, c20); vstore(C + 2 * ldc + 8, c21);
  vstore(C + 3 * ldc, c30); vstore(C + 3 * ldc + 8, c31);
}

// O[r][0, 16) += sum_{j < nj} A[r][j] * Y[j][0, 16) for r < 4 (P @ V, dS @ K).
inline void acc_rows_4x16(const float* A, int64_t lda, const float* Y, int64_t ldy, int64_t nj,
                          float* O, int64_t ldo) {
  vf o00 = vload(O), o01 = vload(O + 8), o10 = vload(O + ldo), o11 = vload(O + ldo + 8);
  vf o20 = vload(O + 2 * ldo), o21 = vload(O + 2 * ldo + 8);
  vf o30 = vload(O + 3 * ldo), o31 = vload(O + 3 * ldo + 8);
  for (int64_t j = 0; j < nj; ++j) {
    const vf y0 = vload(Y + j * ldy), y1 = vload(Y + j * ldy + 8);
    const float a0 = A[j], a1 = A[lda + j], a2 = A[2 * lda + j], a3 = A[3 * lda + j];
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

// O[j][0, 16) += sum_{rlo <= r < rhi} A[r][j] * X[r][0, 16) for j < 4 (P^T @ dO, dS^T @ Q).
inline void acc_cols_4x16(const float* A, int64_t lda, const float* X, int64_t ldx, int64_t rlo,
                          int64_t rhi, float* O, int64_t ldo) {
  vf o00 = vload(O), o01 = vload(O + 8), o10 = vload(O + ldo), o11 = vload(O + ldo + 8);
  vf o20 = vload(O + 2 * ldo), o21 = vload(O + 2 * ldo + 8);
  vf o30 = vload(O + 3 * ldo), o31 = vload(O + 3 * ldo + 8);
  for (int64_t r = rlo; r < rhi; ++r) {
    const vf x0 = vload(X + r * ldx), x1 = vload(X + r * ldx + 8);
    const float* a = A + r * lda;
    o00 += a[0] * x0; o01 += a[0] * x1;
    o10 += a[1] * x0; o11 += a[1] * x1;
    o20 += a[2] * x0; o21 += a[2] * x1;
    o30 += a[3] * x0; o31 += a[3] * x1;
  }
  vstore(O, o00); vstore(O + 8, o01);
  vstore(O + ldo, o10); vstore(O + ldo + 8, o11);
  vstore(O + 2 * ldo, o20); vstore(O + 2 * ldo + 8, o21);
  vstore(O + 3 * ldo, o30); vstore(O + 3 * ldo + 8, o31);
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

std::vector<Doc> documents(const AttentionShape& sh) {
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
std::vector<Task> make_tasks(const AttentionShape& sh, const std::vector<Doc>& docs, bool backward) {
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
void stage_keys(const Strided& x, AttnType t, int64_t b, int64_t hk, int64_t k0, int64_t k1,
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

// ---- forward --------------------------------------------------------------------------------

void forward_task(const AttentionFwdArgs& a, const Doc& doc, const Task& task, Scratch& w) {
  const AttentionShape& sh = a.shape;
  const int64_t d = sh.head_dim, Dp = round_up(d, 16), G = sh.heads / sh.kv_heads;
  const int64_t b = doc.b, hk = task.hk;
  const int64_t kend = sh.causal ? task.hi : doc.end;  // keys this task can need
  const int64_t nkb = (kend - doc.start + BN - 1) / BN;
  w.kt.resize(nkb * d * BN);
  w.v.resize(nkb * BN * Dp);
  w.row.resize(Dp);
  stage_keys(a.k, sh.dtype, b, hk, doc.start, kend, d, Dp, w.kt.data(), nullptr, w.row.data());
  stage_keys(a.v, sh.dtype, b, hk, doc.start, kend, d, Dp, nullptr, w.v.data(), w.row.data());
  w.q.resize(BM * Dp);
  w.o.resize(BM * Dp);
  w.s.resize(BM * BN);
  w.m.resize(BM);
  w.l.resize(BM);
  float *Q = w.q.data(), *O = w.o.data(), *S = w.s.data(), *m = w.m.data(), *l = w.l.data();
  // Scores in base 2: scale * log2(e) is folded into q once.
  const float qmul = sh.scale * LOG2E;
  const int64_t es = elem_size(sh.dtype);

  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = hk * G + g;
    for (int64_t q0 = task.lo; q0 < task.hi; q0 += BM) {
      const int64_t nr = std::min(BM, task.hi - q0), nr4 = round_up(nr, 4);
      for (int64_t r = 0; r < nr4; ++r) {
        if (r < nr) load_row(row_of(a.q, sh.dtype, b, h, q0 + r), sh.dtype, d, Dp, qmul, Q + r * Dp);
        else std::fill(Q + r * Dp, Q + (r + 1) * Dp, 0.0f);
      }
      std::fill(O, O + nr4 * Dp, 0.0f);
      std::fill(m, m + nr4, NEG_INF);
      std::fill(l, l + nr4, 0.0f);
      const int64_t klim = sh.causal ? q0 + nr : doc.end;
      for (int64_t kb0 = doc.start; kb0 < klim; kb0 += BN) {
        const int64_t nk = std::min(BN, klim - kb0), nk16 = round_up(nk, 16);
        const int64_t kb = (kb0 - doc.start) / BN;
        const float* Kt = w.kt.data() + kb * d * BN;
        const float* V = w.v.data() + kb * BN * Dp;
        for (int64_t r4 = 0; r4 < nr4; r4 += 4) {
          const int64_t last = q0 + r4 + 3;  // the quad's last query
          for (int64_t j0 = 0; j0 < nk16 && !(sh.causal && kb0 + j0 > last); j0 += 16)
            dot_4x16(Q + r4 * Dp, Dp, Kt + j0, d, S + r4 * BN + j0, BN);
        }
        // Online softmax: rescale a row's sums only when its max moves.
        for (int64_t r = 0; r < nr4; ++r) {
          float* sr = S + r * BN;
          const int32_t vis = static_cast<int32_t>(visible(sh.causal, q0 + r, kb0, nk));
          if (vis == 0) {
            std::fill(sr, sr + nk16, 0.0f);
            continue;
          }
          vf mx = splat(NEG_INF);
          for (int64_t j0 = 0; j0 < nk16; j0 += 8) {
            const vf x = vload(sr + j0);
            const vf masked = iota8(static_cast<int32_t>(j0)) < vis ? x : splat(NEG_INF);
            mx = mx > masked ? mx : masked;
          }
          const float mnew = std::max(m[r], hmax(mx));
          const float alpha = std::exp2(m[r] - mnew);  // 0 on the first block (m = -inf)
          vf sum{};
          const vf mv = splat(mnew);
          for (int64_t j0 = 0; j0 < nk16; j0 += 8) {
            const vf p = exp2v(vload(sr + j0) - mv);
            const vf kept = iota8(static_cast<int32_t>(j0)) < vis ? p : splat(0.0f);
            vstore(sr + j0, kept);
            sum += kept;
          }
          l[r] = l[r] * alpha + hsum(sum);
          m[r] = mnew;
          if (alpha != 1.0f) {
            float* orow = O + r * Dp;
#pragma omp simd
            for (int64_t c = 0; c < Dp; ++c) orow[c] *= alpha;
          }
        }
        for (int64_t r4 = 0; r4 < nr4; r4 += 4) {
          const int64_t nj = visible(sh.causal, q0 + r4 + 3, kb0, nk);
          for (int64_t c0 = 0; nj > 0 && c0 < Dp; c0 += 16)
            acc_rows_4x16(S + r4 * BN, BN, V + c0, Dp, nj, O + r4 * Dp + c0, Dp);
        }
      }
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t i = q0 + r;
        const int64_t flat = (b * sh.heads + h) * sh.seq + i;
        store_row(static_cast<char*>(a.out) + flat * d * es, sh.dtype, d, O + r * Dp, 1.0f / l[r]);
        a.lse[flat] = (m[r] + std::log2(l[r])) * LN2;
      }
    }
  }
}

// ---- backward -------------------------------------------------------------------------------

// dq_acc: fp32 [B, Hq, S, d] that split documents add their partial dq into (atomically);
// a task that owns its whole document writes dq directly.
void backward_task(const AttentionBwdArgs& a, const Doc& doc, const Task& task, Scratch& w, float* dq_acc) {
  const AttentionShape& sh = a.shape;
  const int64_t d = sh.head_dim, Dp = round_up(d, 16), G = sh.heads / sh.kv_heads;
  const int64_t b = doc.b, hk = task.hk, k0 = task.lo, k1 = task.hi;
  const int64_t qlo = sh.causal ? k0 : doc.start, nq = doc.end - qlo;
  const int64_t nkb = (k1 - k0 + BN - 1) / BN;
  const int64_t es = elem_size(sh.dtype);
  w.kt.resize(nkb * d * BN);
  w.kr.resize(nkb * BN * Dp);
  w.vt.resize(nkb * d * BN);
  w.row.resize(Dp);
  stage_keys(a.k, sh.dtype, b, hk, k0, k1, d, Dp, w.kt.data(), w.kr.data(), w.row.data());
  stage_keys(a.v, sh.dtype, b, hk, k0, k1, d, Dp, w.vt.data(), nullptr, w.row.data());
  w.dk.assign(nkb * BN * Dp, 0.0f);
  w.dv.assign(nkb * BN * Dp, 0.0f);
  // Query-side rows [qlo, end) plus 4 zero rows, so a tile's last quad never reads past them.
  const int64_t nqp = nq + 4;
  w.q.resize(nqp * Dp);
  w.dout.resize(nqp * Dp);
  w.dq.resize(nqp * Dp);
  w.dd.resize(nqp);
  w.lse2.resize(nqp);
  w.s.resize(BM * BN);
  w.dp.resize(BM * BN);
  float *Q = w.q.data(), *dO = w.dout.data(), *dQ = w.dq.data(), *D = w.dd.data(), *L2 = w.lse2.data();
  float *S = w.s.data(), *dP = w.dp.data(), *row = w.row.data();
  const float cmul = sh.scale * LOG2E;

  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = hk * G + g;
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t i = qlo + r, flat = (b * sh.heads + h) * sh.seq + i;
      load_row(row_of(a.q, sh.dtype, b, h, i), sh.dtype, d, Dp, 1.0f, Q + r * Dp);
      load_row(row_of(a.dout, sh.dtype, b, h, i), sh.dtype, d, Dp, 1.0f, dO + r * Dp);
      load_row(row_of(a.out, sh.dtype, b, h, i), sh.dtype, d, Dp, 1.0f, row);
      // D_i = sum_c dO * O = sum_j P_ij dP_ij, so dS = P * (dP - D). A gradient on lse adds
      // dlse_i * P_ij to dS (d lse_i / d s_ij = P_ij).
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < d; ++c) dot += dO[r * Dp + c] * row[c];
      D[r] = dot - (a.dlse != nullptr ? a.dlse[flat] : 0.0f);
      L2[r] = a.lse[flat] * LOG2E;
    }
    std::fill(Q + nq * Dp, Q + nqp * Dp, 0.0f);
    std::fill(dO + nq * Dp, dO + nqp * Dp, 0.0f);
    std::fill(D + nq, D + nqp, 0.0f);
    std::fill(L2 + nq, L2 + nqp, 0.0f);
    std::fill(dQ, dQ + nqp * Dp, 0.0f);

    for (int64_t kb = 0; kb < nkb; ++kb) {
      const int64_t kb0 = k0 + kb * BN, nk = std::min(BN, k1 - kb0), nk16 = round_up(nk, 16);
      const float* Kt = w.kt.data() + kb * d * BN;
      const float* Vt = w.vt.data() + kb * d * BN;
      const float* Kr = w.kr.data() + kb * BN * Dp;
      float* dKb = w.dk.data() + kb * BN * Dp;
      float* dVb = w.dv.data() + kb * BN * Dp;
      for (int64_t q0 = sh.causal ? kb0 : doc.start; q0 < doc.end; q0 += BM) {
        const int64_t nr = std::min(BM, doc.end - q0), nr4 = round_up(nr, 4), qoff = q0 - qlo;
        const float* Qt = Q + qoff * Dp;
        const float* dOt = dO + qoff * Dp;
        for (int64_t r4 = 0; r4 < nr4; r4 += 4) {
          const int64_t last = q0 + r4 + 3;
          for (int64_t j0 = 0; j0 < nk16 && !(sh.causal && kb0 + j0 > last); j0 += 16) {
            dot_4x16(Qt + r4 * Dp, Dp, Kt + j0, d, S + r4 * BN + j0, BN);
            dot_4x16(dOt + r4 * Dp, Dp, Vt + j0, d, dP + r4 * BN + j0, BN);
          }
        }
        // P = 2^(s * scale * log2 e - lse * log2 e), recomputed; dS = P * (dP - D) in dP's place.
        for (int64_t r = 0; r < nr4; ++r) {
          const int32_t vis = r < nr ? static_cast<int32_t>(visible(sh.causal, q0 + r, kb0, nk)) : 0;
          float* sr = S + r * BN;
          float* dr = dP + r * BN;
          const vf l2 = splat(L2[qoff + r]), dd = splat(D[qoff + r]);
          for (int64_t j0 = 0; j0 < nk16; j0 += 8) {
            const vi keep = iota8(static_cast<int32_t>(j0)) < vis;
            const vf p = exp2v(vload(sr + j0) * cmul - l2);
            vstore(sr + j0, keep ? p : splat(0.0f));
            vstore(dr + j0, keep ? p * (vload(dr + j0) - dd) : splat(0.0f));
          }
        }
        // dV += P^T dO and dK += dS^T Q, four keys at a time from the first query that sees them.
        for (int64_t j4 = 0; j4 < nk; j4 += 4) {
          const int64_t rlo = sh.causal ? std::max<int64_t>(0, kb0 + j4 - q0) : 0;
          for (int64_t c0 = 0; rlo < nr && c0 < Dp; c0 += 16) {
            acc_cols_4x16(S + j4, BN, dOt + c0, Dp, rlo, nr, dVb + j4 * Dp + c0, Dp);
            acc_cols_4x16(dP + j4, BN, Qt + c0, Dp, rlo, nr, dKb + j4 * Dp + c0, Dp);
          }
        }
        // dQ += dS K
        for (int64_t r4 = 0; r4 < nr4; r4 += 4) {
          const int64_t nj = visible(sh.causal, q0 + r4 + 3, kb0, nk);
          for (int64_t c0 = 0; nj > 0 && c0 < Dp; c0 += 16)
            acc_rows_4x16(dP + r4 * BN, BN, Kr + c0, Dp, nj, dQ + (qoff + r4) * Dp + c0, Dp);
        }
      }
    }
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t flat = (b * sh.heads + h) * sh.seq + qlo + r;
      if (!task.split) {
        store_row(static_cast<char*>(a.dq) + flat * d * es, sh.dtype, d, dQ + r * Dp, sh.scale);
        continue;
      }
      float* acc = dq_acc + flat * d;
      for (int64_t c = 0; c < d; ++c) {
        const float x = dQ[r * Dp + c] * sh.scale;
#pragma omp atomic
        acc[c] += x;
      }
    }
  }
  for (int64_t j = 0; j < k1 - k0; ++j) {
    const int64_t flat = (b * sh.kv_heads + hk) * sh.seq + k0 + j;
    store_row(static_cast<char*>(a.dk) + flat * d * es, sh.dtype, d, w.dk.data() + j * Dp, sh.scale);
    store_row(static_cast<char*>(a.dv) + flat * d * es, sh.dtype, d, w.dv.data() + j * Dp, 1.0f);
  }
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

}  // namespace

const char* check_documents(const int32_t* cu, int64_t n_docs, int64_t batch, int64_t seq) {
  if (n_docs < 1) return "cu_seqlens must hold at least 2 entries";
  if (cu[0] != 0 || cu[n_docs] != batch * seq) return "cu_seqlens must start at 0 and end at B*S";
  int64_t next_row_end = seq;
  for (int64_t i = 0; i < n_docs; ++i) {
    if (cu[i + 1] < cu[i]) return "cu_seqlens must not decrease";
    // Every row boundary must be an entry: a document that runs past one crosses rows.
    while (next_row_end <= cu[i]) next_row_end += seq;
    if (cu[i + 1] > next_row_end)
      return "a document crosses a row boundary; every multiple of S must be in cu_seqlens";
  }
  return nullptr;
}

void attention_forward(const AttentionFwdArgs& a) {
  const std::vector<Doc> docs = documents(a.shape);
  const std::vector<Task> tasks = make_tasks(a.shape, docs, false);
  run_tasks(tasks, a.shape.threads, [&](const Task& t, Scratch& w) { forward_task(a, docs[t.doc], t, w); });
}

void attention_backward(const AttentionBwdArgs& a) {
  const AttentionShape& sh = a.shape;
  const std::vector<Doc> docs = documents(sh);
  const std::vector<Task> tasks = make_tasks(sh, docs, true);
  // Split documents sum partial dq from several tasks: in dq itself when it is fp32, else in
  // an fp32 buffer converted afterwards. Only their rows are zeroed and converted.
  std::vector<int64_t> split_docs;
  for (const Task& t : tasks)
    if (t.split) split_docs.push_back(t.doc);
  std::sort(split_docs.begin(), split_docs.end());
  split_docs.erase(std::unique(split_docs.begin(), split_docs.end()), split_docs.end());
  const int64_t d = sh.head_dim;
  std::vector<float> scratch;
  float* dq_acc = nullptr;
  if (!split_docs.empty()) {
    if (sh.dtype == AttnType::F32) {
      dq_acc = static_cast<float*>(a.dq);
    } else {
      scratch.resize(sh.batch * sh.heads * sh.seq * d);
      dq_acc = scratch.data();
    }
    for (int64_t i : split_docs)
      for (int64_t h = 0; h < sh.heads; ++h) {
        const int64_t first = (docs[i].b * sh.heads + h) * sh.seq + docs[i].start;
        std::fill(dq_acc + first * d, dq_acc + (first + docs[i].end - docs[i].start) * d, 0.0f);
      }
  }
  run_tasks(tasks, sh.threads, [&](const Task& t, Scratch& w) { backward_task(a, docs[t.doc], t, w, dq_acc); });
  if (dq_acc != nullptr && sh.dtype != AttnType::F32)
    for (int64_t i : split_docs)
      for (int64_t h = 0; h < sh.heads; ++h)
        for (int64_t s = docs[i].start; s < docs[i].end; ++s) {
          const int64_t flat = (docs[i].b * sh.heads + h) * sh.seq + s;
          store_row(static_cast<uint16_t*>(a.dq) + flat * d, sh.dtype, d, dq_acc + flat * d, 1.0f);
        }
}

}  // namespace cpu
}  // namespace engine
