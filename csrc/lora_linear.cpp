// lora_linear forward and backward as one device-neutral decomposition: the low-rank GEMMs go
// through ATen (MKL/oneDNN on CPU, cuBLAS on CUDA), the base GEMMs through the LoraBaseGemms
// the caller passes (ATen on the dense weight here, accumulating into the output with beta = 1),
// the dropout parts through the fused kernels the device's entry point passes in (csrc/cpu,
// csrc/cuda).
//
// Inputs arrive 2-D and validated by deltakern/ops/lora_linear.py; the checks here only guard
// direct calls of torch.ops.deltakern.*.
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "lora_linear.h"

namespace deltakern {
namespace {

void check_2d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "deltakern.lora_linear: ", name, " must be 2-D, got ", t.dim(), "-D");
}

int64_t read_seed(const at::Tensor& seed) {
  TORCH_CHECK(seed.device().is_cpu() && seed.scalar_type() == at::kLong && seed.numel() == 1,
              "deltakern.lora_linear: seed must be a one-element int64 CPU tensor");
  return seed.item<int64_t>();
}

}  // namespace

LoraBaseGemms dense_base_gemms(const at::Tensor& weight) {
  return {[weight](const at::Tensor& x, at::Tensor& out) { out.addmm_(x, weight.t()); },
          [weight](const at::Tensor& grad_out, at::Tensor& dx) { dx.addmm_(grad_out, weight); }};
}

std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_gemms(const at::Tensor& x_in, int64_t out_features,
                                                         const std::optional<at::Tensor>& bias,
                                                         const at::Tensor& lora_A_in, const at::Tensor& lora_B,
                                                         double scaling, double dropout_p,
                                                         const at::Tensor& seed_tensor, const LoraBaseGemms& base,
                                                         const LoraDropoutKernels& dropout) {
  check_2d(x_in, "x");
  check_2d(lora_A_in, "lora_A");
  const int64_t seed = read_seed(seed_tensor);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor lora_A = lora_A_in.contiguous();
  at::Tensor xa;
  if (dropout_p > 0.0) {
    xa = at::empty({x.size(0), lora_A.size(0)}, x.options());
    dropout.shrink(x, lora_A, dropout_p, seed, xa);
  } else {
    xa = at::mm(x, lora_A.t());
  }
  // b + s * xa B^T first, then the base GEMM accumulates into it with beta = 1: the GEMM reads
  // each output tile as it writes it, instead of a second pass over [M, N] afterwards.
  at::Tensor out;
  if (bias.has_value()) {
    out = at::addmm(*bias, xa, lora_B.t(), /*beta=*/1.0, /*alpha=*/scaling);
  } else {
    out = at::empty({x.size(0), out_features}, x.options());
    out.addmm_(xa, lora_B.t(), /*beta=*/0.0, /*alpha=*/scaling);
  }
  base.forward(x, out);
  return {out, xa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_gemms(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& xa, double scaling, double dropout_p, const at::Tensor& seed_tensor,
    const LoraBaseGemms& base, const LoraDropoutKernels& dropout) {
  check_2d(grad_out_in, "grad_out");
  check_2d(x_in, "x");
  const int64_t seed = read_seed(seed_tensor);
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  at::Tensor dxa = at::mm(grad_out, lora_B);
  dxa.mul_(scaling);
  // dB as (xa^T dY)^T: MKL runs this orientation in 0.63 ms against 1.0 ms for dY^T xa
  // (M=2048, N=1024, r=16, fp32); the transposing copy of [N, r] is negligible.
  at::Tensor dB = at::mm(xa.t(), grad_out).mul_(scaling).t().contiguous();
  // dx starts as the (masked) low-rank term, then the base GEMM adds dY W with beta = 1.
  at::Tensor dx;
  at::Tensor dA;
  if (dropout_p > 0.0) {
    dx = at::empty_like(x);
    dA = at::empty(lora_A.sizes(), lora_A.options());
    dropout.lowrank_backward(x, dxa, lora_A.contiguous(), dropout_p, seed, dx, dA);
  } else {
    dA = at::mm(dxa.t(), x);
    dx = at::mm(dxa, lora_A);
  }
  base.backward(grad_out, dx);
  return {dx, dA, dB};
}

}  // namespace deltakern
