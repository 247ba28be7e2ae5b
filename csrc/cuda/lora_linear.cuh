// Launchers of the CUDA kernels of lora_linear's dropout parts (csrc/cuda/lora_linear.cu).
// Framework-free: raw pointers in the params structs of deltakern/lora_params.h and a
// cudaStream_t, so that the torch glue (lora_linear_cuda.cpp) and the kernels compile apart.
#pragma once

#include <cuda_runtime.h>

#include "deltakern/lora_params.h"

namespace deltakern {

// Dropout-fused LoRA shrink: xa[M, R] = drop(x)[M, K] @ lora_A[R, K]^T.
//   x       [M, K]  row-major, contiguous, params.dtype
//   lora_A  [R, K]  row-major, contiguous, params.dtype
//   xa      [M, R]  row-major, contiguous, params.dtype; every element is written
// drop() keeps element e = m * K + k when lane e % 4 of philox4x32_10(seed, e / 4) passes
// dropout_keep(bits, p), and multiplies elements by keep_scale (kept) or 0 (dropped, so NaN
// and inf propagate as in the reference x * mask / (1 - p)); drop(x) is never
// materialised. Accumulates in fp32. K == 0 writes zeros; M == 0 or R == 0 launches nothing.
// Returns the launch error (cudaGetLastError), or cudaErrorInvalidValue for an unknown dtype.
cudaError_t launch_lora_dropout_shrink(const LoraShrinkParams& params, cudaStream_t stream);

// Dropout part of the LoRA backward, one elementwise pass over the M * K elements:
//   dx_lowrank [M, K]  in place: dx_lowrank * (keep ? keep_scale : 0)
//   x_dropped  [M, K]  out:      x * (keep ? keep_scale : 0)
//   x          [M, K]  in
// with the keep mask of launch_lora_dropout_shrink (same seed, p and element numbering).
// All contiguous, params.dtype, pairwise non-overlapping. M * K == 0 launches nothing.
// Returns the launch error (cudaGetLastError), or cudaErrorInvalidValue for an unknown dtype.
cudaError_t launch_lora_dropout_backward(const LoraDropoutBackwardParams& params,
                                         cudaStream_t stream);

}  // namespace deltakern
