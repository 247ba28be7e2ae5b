// Launchers of the adapter's CUDA element-wise kernels (csrc/cuda/adapter.cu). Framework-free:
// raw pointers in the params structs of deltakern/adapter_params.h and a cudaStream_t, so that
// the torch glue (adapter_cuda.cpp, which runs the GEMMs in cuBLAS through ATen) and the
// kernels compile apart. Each returns the launch error (cudaGetLastError), or
// cudaErrorInvalidValue for an unknown dtype or activation; empty extents launch nothing.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "deltakern/adapter_params.h"
#include "row_groups.h"

namespace deltakern {

// The column sums (AdapterDpreParams, AdapterColsumParams) use the row groups of row_groups.h:
// the caller allocates partial as [column_sum_row_groups(M), columns] fp32 and sums it over the
// groups.

// out = residual + scale · b_up (broadcast over rows); see AdapterInitParams.
cudaError_t launch_adapter_init(const AdapterInitParams& params, cudaStream_t stream);

// a = act(pre); see AdapterActivationParams.
cudaError_t launch_adapter_activation(const AdapterActivationParams& params, cudaStream_t stream);

// a_s = s·act(pre), dpre = s·dz·act'(pre), per-group column sums of dpre; see AdapterDpreParams.
cudaError_t launch_adapter_dpre(const AdapterDpreParams& params, cudaStream_t stream);

// Per-group column sums of grad_out, and its copy when asked; see AdapterColsumParams.
cudaError_t launch_adapter_colsum(const AdapterColsumParams& params, cudaStream_t stream);

}  // namespace deltakern
