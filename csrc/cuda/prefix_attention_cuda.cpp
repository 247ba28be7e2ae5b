// Torch glue of the prefix_attention CUDA kernels: checks the tensors, allocates the outputs,
// fills the framework-free params structs and launches on the current stream of the tensors'
// device. Compiled by the host compiler; the kernels are in prefix_attention.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cuda_runtime.h>

#include <optional>
#include <tuple>

#include "glue.h"
#include "prefix_attention.cuh"
#include "prefix_attention.h"

namespace deltakern {
namespace {

constexpr const char* kOp = "deltakern.prefix_attention (cuda)";

// The cheap checks of a direct call (the Python op validates fully before it gets here) and the
// params of the inputs.
PrefixAttentionProblem make_problem(const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, const at::Tensor& prefix_k,
                                    const at::Tensor& prefix_v,
                                    const std::optional<at::Tensor>& key_padding_mask,
                                    bool causal, double scale) {
  TORCH_CHECK(q.is_cuda(), kOp, ": q must be a CUDA tensor, got device ", q.device());
  TORCH_CHECK(q.dim() == 4, kOp, ": q must be [B, Hq, Lq, D], got ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes(), kOp,
              ": k and v must both be [B, Hkv, Lk, D], got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3), kOp,
              ": k must be [B, Hkv, Lk, D] with B and D of q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, kOp,
              ": Hq must be a multiple of Hkv > 0, got Hq = ", q.size(1), ", Hkv = ", k.size(1));
  TORCH_CHECK(q.size(3) <= kPrefixAttentionMaxHeadDim, kOp, ": head dim D must be at most ",
              kPrefixAttentionMaxHeadDim, " on CUDA, got ", q.size(3));
  TORCH_CHECK(prefix_k.sizes() == prefix_v.sizes(), kOp,
              ": prefix_k and prefix_v must have one shape, got ", prefix_k.sizes(), " and ",
              prefix_v.sizes());
  const bool shared = prefix_k.dim() == 3;
  TORCH_CHECK((shared || (prefix_k.dim() == 4 && prefix_k.size(0) == q.size(0))) &&
                  prefix_k.size(-3) == k.size(1) && prefix_k.size(-1) == q.size(3),
              kOp, ": prefix_k must be [Hkv, P, D] or [B, Hkv, P, D] with Hkv = ", k.size(1),
              ", D = ", q.size(3), ", got ", prefix_k.sizes());
  check_cuda_tensor(q, q, kOp, "q", "q");
  check_cuda_tensor(k, q, kOp, "k", "q");
  check_cuda_tensor(v, q, kOp, "v", "q");
  check_cuda_tensor(prefix_k, q, kOp, "prefix_k", "q");
  check_cuda_tensor(prefix_v, q, kOp, "prefix_v", "q");

  PrefixAttentionProblem in{};
  in.key_padding_mask = nullptr;
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == q.size(0) &&
                    m.size(1) == k.size(2) && m.is_contiguous() && m.device() == q.device(),
                kOp, ": key_padding_mask must be a contiguous bool [B, Lk] = [", q.size(0), ", ",
                k.size(2), "] tensor on ", q.device(), ", got ", m.scalar_type(), " ",
                m.sizes(), " on ", m.device());
    in.key_padding_mask = reinterpret_cast<const uint8_t*>(m.const_data_ptr<bool>());
  }
  in.q = q.const_data_ptr();
  in.k = k.const_data_ptr();
  in.v = v.const_data_ptr();
  in.prefix_k = prefix_k.const_data_ptr();
  in.prefix_v = prefix_v.const_data_ptr();
  in.B = q.size(0);
  in.Hq = q.size(1);
  in.Lq = q.size(2);
  in.D = q.size(3);
  in.Hkv = k.size(1);
  in.Lk = k.size(2);
  in.P = prefix_k.size(-2);
  in.prefix_shared = shared;
  in.causal = causal;
  in.scale = static_cast<float>(scale);
  in.dtype = to_dtype(q, kOp, "q");
  return in;
}

void check_launch(cudaError_t err, const char* what, const PrefixAttentionProblem& in,
                  const at::Tensor& q) {
  TORCH_CHECK(err == cudaSuccess, kOp, ": CUDA ", what, " launch failed for B=", in.B,
              ", Hq=", in.Hq, ", Hkv=", in.Hkv, ", Lq=", in.Lq, ", Lk=", in.Lk, ", P=", in.P,
              ", D=", in.D, ", dtype ", q.scalar_type(), ": ", cudaGetErrorString(err));
}

}  // namespace

// Forward. q [B, Hq, Lq, D]; k, v [B, Hkv, Lk, D]; prefix_k, prefix_v [Hkv, P, D] (shared by
// the batch) or [B, Hkv, P, D]; key_padding_mask bool [B, Lk] (True = keep) or none; all
// contiguous, on one CUDA device, one dtype (fp32, fp16, bf16), D <= 128. Returns out
// [B, Hq, Lq, D] in q's dtype and the fp32 row log-sum-exp [B, Hq, Lq] (-inf, with out 0, for a
// row with no visible key).
std::tuple<at::Tensor, at::Tensor> prefix_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const std::optional<at::Tensor>& key_padding_mask, bool causal,
    double scale) {
  PrefixAttentionFwdParams prm{};
  prm.in = make_problem(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (lse.numel() == 0) return {out, lse};
  prm.out = out.data_ptr();
  prm.lse = lse.data_ptr<float>();

  const c10::cuda::CUDAGuard guard(q.device());
  check_launch(
      launch_prefix_attention_fwd(prm, c10::cuda::getCurrentCUDAStream(q.device().index())),
      "forward", prm.in, q);
  return {out, lse};
}

// Backward of prefix_attention_fwd_cuda from its out and lse. Returns dq, dk, dv (shapes of q,
// k, v) and dprefix_k, dprefix_v (the prefix's shape; summed over the batch when shared).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& prefix_k, const at::Tensor& prefix_v,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& out,
    const at::Tensor& lse, bool causal, double scale) {
  PrefixAttentionBwdParams prm{};
  prm.in = make_problem(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), kOp,
              ": grad_out and out must have q's shape ", q.sizes(), ", got ", grad_out.sizes(),
              " and ", out.sizes());
  // Autograd may hand over a non-contiguous (e.g. expanded) gradient.
  const at::Tensor dout = grad_out.contiguous();
  check_cuda_tensor(dout, q, kOp, "grad_out", "q");
  check_cuda_tensor(out, q, kOp, "out", "q");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.dim() == 3 &&
                  lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                  lse.size(2) == q.size(2) && lse.device() == q.device(),
              kOp, ": lse must be a contiguous fp32 [B, Hq, Lq] tensor on ", q.device(), ", got ",
              lse.scalar_type(), " ", lse.sizes(), " on ", lse.device());

  // dq, dk, dv: every element is written by the kernels. The prefix gradients are added into
  // zeroed fp32 buffers (directly into the result for fp32), then cast.
  at::Tensor dq = at::empty_like(q);
  at::Tensor dk = at::empty_like(k);
  at::Tensor dv = at::empty_like(v);
  const bool fp32 = q.scalar_type() == at::kFloat;
  at::Tensor dpk_acc = at::zeros(prefix_k.sizes(), q.options().dtype(at::kFloat));
  at::Tensor dpv_acc = at::zeros(prefix_v.sizes(), q.options().dtype(at::kFloat));
  at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));

  prm.grad_out = dout.const_data_ptr();
  prm.out = out.const_data_ptr();
  prm.lse = lse.const_data_ptr<float>();
  prm.delta = delta.data_ptr<float>();
  prm.dq = dq.data_ptr();
  prm.dk = dk.data_ptr();
  prm.dv = dv.data_ptr();
  prm.dprefix_k_acc = dpk_acc.data_ptr<float>();
  prm.dprefix_v_acc = dpv_acc.data_ptr<float>();

  const c10::cuda::CUDAGuard guard(q.device());
  check_launch(
      launch_prefix_attention_bwd(prm, c10::cuda::getCurrentCUDAStream(q.device().index())),
      "backward", prm.in, q);
  if (fp32) return {dq, dk, dv, dpk_acc, dpv_acc};
  return {dq, dk, dv, dpk_acc.to(q.scalar_type()), dpv_acc.to(q.scalar_type())};
}

}  // namespace deltakern
