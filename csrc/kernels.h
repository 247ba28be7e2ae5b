// Torch-level entry points of the device-specific kernels. The device-neutral GEMM
// decomposition (csrc/lora_linear.cpp) calls these; csrc/cpu/ and csrc/cuda/ define them.
#pragma once

#include <ATen/core/Tensor.h>

namespace deltakern {

// xa[M, R] = drop(x) @ lora_A^T without materialising drop(x). x [M, K], lora_A [R, K],
// xa [M, R] preallocated, all contiguous and of one dtype.
void lora_dropout_shrink_cpu(const at::Tensor& x, const at::Tensor& lora_A, double p,
                             int64_t seed, at::Tensor& xa);
// The low-rank part of the backward with dropout, in row blocks that stay in cache:
//   dx [M, K] <- mask * (dxa @ lora_A) / (1 - p)      dA [R, K] <- dxa^T @ drop(x)
// x [M, K], dxa [M, R], lora_A [R, K] contiguous; dx and dA preallocated.
void lora_dropout_lowrank_backward_cpu(const at::Tensor& x, const at::Tensor& dxa,
                                       const at::Tensor& lora_A, double p, int64_t seed,
                                       at::Tensor& dx, at::Tensor& d_lora_A);

// Bool [rows, cols] keep-mask of the dropout of (seed, p): exposes philox.h to the tests.
at::Tensor dropout_keep_mask_cpu(int64_t rows, int64_t cols, double p, int64_t seed);

#ifdef DELTAKERN_WITH_CUDA
void lora_dropout_shrink_cuda(const at::Tensor& x, const at::Tensor& lora_A, double p,
                              int64_t seed, at::Tensor& xa);
void lora_dropout_backward_cuda(const at::Tensor& x, at::Tensor& dx_lowrank,
                                at::Tensor& x_dropped, double p, int64_t seed);
#endif

}  // namespace deltakern
