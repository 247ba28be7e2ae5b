// Launchers of ia3_linear's CUDA kernels (csrc/cuda/ia3_linear.cu). Framework-free: raw
// pointers in the params structs of deltakern/ia3_params.h and a cudaStream_t, so that the
// torch glue (ia3_linear_cuda.cpp, which runs the GEMMs in cuBLAS through ATen) and the kernels
// compile apart. Each returns the launch error (cudaGetLastError), or cudaErrorInvalidValue for
// an unknown dtype; empty extents launch nothing.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "deltakern/ia3_params.h"
#include "row_groups.h"

namespace deltakern {

// The scale gradient (Ia3InputGradParams, Ia3OutputGradParams) uses the row groups of
// row_groups.h: the caller allocates partial as [column_sum_row_groups(M), columns] fp32 and
// sums it over the groups.

// dst = src scaled per column or per row; see Ia3ScaleParams. Four elements per access when
// cols % 4 == 0 and the pointers are 4-element aligned, one otherwise.
cudaError_t launch_ia3_scale(const Ia3ScaleParams& params, cudaStream_t stream);

// dx = g ⊙ scale and the per-group column sums of g ⊙ x; see Ia3InputGradParams.
cudaError_t launch_ia3_input_grad(const Ia3InputGradParams& params, cudaStream_t stream);

// Per-group column sums of grad_out ⊙ z, and grad_out ⊙ scale when asked; see
// Ia3OutputGradParams.
cudaError_t launch_ia3_output_grad(const Ia3OutputGradParams& params, cudaStream_t stream);

}  // namespace deltakern
