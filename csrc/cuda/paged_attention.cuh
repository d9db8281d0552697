// Paged KV cache kernels on CUDA, no torch headers (nvcc compiles this alone; the torch
// adapter is csrc/paged_attention_bindings.cu). Semantics: engine/ops/paged_attention.py.
//
// Decode (flash-decoding):
//   grid (kv_heads * group_chunks, batch, splits), 128 threads. A CTA serves up to
//   kGroupChunk query heads that read one kv head, over one contiguous range of blocks
//   (its split). Eight lanes share a token: each holds HEAD_DIM / 8 elements of the K/V
//   row (16-byte loads), partial dot products meet by three xor-shuffles, so the CTA walks
//   16 tokens at a time and every K/V byte is read once per CTA.
//   Each 8-lane group keeps its own online-softmax state (running max m, sum l, fp32
//   accumulator) with no synchronisation in the loop; the 16 groups merge through shared
//   memory at the end. With one split the CTA writes the output row; with several it writes
//   a normalised fp32 partial and its log-sum-exp, and the combine kernel merges the splits
//   with weights exp(lse_s - max_s lse) (empty splits have lse = -inf, weight 0).
// write_kv: one CTA per token, threads over (kv head, element); slot < 0 writes nothing.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace engine {
namespace cuda_kernels {

enum class PagedKVType : int { F32 = 0, F16 = 1, BF16 = 2 };

struct PagedDecodeParams {
  const void* q;                 // [B, H, d], unit stride along d
  const void* k_cache;           // [num_blocks, block_size, H_kv, d]; rows 16-byte aligned
  const void* v_cache;           // same layout as k_cache
  void* out;                     // [B, H, d] contiguous, dtype of q
  float* partial_out;            // [B, H, splits, d] (splits > 1 only)
  float* partial_lse;            // [B, H, splits]    (splits > 1 only)
  PagedKVType dtype;
  const int32_t* block_tables;   // [B, table_stride]
  const int32_t* seq_lens;       // [B]
  int64_t batch, heads, kv_heads, head_dim, block_size;
  int64_t q_stride_b, q_stride_h;
  int64_t cache_stride_block, cache_stride_token, cache_stride_head;
  int64_t table_stride;
  float scale;
  int num_splits, blocks_per_split;
};

struct WriteKVParams {
  const void* k;                 // [N, H_kv, d]
  const void* v;
  void* k_cache;
  void* v_cache;
  const int64_t* slot_mapping;   // [N]
  int64_t tokens, kv_heads, head_dim, elem_size, block_size;
  int64_t k_stride_n, k_stride_h, v_stride_n, v_stride_h;
  int64_t cache_stride_block, cache_stride_token, cache_stride_head;
};

constexpr int kDecodeThreads = 128;
constexpr int kLanesPerToken = 8;
constexpr int kTokenGroups = kDecodeThreads / kLanesPerToken;  // tokens in flight per CTA

// Query heads per CTA: q and the accumulator take 2 * chunk * HEAD_DIM / 8 registers a lane.
constexpr int group_chunk(int head_dim) { return 512 / head_dim; }
inline bool decode_supports_head_dim(int64_t d) { return d == 64 || d == 128 || d == 256; }
inline int64_t decode_group_chunks(int64_t head_dim, int64_t groups) {
  const int64_t c = group_chunk(static_cast<int>(head_dim));
  return (groups + c - 1) / c;
}

// Host launchers (csrc/cuda/paged_attention.cu).
cudaError_t launch_paged_decode_attention(const PagedDecodeParams& p, cudaStream_t stream);
cudaError_t launch_write_kv(const WriteKVParams& p, cudaStream_t stream);

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// N consecutive elements as fp32 through 16-byte loads (N * sizeof(T) is a multiple of 16).
template <typename T, int N>
__device__ __forceinline__ void load_row(const T* p, float (&out)[N]) {
  constexpr int kVec = 16 / sizeof(T);
  static_assert(N % kVec == 0, "a lane's slice must be whole 16-byte vectors");
#pragma unroll
  for (int i = 0; i < N; i += kVec) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p + i));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[i + j] = to_float(e[j]);
  }
}

template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(kDecodeThreads)
paged_decode_kernel(const PagedDecodeParams p) {
  constexpr int kChunk = group_chunk(HEAD_DIM);
  constexpr int kElems = HEAD_DIM / kLanesPerToken;
  __shared__ float s_m[kTokenGroups][kChunk];
  __shared__ float s_l[kTokenGroups][kChunk];
  __shared__ float s_acc[kTokenGroups][kChunk][HEAD_DIM];

  const int64_t groups = p.heads / p.kv_heads;
  const int64_t chunks = (groups + kChunk - 1) / kChunk;
  const int64_t kvh = blockIdx.x / chunks;
  const int64_t g0 = (blockIdx.x % chunks) * kChunk;
  const int gn = static_cast<int>(groups - g0 < kChunk ? groups - g0 : kChunk);
  const int64_t b = blockIdx.y;
  const int split = blockIdx.z;
  const int sub = threadIdx.x % kLanesPerToken;  // which slice of the row this lane holds
  const int tg = threadIdx.x / kLanesPerToken;   // which token of the 16 in flight
  const int64_t len = p.seq_lens[b];
  const int64_t bs = p.block_size;

  float q[kChunk][kElems], acc[kChunk][kElems], m[kChunk], l[kChunk];
  const T* qp = static_cast<const T*>(p.q) + b * p.q_stride_b + sub * kElems;
#pragma unroll
  for (int g = 0; g < kChunk; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      acc[g][e] = 0.0f;
      q[g][e] = g < gn ? to_float(qp[(kvh * groups + g0 + g) * p.q_stride_h + e]) * p.scale : 0.0f;
    }
  }

  const int64_t tok_begin = static_cast<int64_t>(split) * p.blocks_per_split * bs;
  int64_t tok_end = tok_begin + static_cast<int64_t>(p.blocks_per_split) * bs;
  tok_end = tok_end < len ? tok_end : len;
  const int32_t* table = p.block_tables + b * p.table_stride;
  const T* kc = static_cast<const T*>(p.k_cache) + kvh * p.cache_stride_head + sub * kElems;
  const T* vc = static_cast<const T*>(p.v_cache) + kvh * p.cache_stride_head + sub * kElems;
  // Uniform trip count across the CTA, so every shuffle sees all 32 lanes.
  for (int64_t base = tok_begin; base < tok_end; base += kTokenGroups) {
    const int64_t tok = base + tg;
    const bool valid = tok < tok_end;
    float k[kElems], v[kElems];
    int64_t row = 0;
    if (valid) {
      row = static_cast<int64_t>(table[tok / bs]) * p.cache_stride_block + (tok % bs) * p.cache_stride_token;
      load_row<T, kElems>(kc + row, k);
      load_row<T, kElems>(vc + row, v);
    }
#pragma unroll
    for (int g = 0; g < kChunk; ++g) {
      float s = 0.0f;
      if (valid) {
#pragma unroll
        for (int e = 0; e < kElems; ++e) s = fmaf(q[g][e], k[e], s);
      }
#pragma unroll
      for (int off = kLanesPerToken / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
      if (valid && g < gn) {
        const float m_new = fmaxf(m[g], s);
        const float alpha = __expf(m[g] - m_new);  // 0 on this group's first token
        const float pr = __expf(s - m_new);
        l[g] = l[g] * alpha + pr;
#pragma unroll
        for (int e = 0; e < kElems; ++e) acc[g][e] = fmaf(acc[g][e], alpha, pr * v[e]);
        m[g] = m_new;
      }
    }
  }

  // Merge the 16 token groups: common max, rescaled sums and accumulators.
  if (sub == 0) {
#pragma unroll
    for (int g = 0; g < kChunk; ++g) {
      s_m[tg][g] = m[g];
      s_l[tg][g] = l[g];
    }
  }
  __syncthreads();
#pragma unroll
  for (int g = 0; g < kChunk; ++g) {
    float top = -INFINITY;
    for (int i = 0; i < kTokenGroups; ++i) top = fmaxf(top, s_m[i][g]);
    const float w = m[g] == -INFINITY ? 0.0f : __expf(m[g] - top);
#pragma unroll
    for (int e = 0; e < kElems; ++e) s_acc[tg][g][sub * kElems + e] = acc[g][e] * w;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < gn * HEAD_DIM; idx += kDecodeThreads) {
    const int g = idx / HEAD_DIM, e = idx % HEAD_DIM;
    float top = -INFINITY;
    for (int i = 0; i < kTokenGroups; ++i) top = fmaxf(top, s_m[i][g]);
    float total = 0.0f, sum = 0.0f;
    for (int i = 0; i < kTokenGroups; ++i) {
      total += s_acc[i][g][e];
      sum += s_m[i][g] == -INFINITY ? 0.0f : s_l[i][g] * __expf(s_m[i][g] - top);
    }
    const float o = sum > 0.0f ? total / sum : 0.0f;
    const int64_t h = kvh * groups + g0 + g;
    if (p.num_splits == 1) {
      static_cast<T*>(p.out)[(b * p.heads + h) * HEAD_DIM + e] = from_float<T>(o);
    } else {
      const int64_t row_idx = (b * p.heads + h) * p.num_splits + split;
      p.partial_out[row_idx * HEAD_DIM + e] = o;
      if (e == 0) p.partial_lse[row_idx] = sum > 0.0f ? top + __logf(sum) : -INFINITY;
    }
  }
}

// One CTA per (sequence, head): merges the splits' partial rows.
template <typename T>
__global__ void paged_decode_combine_kernel(const PagedDecodeParams p) {
  const int64_t row = blockIdx.x;  // b * heads + h
  const float* lse = p.partial_lse + row * p.num_splits;
  float top = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) top = fmaxf(top, lse[s]);
  float sum = 0.0f;
  for (int s = 0; s < p.num_splits; ++s) sum += lse[s] == -INFINITY ? 0.0f : __expf(lse[s] - top);
  for (int64_t e = threadIdx.x; e < p.head_dim; e += blockDim.x) {
    float o = 0.0f;
    for (int s = 0; s < p.num_splits; ++s)
      if (lse[s] != -INFINITY) o += __expf(lse[s] - top) * p.partial_out[(row * p.num_splits + s) * p.head_dim + e];
    static_cast<T*>(p.out)[row * p.head_dim + e] = from_float<T>(sum > 0.0f ? o / sum : 0.0f);
  }
}

template <typename Word>  // copies raw elements of the right width: no arithmetic, any dtype
__global__ void write_kv_kernel(const WriteKVParams p) {
  const int64_t n = blockIdx.x;
  const int64_t slot = p.slot_mapping[n];
  if (slot < 0) return;
  const int64_t dst0 = (slot / p.block_size) * p.cache_stride_block + (slot % p.block_size) * p.cache_stride_token;
  for (int64_t i = threadIdx.x; i < p.kv_heads * p.head_dim; i += blockDim.x) {
    const int64_t h = i / p.head_dim, e = i % p.head_dim;
    const int64_t dst = dst0 + h * p.cache_stride_head + e;
    static_cast<Word*>(p.k_cache)[dst] = static_cast<const Word*>(p.k)[n * p.k_stride_n + h * p.k_stride_h + e];
    static_cast<Word*>(p.v_cache)[dst] = static_cast<const Word*>(p.v)[n * p.v_stride_n + h * p.v_stride_h + e];
  }
}

}  // namespace cuda_kernels
}  // namespace engine
