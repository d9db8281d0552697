// Paged KV cache kernels on the CPU: plain C++17 + OpenMP over raw pointers (no torch).
// Semantics follow engine/ops/paged_attention.py; csrc/paged_attention_bindings.cpp adapts
// torch tensors. Layouts (strides in elements; the last dim is always unit-stride):
//   q [B, H, d]    k_cache, v_cache [num_blocks, block_size, H_kv, d]    out [B, H, d]
//   block_tables int32 [B, max_blocks] (entries past a sequence's last block are never read)
//   seq_lens int32 [B] (0 gives a zero output row)
#pragma once

#include <cstdint>

namespace engine {
namespace cpu {

enum class KVType : int { F32 = 0, F16 = 1, BF16 = 2 };

struct PagedDecodeArgs {
  const void* q;
  const void* k_cache;
  const void* v_cache;
  void* out;                     // same dtype as q, contiguous [B, H, d]
  KVType dtype;                  // of q, the caches and out
  const int32_t* block_tables;
  const int32_t* seq_lens;
  int64_t batch, heads, kv_heads, head_dim, block_size, max_blocks;
  int64_t q_stride_b, q_stride_h;
  int64_t cache_stride_block, cache_stride_token, cache_stride_head;  // shared by k and v
  int64_t table_stride;
  float scale;
};

// One task per (sequence, kv head): the H / H_kv query heads that share the kv head are
// served together, so each K/V row is loaded (and converted to fp32) once. Online softmax
// one block at a time, accumulation in fp32.
void paged_decode_attention(const PagedDecodeArgs& a);

struct WriteKVArgs {
  const void* k;                 // [N, H_kv, d]
  const void* v;
  void* k_cache;                 // [num_blocks, block_size, H_kv, d]
  void* v_cache;
  const int64_t* slot_mapping;   // [N]: block * block_size + offset; < 0 = skip (padding)
  int64_t tokens, kv_heads, head_dim, elem_size, block_size;
  int64_t k_stride_n, k_stride_h, v_stride_n, v_stride_h;
  int64_t cache_stride_block, cache_stride_token, cache_stride_head;  // shared by both caches
  int64_t num_slots;             // num_blocks * block_size, for the bounds check
};

// Returns the index of the first out-of-range slot, or -1 when all were in range (and written).
int64_t write_kv(const WriteKVArgs& a);

}  // namespace cpu
}  // namespace engine
