// segmented_lora_linear's CPU entry points: the device-neutral decomposition
// (csrc/segmented_lora_linear.cpp) with lora_linear's CPU dropout kernels and ATen's row
// gather/scatter (index_select / index_add_, already vectorised and parallel on the CPU).
#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../segmented_lora_linear.h"

namespace deltakern {
namespace {

void gather_rows(const at::Tensor& src, const at::Tensor& rows, at::Tensor& dst) {
  at::index_select_out(dst, src, 0, rows);
}

void scatter_add_rows(const at::Tensor& src, const at::Tensor& rows, double alpha, at::Tensor& dst) {
  dst.index_add_(0, rows, src, alpha);
}

constexpr SegmentRowKernels kRows{&gather_rows, &scatter_add_rows};

}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>> segmented_lora_linear_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::TensorList lora_A,
    at::TensorList lora_B, at::ArrayRef<double> scalings, at::ArrayRef<double> dropout_p, const at::Tensor& order,
    at::IntArrayRef offsets, const at::Tensor& seeds) {
  return segmented_lora_linear_fwd_gemms(x, weight, bias, lora_A, lora_B, scalings, dropout_p, order, offsets, seeds,
                                         lora_dropout_kernels_cpu(), kRows);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> segmented_lora_linear_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, at::TensorList lora_A,
    at::TensorList lora_B, at::TensorList xa, at::ArrayRef<double> scalings, at::ArrayRef<double> dropout_p,
    const at::Tensor& order, at::IntArrayRef offsets, const at::Tensor& seeds) {
  return segmented_lora_linear_bwd_gemms(grad_out, x, weight, lora_A, lora_B, xa, scalings, dropout_p, order, offsets,
                                         seeds, lora_dropout_kernels_cpu(), kRows);
}

}  // namespace deltakern
