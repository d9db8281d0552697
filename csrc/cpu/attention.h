// Training / prefill attention on the CPU: plain C++17 + OpenMP over raw pointers (no torch).
// Semantics follow engine.ops.attention.reference with Sq == Sk; csrc/attention_bindings.cpp
// adapts torch tensors. Layouts (strides in elements; the head dim is always unit-stride):
//   q [B, Hq, S, d]   k, v [B, Hkv, S, d]   (Hq a multiple of Hkv: grouped-query)
//   out, dq [B, Hq, S, d] and dk, dv [B, Hkv, S, d]: contiguous, the inputs' dtype
//   lse [B, Hq, S] fp32 contiguous: natural-log log-sum-exp of each row's scaled scores
//   cu_seqlens int32 [n_docs + 1] over the flattened B*S tokens (null: one document a row)
// Only the (causal) triangle inside each document is computed, in fp32.
#pragma once

#include <cstdint>

namespace engine {
namespace cpu {

enum class AttnType : int { F32 = 0, BF16 = 1 };

struct Strided {          // one [B, H, S, d] tensor
  const void* data;
  int64_t sb, sh, ss;     // strides of B, H and S (d is unit-stride)
};

struct AttentionShape {
  AttnType dtype;         // of every q/k/v/out/grad tensor
  int64_t batch, heads, kv_heads, seq, head_dim;
  const int32_t* cu_seqlens;  // null: each row is one document
  int64_t n_docs;
  bool causal;
  float scale;
  int threads;            // OpenMP threads to use (torch's setting, passed in by the binding)
};

struct AttentionFwdArgs {
  AttentionShape shape;
  Strided q, k, v;
  void* out;
  float* lse;
};

struct AttentionBwdArgs {
  AttentionShape shape;
  Strided q, k, v, out, dout;
  const float* lse;       // contiguous [B, Hq, S]
  const float* dlse;      // gradient of lse (contiguous), or null when lse was not used
  void* dq;
  void* dk;
  void* dv;
};

// Null when cu_seqlens is well formed (starts at 0, ends at B*S, never decreases, every row
// boundary is a document boundary); else a static message saying what is wrong.
const char* check_documents(const int32_t* cu_seqlens, int64_t n_docs, int64_t batch, int64_t seq);

// Tiled online softmax (base 2 inside); one task per (document, kv head, block of queries).
void attention_forward(const AttentionFwdArgs& a);

// Flash-attention-2 style: P is recomputed from lse, D = rowsum(dO * O) (- dlse); one task per
// (document, kv head, block of keys). dk/dv sum over the query heads of a group.
void attention_backward(const AttentionBwdArgs& a);

}  // namespace cpu
}  // namespace engine
