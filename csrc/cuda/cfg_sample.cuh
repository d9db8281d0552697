// Sort-free CFG sampling on CUDA: one thread block per row, no torch headers (nvcc can
// compile this alone). Same algorithm and numerics as kernels/cfg_sample.py:
//   guided logits recomputed from the input in every pass (no fp32 scratch row);
//   TopK/TopP cuts by a multi-pivot search over order-preserving int32 keys (kPivots
//   pivots per pass, so ~8 passes give the exact cut; no sort);
//   inverse-CDF draw in id order with one uniform per row from splitmix64(seed, row).
// Every reduction is warp shuffles plus a fixed-order sum over warps, so a seed gives the
// same tokens on every run (no float atomics).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cub/block/block_scan.cuh>

namespace engine {
namespace cuda_kernels {

enum class LogitType : int { F32 = 0, F16 = 1, BF16 = 2 };
// Per-row status codes, shared with csrc/cpu/cfg_sample.h and engine/ops/sampling.py.
enum CfgStatus : int32_t { kCfgOk = 0, kCfgNaN = 1, kCfgNoAllowed = 2 };

struct CfgSampleParams {
  const void* logits;  // [rows, vocab], unit stride along vocab
  LogitType dtype;
  int64_t row_stride, batch, vocab;
  bool guided;                        // rows [0,B) cond, [B,2B) uncond
  const float* cfg_scale;             // [B]
  const float* temperature;           // [B], 0 = greedy
  const int64_t* top_k;               // [B], 0 = off
  const float* top_p;                 // [B], 1 = off
  const int64_t* allowed;             // [B, 2]
  float cd_log_alpha;                 // fp32 log(alpha), used when cd_k > 0
  int64_t cd_k;                       // 0 = off
  const int64_t* seed;                // [1], on the device (no host sync to read it)
  int64_t* tokens;                    // [B] out
  float* logprobs;                    // [B] out
  int32_t* status;                    // [B] out
};

// Host launcher (csrc/cuda/cfg_sample.cu): one block per row on `stream`.
cudaError_t launch_cfg_sample(const CfgSampleParams& p, cudaStream_t stream);

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kPivots = 16;
constexpr int32_t kLowestFiniteKey = -2139095040;  // order_key(-FLT_MAX)
constexpr int32_t kNegInfKey = -2139095041;        // order_key(-inf)

__device__ __forceinline__ float load_logit(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load_logit(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_logit(const __nv_bfloat16* p) { return __bfloat162float(*p); }

// Signed keys that order like the floats: flip the magnitude bits of negatives.
__device__ __forceinline__ int32_t order_key(float x) {
  const int32_t b = __float_as_int(x);
  return b ^ ((b >> 31) & 0x7FFFFFFF);
}
__device__ __forceinline__ float key_value(int32_t k) {
  return __int_as_float(k ^ ((k >> 31) & 0x7FFFFFFF));
}

__device__ __forceinline__ double row_uniform(uint64_t seed, int64_t row) {
  uint64_t z = seed + (static_cast<uint64_t>(row) + 1ull) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * (1.0 / 9007199254740992.0);
}

// One row's view of the input; value(i) is the sampling logit of id i (guidance, CD-K,
// allowed range, temperature), recomputed on demand.
template <typename T>
struct RowView {
  const T* c;
  const T* u;
  int64_t start, end;
  float scale, temp, lse_c, lse_u, cut;
  bool guided, cdk;

  __device__ float value(int64_t i) const {
    const float cv = load_logit(c + i);
    float x = cv;
    if (cdk) {
      const float uv = load_logit(u + i), lc = cv - lse_c;
      const bool keep = cv > -INFINITY && uv > -INFINITY && lc >= cut;
      x = keep ? lc - (uv - lse_u) : -INFINITY;
    } else if (guided) {
      const float uv = load_logit(u + i);
      const float mixed = scale == 1.0f ? cv : (scale == 0.0f ? uv : uv + scale * (cv - uv));
      x = (cv == -INFINITY || uv == -INFINITY) ? -INFINITY : mixed;
    }
    x = x / temp;
    return x == 0.0f ? 0.0f : x;  // -0 and +0 tie, as in the reference
  }
};

struct SharedScratch {
  float f[kWarps];
  int64_t i[kWarps];
  float pf[kWarps][kPivots];
  int64_t pi[kWarps][kPivots];
  int32_t pivot[kPivots];
  typename cub::BlockScan<float, kThreads>::TempStorage scan;
};

template <typename V>
struct SumOp { __device__ V operator()(V a, V b) const { return a + b; } };
template <typename V>
struct MaxOp { __device__ V operator()(V a, V b) const { return a > b ? a : b; } };
template <typename V>
struct MinOp { __device__ V operator()(V a, V b) const { return a < b ? a : b; } };

// Block-wide reduction, result in every thread; warps combine in a fixed order.
template <typename V, typename Op>
__device__ V block_reduce(V v, Op op, V* warp_slots) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  if ((threadIdx.x & 31) == 0) warp_slots[threadIdx.x >> 5] = v;
  __syncthreads();
  V r = warp_slots[0];
  for (int w = 1; w < kWarps; ++w) r = op(r, warp_slots[w]);
  __syncthreads();
  return r;
}

// Sums kPivots per-thread partials over the block; totals in every thread.
template <typename V>
__device__ void pivot_reduce(V (&part)[kPivots], V (&slots)[kWarps][kPivots]) {
#pragma unroll
  for (int j = 0; j < kPivots; ++j) {
    V v = part[j];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) slots[threadIdx.x >> 5][j] = v;
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kPivots; ++j) {
    V r = slots[0][j];
    for (int w = 1; w < kWarps; ++w) r += slots[w][j];
    part[j] = r;
  }
  __syncthreads();
}

// Largest key T with count(key >= T) >= k among ids [lo_id, hi_id) (k <= finite count).
// Invariant: count(>= lo) >= k and count(>= hi + 1) < k. RAW reads the plain cond logits.
template <bool RAW, typename T>
__device__ int32_t kth_key(const RowView<T>& row, int64_t lo_id, int64_t hi_id, int64_t k,
                           int32_t hi_key, SharedScratch& s) {
  int64_t lo = kLowestFiniteKey, hi = hi_key;
  while (lo < hi) {
    int32_t piv[kPivots];
    int64_t cnt[kPivots];
#pragma unroll
    for (int j = 0; j < kPivots; ++j) {
      piv[j] = static_cast<int32_t>(lo + ((hi - lo) * (j + 1) + kPivots - 1) / kPivots);
      cnt[j] = 0;
    }
    for (int64_t i = lo_id + threadIdx.x; i < hi_id; i += kThreads) {
      const int32_t key = order_key(RAW ? load_logit(row.c + i) : row.value(i));
#pragma unroll
      for (int j = 0; j < kPivots; ++j) cnt[j] += key >= piv[j];
    }
    pivot_reduce(cnt, s.pi);
    int64_t new_lo = lo, new_hi = hi;
    for (int j = 0; j < kPivots; ++j) {
      if (cnt[j] >= k) new_lo = piv[j] > new_lo ? piv[j] : new_lo;
      else new_hi = piv[j] - 1 < new_hi ? piv[j] - 1 : new_hi;
    }
    lo = new_lo;
    hi = new_hi;
  }
  return static_cast<int32_t>(lo);
}

// Sum of exp(x - m) over the row's ids with key >= floor.
template <typename T>
__device__ float kept_mass(const RowView<T>& row, float m, int32_t floor, SharedScratch& s) {
  float z = 0.0f;
  for (int64_t i = row.start + threadIdx.x; i < row.end; i += kThreads) {
    const float x = row.value(i);
    z += order_key(x) >= floor ? __expf(x - m) : 0.0f;
  }
  return block_reduce(z, SumOp<float>(), s.f);
}

// Smallest key T >= floor with mass(key > T) < target; hi = key(max) always qualifies.
template <typename T>
__device__ int32_t top_p_key(const RowView<T>& row, float m, int32_t floor, float target,
                             SharedScratch& s) {
  int64_t lo = floor, hi = order_key(m);
  while (lo < hi) {
    int32_t piv[kPivots];
    float above[kPivots];
#pragma unroll
    for (int j = 0; j < kPivots; ++j) {
      piv[j] = static_cast<int32_t>(lo + ((hi - lo) * j) / kPivots);
      above[j] = 0.0f;
    }
    for (int64_t i = row.start + threadIdx.x; i < row.end; i += kThreads) {
      const float x = row.value(i);
      const int32_t key = order_key(x);
      const float e = key >= floor ? __expf(x - m) : 0.0f;
#pragma unroll
      for (int j = 0; j < kPivots; ++j) above[j] += key > piv[j] ? e : 0.0f;
    }
    pivot_reduce(above, s.pf);
    int64_t new_lo = lo, new_hi = hi;
    for (int j = 0; j < kPivots; ++j) {
      if (above[j] < target) new_hi = piv[j] < new_hi ? piv[j] : new_hi;
      else new_lo = piv[j] + 1 > new_lo ? piv[j] + 1 : new_lo;
    }
    lo = new_lo;
    hi = new_hi;
  }
  return static_cast<int32_t>(lo);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) cfg_sample_kernel(CfgSampleParams p) {
  __shared__ SharedScratch s;
  __shared__ int64_t s_pick;
  const int64_t r = blockIdx.x, V = p.vocab;
  const T* base = static_cast<const T*>(p.logits);
  RowView<T> row;
  row.c = base + r * p.row_stride;
  row.u = p.guided ? base + (p.batch + r) * p.row_stride : row.c;
  const float t = p.temperature[r];
  const bool greedy = t == 0.0f;
  row.temp = greedy ? 1.0f : t;  // greedy rows report log-probs at temperature 1
  row.scale = p.cfg_scale[r];
  row.guided = p.guided;
  row.cdk = p.cd_k > 0;
  row.lse_c = row.lse_u = row.cut = 0.0f;
  int64_t start = p.allowed[2 * r], end = p.allowed[2 * r + 1];
  start = start < 0 ? 0 : (start > V ? V : start);
  end = end < start ? start : (end > V ? V : end);

  // Raw inputs: NaN anywhere in the row pair (the reference checks the whole tensor);
  // per-row maxes and the cond finite count for CD-K.
  int64_t nan = 0, fin_c = 0;
  float mc = -INFINITY, mu = -INFINITY;
  for (int64_t i = threadIdx.x; i < V; i += kThreads) {
    const float cv = load_logit(row.c + i);
    nan |= cv != cv;
    mc = cv > mc ? cv : mc;
    fin_c += cv > -INFINITY;
    if (p.guided) {
      const float uv = load_logit(row.u + i);
      nan |= uv != uv;
      mu = uv > mu ? uv : mu;
    }
  }
  nan = block_reduce(nan, MaxOp<int64_t>(), s.i);
  mc = block_reduce(mc, MaxOp<float>(), s.f);
  mu = block_reduce(mu, MaxOp<float>(), s.f);
  fin_c = block_reduce(fin_c, SumOp<int64_t>(), s.i);
  if (row.cdk && !nan && mc > -INFINITY && mu > -INFINITY) {
    float sc = 0.0f, su = 0.0f;
    for (int64_t i = threadIdx.x; i < V; i += kThreads) {
      sc += __expf(load_logit(row.c + i) - mc);
      su += __expf(load_logit(row.u + i) - mu);
    }
    row.lse_c = mc + logf(block_reduce(sc, SumOp<float>(), s.f));
    row.lse_u = mu + logf(block_reduce(su, SumOp<float>(), s.f));
    const int64_t kk = p.cd_k < V ? p.cd_k : V;
    const float kth = kk <= fin_c ? key_value(kth_key<true>(row, 0, V, kk, order_key(mc), s))
                                  : -INFINITY;
    row.cut = (kth - row.lse_c) + p.cd_log_alpha;
  } else if (row.cdk) {
    row.cut = INFINITY;  // nothing is plausible: the row reports kCfgNoAllowed below
  }
  row.start = start;
  row.end = end;

  // The row's sampling logits: max, first argmax (greedy), finite count.
  float m = -INFINITY;
  int64_t arg = INT64_MAX, fin = 0;
  for (int64_t i = start + threadIdx.x; i < end; i += kThreads) {
    const float x = row.value(i);
    if (x > m) { m = x; arg = i; }  // ids rise per thread: the thread's first max
    fin += x > -INFINITY;
  }
  const float m_all = block_reduce(m, MaxOp<float>(), s.f);
  arg = block_reduce(m == m_all ? arg : INT64_MAX, MinOp<int64_t>(), s.i);
  fin = block_reduce(fin, SumOp<int64_t>(), s.i);
  m = m_all;
  const int32_t status = nan ? kCfgNaN : (m > -INFINITY ? kCfgOk : kCfgNoAllowed);
  if (status != kCfgOk) {  // uniform across the block
    if (threadIdx.x == 0) {
      p.tokens[r] = -1;
      p.logprobs[r] = __int_as_float(0x7fc00000);
      p.status[r] = status;
    }
    return;
  }

  int32_t floor = kNegInfKey;  // keep keys >= floor
  const int64_t k = p.top_k[r];
  if (k > 0 && k < fin) floor = kth_key<false>(row, start, end, k, order_key(m), s);
  const float top_p = p.top_p[r];
  if (top_p < 1.0f) floor = top_p_key(row, m, floor, top_p * kept_mass(row, m, floor, s), s);
  const float z = kept_mass(row, m, floor, s);

  int64_t pick = arg;
  if (!greedy) {
    // Inverse CDF in id order over contiguous per-thread chunks: a block scan of the
    // chunk sums finds the chunk where the running mass passes u * z; its thread rescans.
    const float target = static_cast<float>(row_uniform(static_cast<uint64_t>(*p.seed), r)) * z;
    const int64_t chunk = (end - start + kThreads - 1) / kThreads;
    const int64_t lo = start + threadIdx.x * chunk;
    const int64_t hi = lo + chunk < end ? lo + chunk : end;
    float sum = 0.0f;
    int64_t last = -1;
    for (int64_t i = lo; i < hi; ++i) {
      const float x = row.value(i);
      const float e = order_key(x) >= floor ? __expf(x - m) : 0.0f;
      if (e > 0.0f) { sum += e; last = i; }
    }
    float prefix;
    cub::BlockScan<float, kThreads>(s.scan).ExclusiveSum(sum, prefix);
    __syncthreads();
    const int64_t mine = (sum > 0.0f && prefix + sum > target) ? threadIdx.x : INT64_MAX;
    const int64_t winner = block_reduce(mine, MinOp<int64_t>(), s.i);
    const int64_t last_all = block_reduce(last, MaxOp<int64_t>(), s.i);
    if (winner == INT64_MAX) {
      pick = last_all;  // u * z rounded up to the total: take the last kept id
    } else {
      if (threadIdx.x == winner) {
        float acc = prefix;
        int64_t found = last;
        for (int64_t i = lo; i < hi; ++i) {
          const float x = row.value(i);
          const float e = order_key(x) >= floor ? __expf(x - m) : 0.0f;
          acc += e;
          if (e > 0.0f && acc > target) { found = i; break; }
        }
        s_pick = found;
      }
      __syncthreads();
      pick = s_pick;
    }
  }
  if (threadIdx.x == 0) {
    p.tokens[r] = pick;
    p.logprobs[r] = (row.value(pick) - m) - logf(z);
    p.status[r] = kCfgOk;
  }
}

}  // namespace cuda_kernels
}  // namespace engine
