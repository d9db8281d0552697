// Registers engine::cfg_sample (the schema, for every backend) and its CPU kernel.
// The Python wrapper (engine/ops/sampling.py) normalises the per-row parameters and draws
// the seed; this file only checks layouts and hands raw pointers to csrc/cpu/cfg_sample.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/cfg_sample.h"

namespace {

void check_params(const at::Tensor& logits, const at::Tensor& cfg_scale,
                  const at::Tensor& temperature, const at::Tensor& top_k,
                  const at::Tensor& top_p, const at::Tensor& allowed, bool guided) {
  TORCH_CHECK(logits.dim() == 2, "cfg_sample: logits must be 2-D, got ", logits.sizes());
  const int64_t batch = guided ? logits.size(0) / 2 : logits.size(0);
  TORCH_CHECK(!guided || logits.size(0) % 2 == 0, "cfg_sample: guided needs an even row count");
  auto check = [&](const at::Tensor& t, at::ScalarType dtype, int64_t numel, const char* name) {
    TORCH_CHECK(t.scalar_type() == dtype && t.numel() == numel && t.is_contiguous() &&
                    t.device() == logits.device(),
                "cfg_sample: ", name, " must be a contiguous ", dtype, " tensor of ", numel,
                " elements on ", logits.device());
  };
  check(cfg_scale, at::kFloat, batch, "cfg_scale");
  check(temperature, at::kFloat, batch, "temperature");
  check(top_k, at::kLong, batch, "top_k");
  check(top_p, at::kFloat, batch, "top_p");
  check(allowed, at::kLong, 2 * batch, "allowed");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cfg_sample_cpu(
    const at::Tensor& logits_in, const at::Tensor& cfg_scale, const at::Tensor& temperature,
    const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& allowed,
    const at::Tensor& seed, bool guided, double cd_alpha, int64_t cd_k) {
  check_params(logits_in, cfg_scale, temperature, top_k, top_p, allowed, guided);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "cfg_sample: seed must be one int64");
  // Rows may be strided (a slice of a larger buffer); ids must be unit-stride.
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  engine::cpu::LogitType dtype;
  switch (logits.scalar_type()) {
    case at::kFloat: dtype = engine::cpu::LogitType::F32; break;
    case at::kHalf: dtype = engine::cpu::LogitType::F16; break;
    case at::kBFloat16: dtype = engine::cpu::LogitType::BF16; break;
    default: TORCH_CHECK(false, "cfg_sample: logits must be fp32, fp16 or bf16, got ", logits.scalar_type());
  }
  const int64_t batch = guided ? logits.size(0) / 2 : logits.size(0);
  auto tokens = at::empty({batch}, logits.options().dtype(at::kLong));
  auto logprobs = at::empty({batch}, logits.options().dtype(at::kFloat));
  auto status = at::empty({batch}, logits.options().dtype(at::kInt));

  engine::cpu::CfgSampleArgs args;
  args.logits = logits.data_ptr();
  args.dtype = dtype;
  args.row_stride = logits.stride(0);
  args.batch = batch;
  args.vocab = logits.size(1);
  args.guided = guided;
  args.cfg_scale = cfg_scale.data_ptr<float>();
  args.temperature = temperature.data_ptr<float>();
  args.top_k = top_k.data_ptr<int64_t>();
  args.top_p = top_p.data_ptr<float>();
  args.allowed = allowed.data_ptr<int64_t>();
  args.cd_alpha = static_cast<float>(cd_alpha);
  args.cd_k = cd_k;
  args.seed = static_cast<uint64_t>(seed.item<int64_t>());
  args.tokens = tokens.data_ptr<int64_t>();
  args.logprobs = logprobs.data_ptr<float>();
  args.status = status.data_ptr<int32_t>();
  engine::cpu::cfg_sample(args);
  return {tokens, logprobs, status};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(engine, m) {
  // Returns (tokens int64 [B], logprobs fp32 [B], status int32 [B]); status codes are in
  // csrc/cpu/cfg_sample.h and are turned into Python errors by engine/ops/sampling.py, so
  // the CUDA kernel can report them without a host sync inside the op.
  m.def("cfg_sample(Tensor logits, Tensor cfg_scale, Tensor temperature, Tensor top_k, "
        "Tensor top_p, Tensor allowed, Tensor seed, bool guided, float cd_alpha, int cd_k) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(engine, CPU, m) { m.impl("cfg_sample", &cfg_sample_cpu); }
