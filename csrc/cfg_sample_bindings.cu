// CUDA kernel for engine::cfg_sample (the schema is defined in cfg_sample_bindings.cpp):
// checks layouts and hands raw pointers and the current stream to csrc/cuda/cfg_sample.cu.
// Status codes come back in a tensor, so no host sync happens inside the op.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "cuda/cfg_sample.cuh"

namespace {

namespace ck = engine::cuda_kernels;

void check_param(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const at::Tensor& logits,
                 const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype && t.numel() == numel && t.is_contiguous() &&
                  t.device() == logits.device(),
              "cfg_sample: ", name, " must be a contiguous ", dtype, " tensor of ", numel,
              " elements on ", logits.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cfg_sample_cuda(
    const at::Tensor& logits_in, const at::Tensor& cfg_scale, const at::Tensor& temperature,
    const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& allowed,
    const at::Tensor& seed, bool guided, double cd_alpha, int64_t cd_k) {
  TORCH_CHECK(logits_in.dim() == 2, "cfg_sample: logits must be 2-D, got ", logits_in.sizes());
  TORCH_CHECK(!guided || logits_in.size(0) % 2 == 0, "cfg_sample: guided needs an even row count");
  const int64_t batch = guided ? logits_in.size(0) / 2 : logits_in.size(0);
  check_param(cfg_scale, at::kFloat, batch, logits_in, "cfg_scale");
  check_param(temperature, at::kFloat, batch, logits_in, "temperature");
  check_param(top_k, at::kLong, batch, logits_in, "top_k");
  check_param(top_p, at::kFloat, batch, logits_in, "top_p");
  check_param(allowed, at::kLong, 2 * batch, logits_in, "allowed");
  check_param(seed, at::kLong, 1, logits_in, "seed");
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  ck::LogitType dtype;
  switch (logits.scalar_type()) {
    case at::kFloat: dtype = ck::LogitType::F32; break;
    case at::kHalf: dtype = ck::LogitType::F16; break;
    case at::kBFloat16: dtype = ck::LogitType::BF16; break;
    default: TORCH_CHECK(false, "cfg_sample: logits must be fp32, fp16 or bf16, got ", logits.scalar_type());
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  auto tokens = at::empty({batch}, logits.options().dtype(at::kLong));
  auto logprobs = at::empty({batch}, logits.options().dtype(at::kFloat));
  auto status = at::empty({batch}, logits.options().dtype(at::kInt));

  ck::CfgSampleParams p;
  p.logits = logits.data_ptr();
  p.dtype = dtype;
  p.row_stride = logits.stride(0);
  p.batch = batch;
  p.vocab = logits.size(1);
  p.guided = guided;
  p.cfg_scale = cfg_scale.data_ptr<float>();
  p.temperature = temperature.data_ptr<float>();
  p.top_k = top_k.data_ptr<int64_t>();
  p.top_p = top_p.data_ptr<float>();
  p.allowed = allowed.data_ptr<int64_t>();
  // fp32 log, as the reference adds torch.log(tensor(alpha)) to fp32 log-probs.
  p.cd_log_alpha = cd_k > 0 ? std::log(static_cast<float>(cd_alpha)) : 0.0f;
  p.cd_k = cd_k;
  p.seed = seed.data_ptr<int64_t>();
  p.tokens = tokens.data_ptr<int64_t>();
  p.logprobs = logprobs.data_ptr<float>();
  p.status = status.data_ptr<int32_t>();
  C10_CUDA_CHECK(ck::launch_cfg_sample(p, c10::cuda::getCurrentCUDAStream(logits.device().index()).stream()));
  return {tokens, logprobs, status};
}

}  // namespace

TORCH_LIBRARY_IMPL(engine, CUDA, m) { m.impl("cfg_sample", &cfg_sample_cuda); }
