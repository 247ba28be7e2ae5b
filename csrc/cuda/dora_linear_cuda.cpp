// Torch glue of dora_linear on CUDA: the device-neutral recipe of csrc/dora_linear.cpp (GEMMs in
// cuBLAS through ATen, lora_linear's CUDA dropout kernels) with the element-wise kernels of
// dora_linear.cu, launched on the current stream of the tensors' device. Compiled by the host
// compiler.
//
// The forward's drop(x) temporary holds row blocks of at most kDropBlockElements (4 Mi elements,
// 8 MiB in bf16): 512 rows of K = 8192, enough for the x̃ Wᵀ GEMM of a block to fill a GPU
// (estimated, no GPU here to measure), whatever the number of tokens.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cuda_runtime.h>

#include <optional>
#include <tuple>

#include "dora_linear.cuh"
#include "dora_linear.h"
#include "glue.h"
#include "lora_linear.h"

namespace deltakern {
namespace {

constexpr int64_t kDropBlockElements = int64_t{1} << 22;

// t is the tensor the kernel walks.
void check_launch(cudaError_t err, const char* kernel, const at::Tensor& t) {
  TORCH_CHECK(err == cudaSuccess, kDoraOp, " (cuda): CUDA kernel ", kernel, " failed for ", t.sizes(), ", dtype ",
              t.scalar_type(), ": ", cudaGetErrorString(err));
}

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()); }

// DoraKernels::scale_columns.
void scale_columns(const at::Tensor& z, const at::Tensor& scale, double shift, const std::optional<at::Tensor>& bias,
                   at::Tensor& y) {
  DoraScaleColumnsParams p{};
  p.z = z.const_data_ptr();
  p.scale = scale.const_data_ptr<float>();
  p.bias = bias.has_value() ? bias->const_data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.M = z.size(0);
  p.N = z.size(1);
  p.shift = static_cast<float>(shift);
  p.dtype = to_dtype(z, kDoraOp, "z");
  const c10::cuda::CUDAGuard guard(z.device());
  check_launch(launch_dora_scale_columns(p, stream_of(z)), "scale_columns", z);
}

// DoraKernels::scale_grad: the column-sum kernel when d_scale is wanted, else scale_columns.
at::Tensor scale_grad(const at::Tensor& grad_out, const at::Tensor& z, const at::Tensor& scale, double shift,
                      at::Tensor& g_scaled) {
  if (!z.defined()) {
    scale_columns(grad_out, scale, shift, std::nullopt, g_scaled);
    return at::Tensor();
  }
  const int64_t M = grad_out.size(0), N = grad_out.size(1);
  at::Tensor partial = at::empty({column_sum_row_groups(M), N}, grad_out.options().dtype(at::kFloat));
  DoraScaleGradParams p{};
  p.grad_out = grad_out.const_data_ptr();
  p.z = z.const_data_ptr();
  p.scale = scale.const_data_ptr<float>();
  p.g_scaled = g_scaled.data_ptr();
  p.partial = partial.data_ptr<float>();
  p.M = M;
  p.N = N;
  p.shift = static_cast<float>(shift);
  p.dtype = to_dtype(grad_out, kDoraOp, "grad_out");
  const c10::cuda::CUDAGuard guard(grad_out.device());
  check_launch(launch_dora_scale_grad(p, stream_of(grad_out)), "scale_grad", grad_out);
  // Summed over the row groups in a fixed order (at::sum): deterministic.
  return partial.sum(0);
}

// DoraKernels::drop_rows.
void drop_rows(const at::Tensor& x, int64_t row0, double dropout_p, int64_t seed, at::Tensor& out) {
  DoraDropRowsParams p{};
  p.x = x.const_data_ptr();
  p.out = out.data_ptr();
  p.row0 = row0;
  p.rows = out.size(0);
  p.K = x.size(1);
  p.dropout_p = static_cast<float>(dropout_p);
  p.keep_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  p.seed = static_cast<uint64_t>(seed);
  p.dtype = to_dtype(x, kDoraOp, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(launch_dora_drop_rows(p, stream_of(x)), "drop_rows", out);
}

// DoraKernels::mask_accumulate.
void mask_accumulate(const at::Tensor& x, at::Tensor& t, at::Tensor& dx, double dropout_p, int64_t seed) {
  at::assert_no_overlap(t, x);
  at::assert_no_overlap(dx, x);
  at::assert_no_overlap(dx, t);
  DoraMaskAccumulateParams p{};
  p.x = x.const_data_ptr();
  p.t = t.data_ptr();
  p.dx = dx.data_ptr();
  p.M = x.size(0);
  p.K = x.size(1);
  p.dropout_p = static_cast<float>(dropout_p);
  p.keep_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  p.seed = static_cast<uint64_t>(seed);
  p.dtype = to_dtype(x, kDoraOp, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(launch_dora_mask_accumulate(p, stream_of(x)), "mask_accumulate", x);
}

const DoraKernels& kernels() {
  static const DoraKernels k{&scale_columns, &scale_grad, &drop_rows, &mask_accumulate, kDropBlockElements,
                             &lora_dropout_kernels_cuda()};
  return k;
}

// The CUDA-specific checks of a direct call: CUDA tensors of a dtype the kernels take.
void check_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), kDoraOp, ": expected CUDA tensors, got x on ", x.device());
  to_dtype(x, kDoraOp, "x");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> dora_linear_fwd_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& scale, double scaling, double dropout_p, const at::Tensor& seed,
    bool save_z) {
  check_dora_fwd_args(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed);
  check_cuda(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const std::optional<at::Tensor> b = bias.has_value() ? std::optional(bias->contiguous()) : std::nullopt;
  return dora_linear_fwd_gemms(x, weight, b, lora_A, lora_B, scale.contiguous(), scaling, dropout_p, seed, save_z,
                               kernels());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& scale, const at::Tensor& xa, const at::Tensor& z, double scaling,
    double dropout_p, const at::Tensor& seed) {
  check_dora_bwd_args(grad_out, x, weight, lora_A, lora_B, scale, xa, z, dropout_p, seed);
  check_cuda(x);
  const c10::cuda::CUDAGuard guard(x.device());
  return dora_linear_bwd_gemms(grad_out, x, weight, lora_A, lora_B, scale.contiguous(), xa, z, scaling, dropout_p,
                               seed, kernels());
}

}  // namespace deltakern
