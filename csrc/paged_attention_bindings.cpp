// Registers engine::paged_decode_attention and engine::write_kv (the schemas, for every
// backend) and their CPU kernels (csrc/cpu/paged_attention). This file checks shapes and
// layouts and hands raw pointers over; engine/ops/paged_attention.py holds the semantics.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/paged_attention.h"

namespace {

namespace cpu = engine::cpu;

cpu::KVType kv_type(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return cpu::KVType::F32;
    case at::kHalf: return cpu::KVType::F16;
    case at::kBFloat16: return cpu::KVType::BF16;
    default: TORCH_CHECK(false, op, ": dtype must be fp32, fp16 or bf16, got ", t.scalar_type());
  }
}

void check_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& block_tables, const at::Tensor& seq_lens) {
  TORCH_CHECK(q.dim() == 3, "paged_decode_attention: q must be [B, H, d], got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.strides() == v_cache.strides(),
              "paged_decode_attention: k_cache and v_cache must be [num_blocks, block_size, H_kv, d] "
              "with equal layouts, got ", k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK(k_cache.size(3) == q.size(2), "paged_decode_attention: head_dim mismatch");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "paged_decode_attention: query heads (", q.size(1),
              ") must be a multiple of kv heads (", k_cache.size(2), ")");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "paged_decode_attention: q and the caches must share a dtype");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(3) == 1, "paged_decode_attention: head_dim must be unit-stride");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == q.size(0) &&
                  block_tables.scalar_type() == at::kInt && block_tables.stride(1) == 1,
              "paged_decode_attention: block_tables must be int32 [B, max_blocks] with unit inner stride");
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == q.size(0) && seq_lens.scalar_type() == at::kInt &&
                  seq_lens.is_contiguous(),
              "paged_decode_attention: seq_lens must be a contiguous int32 [B]");
  for (const auto* t : {&k_cache, &v_cache, &block_tables, &seq_lens})
    TORCH_CHECK(t->device() == q.device(), "paged_decode_attention: all inputs must be on ", q.device());
}

at::Tensor paged_decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                      const at::Tensor& v_cache, const at::Tensor& block_tables,
                                      const at::Tensor& seq_lens, double scale, int64_t num_splits) {
  (void)num_splits;  // one task per (sequence, kv head) already fills a CPU's cores
  check_decode(q, k_cache, v_cache, block_tables, seq_lens);
  const int64_t max_len = seq_lens.numel() ? seq_lens.max().item<int64_t>() : 0;
  TORCH_CHECK(seq_lens.numel() == 0 || seq_lens.min().item<int64_t>() >= 0,
              "paged_decode_attention: seq_lens must be >= 0");
  TORCH_CHECK(max_len <= block_tables.size(1) * k_cache.size(1),
              "paged_decode_attention: a sequence of ", max_len, " tokens needs more than the ",
              block_tables.size(1), " blocks of its table");
  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  cpu::PagedDecodeArgs a;
  a.q = q.data_ptr();
  a.k_cache = k_cache.data_ptr();
  a.v_cache = v_cache.data_ptr();
  a.out = out.data_ptr();
  a.dtype = kv_type(q, "paged_decode_attention");
  a.block_tables = block_tables.data_ptr<int32_t>();
  a.seq_lens = seq_lens.data_ptr<int32_t>();
  a.batch = q.size(0);
  a.heads = q.size(1);
  a.kv_heads = k_cache.size(2);
  a.head_dim = q.size(2);
  a.block_size = k_cache.size(1);
  a.max_blocks = block_tables.size(1);
  a.q_stride_b = q.stride(0);
  a.q_stride_h = q.stride(1);
  a.cache_stride_block = k_cache.stride(0);
  a.cache_stride_token = k_cache.stride(1);
  a.cache_stride_head = k_cache.stride(2);
  a.table_stride = block_tables.stride(0);
  a.scale = static_cast<float>(scale);
  cpu::paged_decode_attention(a);
  return out;
}

void write_kv_cpu(const at::Tensor& k, const at::Tensor& v, at::Tensor k_cache, at::Tensor v_cache,
                  const at::Tensor& slot_mapping) {
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes(), "write_kv: k and v must be [N, H_kv, d], got ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.strides() == v_cache.strides(),
              "write_kv: k_cache and v_cache must be [num_blocks, block_size, H_kv, d] with equal layouts");
  TORCH_CHECK(k.size(1) == k_cache.size(2) && k.size(2) == k_cache.size(3),
              "write_kv: k [N, H_kv, d] does not match the cache's [.., .., ", k_cache.size(2), ", ",
              k_cache.size(3), "]");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type() &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "write_kv: k, v and the caches must share a dtype");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1 && k_cache.stride(3) == 1, "write_kv: head_dim must be unit-stride");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == k.size(0) && slot_mapping.scalar_type() == at::kLong &&
                  slot_mapping.is_contiguous(),
              "write_kv: slot_mapping must be a contiguous int64 [N]");
  cpu::WriteKVArgs a;
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.k_cache = k_cache.data_ptr();
  a.v_cache = v_cache.data_ptr();
  a.slot_mapping = slot_mapping.data_ptr<int64_t>();
  a.tokens = k.size(0);
  a.kv_heads = k.size(1);
  a.head_dim = k.size(2);
  a.elem_size = k.element_size();
  a.block_size = k_cache.size(1);
  a.k_stride_n = k.stride(0);
  a.k_stride_h = k.stride(1);
  a.v_stride_n = v.stride(0);
  a.v_stride_h = v.stride(1);
  a.cache_stride_block = k_cache.stride(0);
  a.cache_stride_token = k_cache.stride(1);
  a.cache_stride_head = k_cache.stride(2);
  a.num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t bad = cpu::write_kv(a);
  TORCH_CHECK(bad < 0, "write_kv: slot ", bad < 0 ? 0 : slot_mapping[bad].item<int64_t>(), " (token ", bad,
              ") is past the cache's ", a.num_slots, " slots");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(engine, m) {
  // num_splits: how many parts of the context the CUDA kernel splits each sequence into
  // (flash-decoding); 0 lets it choose. The CPU kernel ignores it.
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor seq_lens, float scale, int num_splits=0) -> Tensor");
  m.def("write_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(engine, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention_cpu);
  m.impl("write_kv", &write_kv_cpu);
}
