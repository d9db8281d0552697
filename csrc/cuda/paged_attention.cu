// Host launchers for the paged KV cache kernels: raw pointers and a stream, no torch.
#include "cuda/paged_attention.cuh"

namespace engine {
namespace cuda_kernels {

namespace {

template <typename T, int HEAD_DIM>
cudaError_t launch_decode_typed(const PagedDecodeParams& p, cudaStream_t stream) {
  const int64_t chunks = decode_group_chunks(HEAD_DIM, p.heads / p.kv_heads);
  const dim3 grid(static_cast<unsigned>(p.kv_heads * chunks), static_cast<unsigned>(p.batch),
                  static_cast<unsigned>(p.num_splits));
  paged_decode_kernel<T, HEAD_DIM><<<grid, kDecodeThreads, 0, stream>>>(p);
  if (p.num_splits > 1)
    paged_decode_combine_kernel<T><<<static_cast<unsigned>(p.batch * p.heads), 128, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_decode_dim(const PagedDecodeParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch_decode_typed<T, 64>(p, stream);
    case 128: return launch_decode_typed<T, 128>(p, stream);
    case 256: return launch_decode_typed<T, 256>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_paged_decode_attention(const PagedDecodeParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.heads == 0) return cudaSuccess;
  if (p.num_splits < 1 || p.blocks_per_split < 1 || p.heads % p.kv_heads != 0) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case PagedKVType::F32: return launch_decode_dim<float>(p, stream);
    case PagedKVType::F16: return launch_decode_dim<__half>(p, stream);
    case PagedKVType::BF16: return launch_decode_dim<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_write_kv(const WriteKVParams& p, cudaStream_t stream) {
  if (p.tokens == 0) return cudaSuccess;
  const int64_t work = p.kv_heads * p.head_dim;
  const unsigned threads = static_cast<unsigned>(work < 256 ? ((work + 31) / 32) * 32 : 256);
  const dim3 grid(static_cast<unsigned>(p.tokens));
  switch (p.elem_size) {
    case 2: write_kv_kernel<uint16_t><<<grid, threads, 0, stream>>>(p); break;
    case 4: write_kv_kernel<uint32_t><<<grid, threads, 0, stream>>>(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda_kernels
}  // namespace engine
