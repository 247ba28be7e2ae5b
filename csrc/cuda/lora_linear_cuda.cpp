// Torch glue of the CUDA kernels of lora_linear's dropout parts: checks the tensors, fills
// the framework-free params structs and launches on the current stream of the tensors'
// device; and lora_linear's CUDA entry points: the device-neutral decomposition
// (csrc/lora_linear.cpp), GEMMs in cuBLAS through ATen, with these dropout kernels. Compiled by
// the host compiler; the kernels are in lora_linear.cu.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cuda_runtime.h>

#include <optional>
#include <tuple>

#include "glue.h"
#include "lora_linear.cuh"
#include "lora_linear.h"

namespace deltakern {
namespace {

// dropout_p == 1 would need an infinite keep_scale (and tl.rand's uniform can reach 1.0, so a few
// elements would be "kept"): dropping everything is the caller's job.
void check_dropout_p(double dropout_p, const char* op) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
}

// LoraDropoutKernels::shrink.
void dropout_shrink(const at::Tensor& x, const at::Tensor& lora_A, double dropout_p, int64_t seed, at::Tensor& xa) {
  constexpr const char* op = "deltakern.lora_dropout_shrink_cuda";
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got ", x.sizes());
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(1) == x.size(1), op,
              ": lora_A must be [R, K] with K = ", x.size(1), ", got ", lora_A.sizes());
  TORCH_CHECK(xa.dim() == 2 && xa.size(0) == x.size(0) && xa.size(1) == lora_A.size(0), op,
              ": xa must be [M, R] = [", x.size(0), ", ", lora_A.size(0), "], got ", xa.sizes());
  check_cuda_tensor(x, x, op, "x", "x");
  check_cuda_tensor(lora_A, x, op, "lora_A", "x");
  check_cuda_tensor(xa, x, op, "xa", "x");
  check_dropout_p(dropout_p, op);
  at::assert_no_overlap(xa, x);
  at::assert_no_overlap(xa, lora_A);

  LoraShrinkParams params{};
  params.x = x.data_ptr();
  params.lora_A = lora_A.data_ptr();
  params.xa = xa.data_ptr();
  params.M = x.size(0);
  params.K = x.size(1);
  params.R = lora_A.size(0);
  params.dropout_p = static_cast<float>(dropout_p);
  params.keep_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  params.seed = static_cast<uint64_t>(seed);
  params.dtype = to_dtype(x, op, "x");
  if (params.M == 0 || params.R == 0) return;
  if (params.K == 0) {  // an empty sum
    xa.zero_();
    return;
  }

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t err =
      launch_lora_dropout_shrink(params, c10::cuda::getCurrentCUDAStream(x.device().index()));
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed for M=", params.M,
              ", K=", params.K, ", R=", params.R, ", dtype ", x.scalar_type(), ": ",
              cudaGetErrorString(err));
}

// The dropout pass of the backward: dx_lowrank <- dx_lowrank ⊙ mask / (1 - dropout_p) in place and
// x_dropped <- drop(x).
void dropout_backward_pass(const at::Tensor& x, at::Tensor& dx_lowrank, at::Tensor& x_dropped, double dropout_p,
                           int64_t seed) {
  constexpr const char* op = "deltakern.lora_dropout_backward_cuda";
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got ", x.sizes());
  TORCH_CHECK(dx_lowrank.sizes() == x.sizes(), op, ": dx_lowrank must have x's shape ",
              x.sizes(), ", got ", dx_lowrank.sizes());
  TORCH_CHECK(x_dropped.sizes() == x.sizes(), op, ": x_dropped must have x's shape ", x.sizes(),
              ", got ", x_dropped.sizes());
  check_cuda_tensor(x, x, op, "x", "x");
  check_cuda_tensor(dx_lowrank, x, op, "dx_lowrank", "x");
  check_cuda_tensor(x_dropped, x, op, "x_dropped", "x");
  check_dropout_p(dropout_p, op);
  at::assert_no_overlap(dx_lowrank, x);
  at::assert_no_overlap(x_dropped, x);
  at::assert_no_overlap(x_dropped, dx_lowrank);

  LoraDropoutBackwardParams params{};
  params.x = x.data_ptr();
  params.dx_lowrank = dx_lowrank.data_ptr();
  params.x_dropped = x_dropped.data_ptr();
  params.M = x.size(0);
  params.K = x.size(1);
  params.dropout_p = static_cast<float>(dropout_p);
  params.keep_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  params.seed = static_cast<uint64_t>(seed);
  params.dtype = to_dtype(x, op, "x");
  if (params.M == 0 || params.K == 0) return;

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t err =
      launch_lora_dropout_backward(params, c10::cuda::getCurrentCUDAStream(x.device().index()));
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed for M=", params.M,
              ", K=", params.K, ", dtype ", x.scalar_type(), ": ", cudaGetErrorString(err));
}

// LoraDropoutKernels::lowrank_backward: the low-rank term from cuBLAS, masked in place by one
// element-wise kernel that also writes drop(x) for the dA GEMM.
void dropout_lowrank_backward(const at::Tensor& x, const at::Tensor& dxa, const at::Tensor& lora_A, double dropout_p,
                              int64_t seed, at::Tensor& dx, at::Tensor& d_lora_A) {
  at::mm_out(dx, dxa, lora_A);
  at::Tensor x_dropped = at::empty_like(x);
  dropout_backward_pass(x, dx, x_dropped, dropout_p, seed);
  at::mm_out(d_lora_A, dxa.t(), x_dropped);
}

constexpr LoraDropoutKernels kDropout{&dropout_shrink, &dropout_lowrank_backward};

}  // namespace

const LoraDropoutKernels& lora_dropout_kernels_cuda() { return kDropout; }

std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias,
                                                        const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                        double scaling, double dropout_p, const at::Tensor& seed) {
  return lora_linear_fwd_gemms(x, weight.size(0), bias, lora_A, lora_B, scaling, dropout_p, seed,
                               dense_base_gemms(weight), kDropout);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scaling, double dropout_p, const at::Tensor& seed) {
  return lora_linear_bwd_gemms(grad_out, x, lora_A, lora_B, xa, scaling, dropout_p, seed, dense_base_gemms(weight),
                               kDropout);
}

}  // namespace deltakern
