// See paged_attention.h. The inner loops over head_dim are written as plain counted loops
// with `omp simd` so g++ -O3 -march=x86-64-v3 emits AVX2/FMA for them.
#include "cpu/paged_attention.h"

#include "cpu/float_bits.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace engine {
namespace cpu {

namespace {

// Loads n elements as fp32 (a copy for half types, so the dot loops see one type).
inline const float* load_row(const void* base, int64_t offset, KVType t, int64_t n, float* buf) {
  if (t == KVType::F32) return static_cast<const float*>(base) + offset;
  const uint16_t* p = static_cast<const uint16_t*>(base) + offset;
  if (t == KVType::F16) {
    for (int64_t i = 0; i < n; ++i) buf[i] = half_to_float(p[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = bf16_to_float(p[i]);
  }
  return buf;
}

inline void store_row(void* base, int64_t offset, KVType t, int64_t n, const float* x) {
  if (t == KVType::F32) {
    std::memcpy(static_cast<float*>(base) + offset, x, static_cast<size_t>(n) * sizeof(float));
    return;
  }
  uint16_t* p = static_cast<uint16_t*>(base) + offset;
  for (int64_t i = 0; i < n; ++i) p[i] = t == KVType::F16 ? float_to_half(x[i]) : float_to_bf16(x[i]);
}

void decode_one(const PagedDecodeArgs& a, int64_t b, int64_t kvh, std::vector<float>& scratch) {
  const int64_t d = a.head_dim, bs = a.block_size, groups = a.heads / a.kv_heads;
  const int64_t len = a.seq_lens[b];
  // scratch: q (groups x d) | acc (groups x d) | scores (groups x bs) | k/v row buffer (d)
  scratch.assign(static_cast<size_t>(2 * groups * d + groups * bs + d), 0.0f);
  float* q = scratch.data();
  float* acc = q + groups * d;
  float* s = acc + groups * d;
  float* row = s + groups * bs;
  std::vector<float> m(static_cast<size_t>(groups), -std::numeric_limits<float>::infinity());
  std::vector<float> l(static_cast<size_t>(groups), 0.0f);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t h = kvh * groups + g;
    const float* src = load_row(a.q, b * a.q_stride_b + h * a.q_stride_h, a.dtype, d, row);
    // The scale is folded into q once instead of into every score.
    for (int64_t i = 0; i < d; ++i) q[g * d + i] = src[i] * a.scale;
  }
  const int32_t* table = a.block_tables + b * a.table_stride;
  const int64_t nblocks = (len + bs - 1) / bs;
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const int64_t base = static_cast<int64_t>(table[blk]) * a.cache_stride_block + kvh * a.cache_stride_head;
    const int64_t ntok = std::min(bs, len - blk * bs);
    for (int64_t t = 0; t < ntok; ++t) {
      const float* k = load_row(a.k_cache, base + t * a.cache_stride_token, a.dtype, d, row);
      for (int64_t g = 0; g < groups; ++g) {
        const float* qg = q + g * d;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < d; ++i) dot += qg[i] * k[i];
        s[g * bs + t] = dot;
      }
    }
    // Online softmax over this block: rescale the running sums once per block, not per token.
    for (int64_t g = 0; g < groups; ++g) {
      float* sg = s + g * bs;
      float mnew = m[g];
      for (int64_t t = 0; t < ntok; ++t) mnew = std::max(mnew, sg[t]);
      const float alpha = std::exp(m[g] - mnew);  // exp(-inf) = 0 on the first block
      float sum = 0.0f;
      for (int64_t t = 0; t < ntok; ++t) {
        sg[t] = std::exp(sg[t] - mnew);
        sum += sg[t];
      }
      l[g] = l[g] * alpha + sum;
      m[g] = mnew;
      float* ag = acc + g * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) ag[i] *= alpha;
    }
    for (int64_t t = 0; t < ntok; ++t) {
      const float* v = load_row(a.v_cache, base + t * a.cache_stride_token, a.dtype, d, row);
      for (int64_t g = 0; g < groups; ++g) {
        float* ag = acc + g * d;
        const float p = s[g * bs + t];
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) ag[i] += p * v[i];
      }
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    float* ag = acc + g * d;
    const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;  // empty sequence -> zero row
    for (int64_t i = 0; i < d; ++i) ag[i] *= inv;
    store_row(a.out, (b * a.heads + kvh * groups + g) * d, a.dtype, d, ag);
  }
}

}  // namespace

void paged_decode_attention(const PagedDecodeArgs& a) {
  const int64_t tasks = a.batch * a.kv_heads;
#pragma omp parallel
  {
    std::vector<float> scratch;
    // Dynamic: sequences of mixed lengths make tasks of very different cost.
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) decode_one(a, task / a.kv_heads, task % a.kv_heads, scratch);
  }
}

int64_t write_kv(const WriteKVArgs& a) {
  for (int64_t n = 0; n < a.tokens; ++n)
    if (a.slot_mapping[n] >= a.num_slots) return n;
  const size_t row_bytes = static_cast<size_t>(a.head_dim * a.elem_size);
  const char* k = static_cast<const char*>(a.k);
  const char* v = static_cast<const char*>(a.v);
  char* kc = static_cast<char*>(a.k_cache);
  char* vc = static_cast<char*>(a.v_cache);
  const int64_t es = a.elem_size;
#pragma omp parallel for schedule(static) if (a.tokens * a.kv_heads * a.head_dim > 65536)
  for (int64_t n = 0; n < a.tokens; ++n) {
    const int64_t slot = a.slot_mapping[n];
    if (slot < 0) continue;
    for (int64_t h = 0; h < a.kv_heads; ++h) {
      const int64_t dst = ((slot / a.block_size) * a.cache_stride_block +
                           (slot % a.block_size) * a.cache_stride_token + h * a.cache_stride_head) * es;
      std::memcpy(kc + dst, k + (n * a.k_stride_n + h * a.k_stride_h) * es, row_bytes);
      std::memcpy(vc + dst, v + (n * a.v_stride_n + h * a.v_stride_h) * es, row_bytes);
    }
  }
  return -1;
}

}  // namespace cpu
}  // namespace engine
