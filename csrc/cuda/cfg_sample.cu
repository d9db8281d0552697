// Host launcher for the CFG sampling kernel: raw pointers and a stream, no torch.
#include "cuda/cfg_sample.cuh"

namespace engine {
namespace cuda_kernels {

cudaError_t launch_cfg_sample(const CfgSampleParams& p, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(p.batch)), block(kThreads);
  switch (p.dtype) {
    case LogitType::F32: cfg_sample_kernel<float><<<grid, block, 0, stream>>>(p); break;
    case LogitType::F16: cfg_sample_kernel<__half><<<grid, block, 0, stream>>>(p); break;
    case LogitType::BF16: cfg_sample_kernel<__nv_bfloat16><<<grid, block, 0, stream>>>(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda_kernels
}  // namespace engine
