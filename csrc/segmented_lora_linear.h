// Entry points of segmented_lora_linear: many LoRA adapters in one batch, one base GEMM over all
// rows and per adapter a shrink/expand over that adapter's rows (its segment of `order`). The
// forward and backward are one device-neutral decomposition (csrc/segmented_lora_linear.cpp);
// each device passes lora_linear's dropout kernels and its own row gather/scatter.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "lora_linear.h"

namespace deltakern {

// A device's row movers, on contiguous 2-D tensors of one dtype; rows is a contiguous int64
// [n] tensor of distinct row numbers on the tensors' device.
struct SegmentRowKernels {
  // dst [n, C] <- src[rows] (src [M, C]; dst preallocated).
  void (*gather)(const at::Tensor& src, const at::Tensor& rows, at::Tensor& dst);
  // dst[rows] += alpha * src (src [n, C], dst [M, C]).
  void (*scatter_add)(const at::Tensor& src, const at::Tensor& rows, double alpha, at::Tensor& dst);
};

// The decomposition. x [M, K]; weight [N, K] (any strides); bias [N] or none; adapter i has
// lora_A[i] [r_i, K], lora_B[i] [N, r_i], scalings[i], dropout_p[i] and seeds[i] (seeds: int64 CPU
// [n]); its rows are order[offsets[i]:offsets[i+1]] (order int64 on x's device, offsets n+1
// ascending ints from 0). Forward returns (out [M, N], xa) with xa[i] = drop_i(x_i) A_iᵀ
// [M_i, r_i]; backward returns (dx [M, K], dA, dB), zeros for an adapter without rows.
std::tuple<at::Tensor, std::vector<at::Tensor>> segmented_lora_linear_fwd_gemms(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::TensorList lora_A, at::TensorList lora_B, at::ArrayRef<double> scalings, at::ArrayRef<double> dropout_p,
    const at::Tensor& order, at::IntArrayRef offsets, const at::Tensor& seeds, const LoraDropoutKernels& dropout,
    const SegmentRowKernels& rows);
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> segmented_lora_linear_bwd_gemms(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, at::TensorList lora_A,
    at::TensorList lora_B, at::TensorList xa, at::ArrayRef<double> scalings, at::ArrayRef<double> dropout_p,
    const at::Tensor& order, at::IntArrayRef offsets, const at::Tensor& seeds, const LoraDropoutKernels& dropout,
    const SegmentRowKernels& rows);

std::tuple<at::Tensor, std::vector<at::Tensor>> segmented_lora_linear_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::TensorList lora_A,
    at::TensorList lora_B, at::ArrayRef<double> scalings, at::ArrayRef<double> dropout_p, const at::Tensor& order,
    at::IntArrayRef offsets, const at::Tensor& seeds);
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> segmented_lora_linear_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, at::TensorList lora_A,
    at::TensorList lora_B, at::TensorList xa, at::ArrayRef<double> scalings, at::ArrayRef<double> dropout_p,
    const at::Tensor& order, at::IntArrayRef offsets, const at::Tensor& seeds);

#ifdef DELTAKERN_WITH_CUDA
std::tuple<at::Tensor, std::vector<at::Tensor>> segmented_lora_linear_fwd_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::TensorList lora_A,
    at::TensorList lora_B, at::ArrayRef<double> scalings, at::ArrayRef<double> dropout_p, const at::Tensor& order,
    at::IntArrayRef offsets, const at::Tensor& seeds);
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> segmented_lora_linear_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, at::TensorList lora_A,
    at::TensorList lora_B, at::TensorList xa, at::ArrayRef<double> scalings, at::ArrayRef<double> dropout_p,
    const at::Tensor& order, at::IntArrayRef offsets, const at::Tensor& seeds);
#endif

}  // namespace deltakern
