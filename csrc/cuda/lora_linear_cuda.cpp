// Torch glue of the CUDA kernels of lora_linear's dropout parts: checks the tensors, fills
// the framework-free params structs and launches on the current stream of the tensors'
// device. Compiled by the host compiler; the kernels are in lora_linear.cu.
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cuda_runtime.h>

#include "glue.h"
#include "kernels.h"
#include "lora_linear.cuh"

namespace deltakern {
namespace {

// p == 1 would need an infinite keep_scale (and tl.rand's uniform can reach 1.0, so a few
// elements would be "kept"): dropping everything is the caller's job.
void check_p(double p, const char* op) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": dropout p must be in [0, 1), got ", p);
}

}  // namespace

void lora_dropout_shrink_cuda(const at::Tensor& x, const at::Tensor& lora_A, double p,
                              int64_t seed, at::Tensor& xa) {
  constexpr const char* op = "deltakern.lora_dropout_shrink_cuda";
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got ", x.sizes());
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(1) == x.size(1), op,
              ": lora_A must be [R, K] with K = ", x.size(1), ", got ", lora_A.sizes());
  TORCH_CHECK(xa.dim() == 2 && xa.size(0) == x.size(0) && xa.size(1) == lora_A.size(0), op,
              ": xa must be [M, R] = [", x.size(0), ", ", lora_A.size(0), "], got ", xa.sizes());
  check_cuda_tensor(x, x, op, "x", "x");
  check_cuda_tensor(lora_A, x, op, "lora_A", "x");
  check_cuda_tensor(xa, x, op, "xa", "x");
  check_p(p, op);
  at::assert_no_overlap(xa, x);
  at::assert_no_overlap(xa, lora_A);

  LoraShrinkParams params{};
  params.x = x.data_ptr();
  params.lora_A = lora_A.data_ptr();
  params.xa = xa.data_ptr();
  params.M = x.size(0);
  params.K = x.size(1);
  params.R = lora_A.size(0);
  params.p = static_cast<float>(p);
  params.keep_scale = static_cast<float>(1.0 / (1.0 - p));
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

void lora_dropout_backward_cuda(const at::Tensor& x, at::Tensor& dx_lowrank,
                                at::Tensor& x_dropped, double p, int64_t seed) {
  constexpr const char* op = "deltakern.lora_dropout_backward_cuda";
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got ", x.sizes());
  TORCH_CHECK(dx_lowrank.sizes() == x.sizes(), op, ": dx_lowrank must have x's shape ",
              x.sizes(), ", got ", dx_lowrank.sizes());
  TORCH_CHECK(x_dropped.sizes() == x.sizes(), op, ": x_dropped must have x's shape ", x.sizes(),
              ", got ", x_dropped.sizes());
  check_cuda_tensor(x, x, op, "x", "x");
  check_cuda_tensor(dx_lowrank, x, op, "dx_lowrank", "x");
  check_cuda_tensor(x_dropped, x, op, "x_dropped", "x");
  check_p(p, op);
  at::assert_no_overlap(dx_lowrank, x);
  at::assert_no_overlap(x_dropped, x);
  at::assert_no_overlap(x_dropped, dx_lowrank);

  LoraDropoutBackwardParams params{};
  params.x = x.data_ptr();
  params.dx_lowrank = dx_lowrank.data_ptr();
  params.x_dropped = x_dropped.data_ptr();
  params.M = x.size(0);
  params.K = x.size(1);
  params.p = static_cast<float>(p);
  params.keep_scale = static_cast<float>(1.0 / (1.0 - p));
  params.seed = static_cast<uint64_t>(seed);
  params.dtype = to_dtype(x, op, "x");
  if (params.M == 0 || params.K == 0) return;

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t err =
      launch_lora_dropout_backward(params, c10::cuda::getCurrentCUDAStream(x.device().index()));
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed for M=", params.M,
              ", K=", params.K, ", dtype ", x.scalar_type(), ": ", cudaGetErrorString(err));
}

}  // namespace deltakern
