// CUDA kernels for engine::paged_decode_attention and engine::write_kv (schemas in
// paged_attention_bindings.cpp): checks layouts, picks the context split, allocates the
// split workspace and hands raw pointers and the current stream to csrc/cuda/paged_attention.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "cuda/paged_attention.cuh"

namespace {

namespace ck = engine::cuda_kernels;

ck::PagedKVType kv_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ck::PagedKVType::F32;
    case at::kHalf: return ck::PagedKVType::F16;
    case at::kBFloat16: return ck::PagedKVType::BF16;
    default: TORCH_CHECK(false, "paged attention: dtype must be fp32, fp16 or bf16, got ", t.scalar_type());
  }
}

// The kernel reads each lane's slice of a K/V row with 16-byte loads.
bool rows_aligned(const at::Tensor& cache) {
  const int64_t es = cache.element_size();
  return reinterpret_cast<uintptr_t>(cache.data_ptr()) % 16 == 0 && cache.stride(3) == 1 &&
         (cache.stride(0) * es) % 16 == 0 && (cache.stride(1) * es) % 16 == 0 && (cache.stride(2) * es) % 16 == 0;
}

at::Tensor paged_decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache_in,
                                       const at::Tensor& v_cache_in, const at::Tensor& block_tables,
                                       const at::Tensor& seq_lens, double scale, int64_t num_splits) {
  TORCH_CHECK(q.dim() == 3 && k_cache_in.dim() == 4 && k_cache_in.sizes() == v_cache_in.sizes(),
              "paged_decode_attention: q must be [B, H, d] and the caches [num_blocks, block_size, H_kv, d]");
  TORCH_CHECK(q.size(2) == k_cache_in.size(3) && q.size(1) % k_cache_in.size(2) == 0,
              "paged_decode_attention: q ", q.sizes(), " does not fit the cache ", k_cache_in.sizes());
  TORCH_CHECK(ck::decode_supports_head_dim(q.size(2)),
              "paged_decode_attention (cuda): head_dim must be 64, 128 or 256, got ", q.size(2));
  TORCH_CHECK(q.scalar_type() == k_cache_in.scalar_type() && q.scalar_type() == v_cache_in.scalar_type(),
              "paged_decode_attention: q and the caches must share a dtype");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == q.size(0) &&
                  block_tables.scalar_type() == at::kInt && block_tables.stride(1) == 1,
              "paged_decode_attention: block_tables must be int32 [B, max_blocks] with unit inner stride");
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == q.size(0) && seq_lens.scalar_type() == at::kInt &&
                  seq_lens.is_contiguous(),
              "paged_decode_attention: seq_lens must be a contiguous int32 [B]");
  TORCH_CHECK(q.stride(2) == 1, "paged_decode_attention: q's head_dim must be unit-stride");
  for (const auto* t : {&k_cache_in, &v_cache_in, &block_tables, &seq_lens})
    TORCH_CHECK(t->device() == q.device(), "paged_decode_attention: all inputs must be on ", q.device());
  // A cache view that breaks the 16-byte row alignment is copied (correct, and slow: pools
  // made by engine/inference/paged_cache.py are always aligned).
  const at::Tensor k_cache = rows_aligned(k_cache_in) ? k_cache_in : k_cache_in.contiguous();
  const at::Tensor v_cache = rows_aligned(v_cache_in) && v_cache_in.strides() == k_cache.strides()
                                 ? v_cache_in : v_cache_in.contiguous();
  TORCH_CHECK(k_cache.strides() == v_cache.strides(), "paged_decode_attention: caches must share a layout");

  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  const int64_t batch = q.size(0), heads = q.size(1), kv_heads = k_cache.size(2);
  const int64_t max_blocks = std::max<int64_t>(block_tables.size(1), 1);
  if (num_splits <= 0) {
    // Flash-decoding: enough CTAs to fill every SM twice, at least 4 blocks per split.
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.device().index()));
    const int64_t ctas = batch * kv_heads * ck::decode_group_chunks(q.size(2), heads / kv_heads);
    num_splits = std::min((2 * int64_t{sms} + ctas - 1) / std::max<int64_t>(ctas, 1), std::max<int64_t>(max_blocks / 4, 1));
  }
  num_splits = std::max<int64_t>(1, std::min(num_splits, max_blocks));
  const int64_t per_split = (max_blocks + num_splits - 1) / num_splits;
  num_splits = (max_blocks + per_split - 1) / per_split;

  at::Tensor part, lse;
  if (num_splits > 1) {
    part = at::empty({batch, heads, num_splits, q.size(2)}, q.options().dtype(at::kFloat));
    lse = at::empty({batch, heads, num_splits}, q.options().dtype(at::kFloat));
  }
  ck::PagedDecodeParams p;
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.out = out.data_ptr();
  p.partial_out = num_splits > 1 ? part.data_ptr<float>() : nullptr;
  p.partial_lse = num_splits > 1 ? lse.data_ptr<float>() : nullptr;
  p.dtype = kv_type(q);
  p.block_tables = block_tables.data_ptr<int32_t>();
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.batch = batch;
  p.heads = heads;
  p.kv_heads = kv_heads;
  p.head_dim = q.size(2);
  p.block_size = k_cache.size(1);
  p.q_stride_b = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.cache_stride_block = k_cache.stride(0);
  p.cache_stride_token = k_cache.stride(1);
  p.cache_stride_head = k_cache.stride(2);
  p.table_stride = block_tables.stride(0);
  p.scale = static_cast<float>(scale);
  p.num_splits = static_cast<int>(num_splits);
  p.blocks_per_split = static_cast<int>(per_split);
  C10_CUDA_CHECK(ck::launch_paged_decode_attention(p, c10::cuda::getCurrentCUDAStream(q.device().index()).stream()));
  return out;
}

void write_kv_cuda(const at::Tensor& k, const at::Tensor& v, at::Tensor k_cache, at::Tensor v_cache,
                   const at::Tensor& slot_mapping) {
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.strides() == v_cache.strides() && k.size(1) == k_cache.size(2) &&
                  k.size(2) == k_cache.size(3),
              "write_kv: k, v [N, H_kv, d] must match caches [num_blocks, block_size, H_kv, d] of one layout");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type() &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "write_kv: k, v and the caches must share a dtype");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1 && k_cache.stride(3) == 1, "write_kv: head_dim must be unit-stride");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == k.size(0) && slot_mapping.scalar_type() == at::kLong &&
                  slot_mapping.is_contiguous(),
              "write_kv: slot_mapping must be a contiguous int64 [N]");
  // No bounds check here: it would cost a device sync per layer; the reference and the
  // CPU kernel check, and the block manager only hands out slots inside the pool.
  const c10::cuda::CUDAGuard guard(k.device());
  ck::WriteKVParams p;
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.tokens = k.size(0);
  p.kv_heads = k.size(1);
  p.head_dim = k.size(2);
  p.elem_size = k.element_size();
  p.block_size = k_cache.size(1);
  p.k_stride_n = k.stride(0);
  p.k_stride_h = k.stride(1);
  p.v_stride_n = v.stride(0);
  p.v_stride_h = v.stride(1);
  p.cache_stride_block = k_cache.stride(0);
  p.cache_stride_token = k_cache.stride(1);
  p.cache_stride_head = k_cache.stride(2);
  C10_CUDA_CHECK(ck::launch_write_kv(p, c10::cuda::getCurrentCUDAStream(k.device().index()).stream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(engine, CUDA, m) {
  m.impl("paged_decode_attention", &paged_decode_attention_cuda);
  m.impl("write_kv", &write_kv_cuda);
}
