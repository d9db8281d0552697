// Registers engine::attention_fwd and engine::attention_bwd (schemas and CPU kernels from
// csrc/cpu/attention). This file checks shapes and layouts and hands raw pointers over;
// engine/ops/attention.py holds the semantics, the fake kernels and the autograd formula.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>

#include "cpu/attention.h"

namespace {

namespace cpu = engine::cpu;

// The kernel reads any [B, H, S, d] strides but needs a unit-stride head dim.
at::Tensor unit_inner(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

cpu::Strided strided(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

cpu::AttentionShape make_shape(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                               double scale, const std::optional<at::Tensor>& cu_seqlens) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && k.sizes() == v.sizes(),
              "attention: expects q [B, Hq, S, d] and k, v [B, Hkv, S, d], got ", q.sizes(), ", ", k.sizes(),
              ", ", v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3),
              "attention (cpp): q and k/v must share B, S (Sq == Sk) and d, got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "attention: query heads (", q.size(1),
              ") must be a multiple of kv heads (", k.size(1), ")");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "attention (cpp): q, k and v must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "attention (cpp): dtype must be fp32 or bf16, got ", q.scalar_type());
  cpu::AttentionShape s;
  s.dtype = q.scalar_type() == at::kFloat ? cpu::AttnType::F32 : cpu::AttnType::BF16;
  s.batch = q.size(0);
  s.heads = q.size(1);
  s.kv_heads = k.size(1);
  s.seq = q.size(2);
  s.head_dim = q.size(3);
  s.cu_seqlens = nullptr;
  s.n_docs = 0;
  s.causal = causal;
  s.scale = static_cast<float>(scale);
  s.threads = at::get_num_threads();
  if (cu_seqlens.has_value()) {
    const at::Tensor& cu = *cu_seqlens;
    TORCH_CHECK(cu.dim() == 1 && cu.scalar_type() == at::kInt && cu.is_contiguous() && cu.device().is_cpu(),
                "attention (cpp): cu_seqlens must be a contiguous int32 CPU tensor");
    s.cu_seqlens = cu.data_ptr<int32_t>();
    s.n_docs = cu.numel() - 1;
    const char* err = cpu::check_documents(s.cu_seqlens, s.n_docs, s.batch, s.seq);
    TORCH_CHECK_VALUE(err == nullptr, err ? err : "", " (B*S=", s.batch * s.seq, ")");
  }
  return s;
}

bool empty_problem(const at::Tensor& q) { return q.numel() == 0; }

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, bool causal, double scale,
                                                     const std::optional<at::Tensor>& cu_seqlens) {
  const at::Tensor q = unit_inner(q_in), k = unit_inner(k_in), v = unit_inner(v_in);
  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (empty_problem(q)) return {out, lse.fill_(-std::numeric_limits<float>::infinity())};
  cpu::AttentionFwdArgs a;
  a.shape = make_shape(q, k, v, causal, scale, cu_seqlens);
  a.q = strided(q);
  a.k = strided(k);
  a.v = strided(v);
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  cpu::attention_forward(a);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out, const at::Tensor& lse, bool causal,
    double scale, const std::optional<at::Tensor>& cu_seqlens) {
  const at::Tensor q = unit_inner(q_in), k = unit_inner(k_in), v = unit_inner(v_in);
  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::empty(k.sizes(), k.options());
  auto dv = at::empty(v.sizes(), v.options());
  if (empty_problem(q)) return {dq, dk.zero_(), dv.zero_()};
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes() &&
                  grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "attention_bwd: grad_out and out must match q ", q.sizes());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2)}) && lse.scalar_type() == at::kFloat,
              "attention_bwd: lse must be fp32 [B, Hq, S]");
  const at::Tensor go = unit_inner(grad_out), o = unit_inner(out), l = lse.contiguous();
  at::Tensor gl;
  if (grad_lse.has_value()) {
    TORCH_CHECK(grad_lse->sizes() == lse.sizes(), "attention_bwd: grad_lse must match lse");
    gl = grad_lse->to(at::kFloat).contiguous();
  }
  cpu::AttentionBwdArgs a;
  a.shape = make_shape(q, k, v, causal, scale, cu_seqlens);
  a.q = strided(q);
  a.k = strided(k);
  a.v = strided(v);
  a.out = strided(o);
  a.dout = strided(go);
  a.lse = l.data_ptr<float>();
  a.dlse = gl.defined() ? gl.data_ptr<float>() : nullptr;
  a.dq = dq.data_ptr();
  a.dk = dk.data_ptr();
  a.dv = dv.data_ptr();
  cpu::attention_backward(a);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(engine, m) {
  // Training / prefill attention (Sq == Sk). Returns the output and the natural-log lse.
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale, Tensor? cu_seqlens=None) "
        "-> (Tensor, Tensor)");
  m.def("attention_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, bool causal, float scale, Tensor? cu_seqlens=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(engine, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}
