// Torch glue of segmented_lora_linear's CUDA kernels (the row gather and scatter-add of
// segmented_lora_linear.cu): checks, params, the current stream; and the op's CUDA entry points:
// the device-neutral decomposition (csrc/segmented_lora_linear.cpp), GEMMs in cuBLAS through
// ATen, with lora_linear's CUDA dropout kernels. Compiled by the host compiler.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cuda_runtime.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../segmented_lora_linear.h"
#include "glue.h"
#include "segmented_lora_linear.cuh"

namespace deltakern {
namespace {

constexpr const char* kOp = "deltakern.segmented_lora_linear_cuda";

// src [n, C] or [M, C] and dst the other; rows [n] int64 on their device.
SegmentRowsParams row_params(const at::Tensor& src, const at::Tensor& rows, at::Tensor& dst, int64_t n, double alpha) {
  check_cuda_tensor(src, src, kOp, "src", "src");
  check_cuda_tensor(dst, src, kOp, "dst", "src");
  TORCH_CHECK(rows.is_cuda() && rows.device() == src.device() && rows.scalar_type() == at::kLong &&
                  rows.is_contiguous() && rows.dim() == 1 && rows.size(0) == n,
              kOp, ": rows must be a contiguous int64 [", n, "] tensor on ", src.device());
  TORCH_CHECK(src.dim() == 2 && dst.dim() == 2 && src.size(1) == dst.size(1), kOp,
              ": src and dst must be 2-D with equal columns, got ", src.sizes(), " and ", dst.sizes());
  SegmentRowsParams p{};
  p.src = src.data_ptr();
  p.dst = dst.data_ptr();
  p.rows = rows.data_ptr<int64_t>();
  p.n = n;
  p.cols = src.size(1);
  p.alpha = static_cast<float>(alpha);
  p.dtype = to_dtype(src, kOp, "src");
  return p;
}

void check_launch(cudaError_t err, const SegmentRowsParams& p, const char* what) {
  TORCH_CHECK(err == cudaSuccess, kOp, ": ", what, " launch failed for n=", p.n, ", cols=", p.cols, ": ",
              cudaGetErrorString(err));
}

void gather_rows(const at::Tensor& src, const at::Tensor& rows, at::Tensor& dst) {
  TORCH_CHECK(dst.dim() == 2 && dst.size(0) == rows.size(0), kOp, ": dst must have one row per index");
  const SegmentRowsParams p = row_params(src, rows, dst, rows.size(0), 1.0);
  const c10::cuda::CUDAGuard guard(src.device());
  check_launch(launch_gather_rows(p, c10::cuda::getCurrentCUDAStream(src.device().index())), p, "gather");
}

void scatter_add_rows(const at::Tensor& src, const at::Tensor& rows, double alpha, at::Tensor& dst) {
  TORCH_CHECK(src.dim() == 2 && src.size(0) == rows.size(0), kOp, ": src must have one row per index");
  const SegmentRowsParams p = row_params(src, rows, dst, rows.size(0), alpha);
  const c10::cuda::CUDAGuard guard(src.device());
  check_launch(launch_scatter_add_rows(p, c10::cuda::getCurrentCUDAStream(src.device().index())), p, "scatter-add");
}

constexpr SegmentRowKernels kRows{&gather_rows, &scatter_add_rows};

}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>> segmented_lora_linear_fwd_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::TensorList lora_A,
    at::TensorList lora_B, at::ArrayRef<double> scalings, at::ArrayRef<double> dropout_p, const at::Tensor& order,
    at::IntArrayRef offsets, const at::Tensor& seeds) {
  return segmented_lora_linear_fwd_gemms(x, weight, bias, lora_A, lora_B, scalings, dropout_p, order, offsets, seeds,
                                         lora_dropout_kernels_cuda(), kRows);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> segmented_lora_linear_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, at::TensorList lora_A,
    at::TensorList lora_B, at::TensorList xa, at::ArrayRef<double> scalings, at::ArrayRef<double> dropout_p,
    const at::Tensor& order, at::IntArrayRef offsets, const at::Tensor& seeds) {
  return segmented_lora_linear_bwd_gemms(grad_out, x, weight, lora_A, lora_B, xa, scalings, dropout_p, order, offsets,
                                         seeds, lora_dropout_kernels_cuda(), kRows);
}

}  // namespace deltakern
