// Parameter structs and launchers of dora_linear's CUDA element-wise kernels
// (csrc/cuda/dora_linear.cu). Framework-free: raw pointers, sizes and a cudaStream_t, so that the
// torch glue (dora_linear_cuda.cpp, which runs the GEMMs in cuBLAS through ATen) and the kernels
// compile apart. Every tensor is row-major and contiguous, in `dtype` unless said otherwise;
// values are computed in fp32 and rounded once when stored. Each launcher returns the launch error
// (cudaGetLastError), or cudaErrorInvalidValue for an unknown dtype; empty extents launch nothing.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "deltakern/dtype.h"
#include "row_groups.h"

namespace deltakern {

// y[m, n] = (scale[n] − shift) · z[m, n] + bias[n] over [M, N]: the forward's epilogue
// (c ⊙ z + b without dropout, (c − 1) ⊙ z + b with it), and the backward's g ⊙ (c − shift) when
// no d_scale is wanted. scale is fp32 [N]; bias [N] may be null; y may be z itself (in place).
struct DoraScaleColumnsParams {
  const void* z;
  const float* scale;
  const void* bias;
  void* y;
  int64_t M, N;
  float shift;
  DType dtype;
};

// Backward pass over [M, N] when d_scale is wanted, with the row groups of row_groups.h:
//   g_scaled[m, n] = (scale[n] − shift) · grad_out[m, n]
//   partial[j, n]  = Σ grad_out[m, n] · z[m, n] over the rows m of row group j (fp32,
//                    [column_sum_row_groups(M), N]); d_scale is the sum of partial over j.
struct DoraScaleGradParams {
  const void* grad_out;
  const void* z;
  const float* scale;
  void* g_scaled;
  float* partial;
  int64_t M, N;
  float shift;
  DType dtype;
};

// The dropout mask of philox.h: element e of the flattened [M, K] x is kept when lane e % 4 of
// philox4x32_10(seed, e / 4) passes dropout_keep(bits, dropout_p); a kept element is multiplied
// by keep_scale = 1 / (1 − dropout_p), a dropped one by 0 (a product, so NaN and inf propagate as
// in the reference x * mask / (1 − p)).
//
// out[i, k] = drop(x)[row0 + i, k] for the rows row0 .. row0 + rows − 1 of x [M, K] (x points at
// the whole x; out is [rows, K]): the forward's row blocks of x̃.
struct DoraDropRowsParams {
  const void* x;
  void* out;
  int64_t row0, rows, K;
  float dropout_p, keep_scale;
  uint64_t seed;
  DType dtype;
};

// One pass over [M, K] with f = keep(m, k) ? keep_scale : 0:
//   dx[m, k] = dx[m, k] + f · t[m, k]   (in place)
//   t[m, k]  = f · x[m, k]              (in place: t becomes x̃)
// x, t and dx pairwise non-overlapping.
struct DoraMaskAccumulateParams {
  const void* x;
  void* t;
  void* dx;
  int64_t M, K;
  float dropout_p, keep_scale;
  uint64_t seed;
  DType dtype;
};

cudaError_t launch_dora_scale_columns(const DoraScaleColumnsParams& params, cudaStream_t stream);
cudaError_t launch_dora_scale_grad(const DoraScaleGradParams& params, cudaStream_t stream);
cudaError_t launch_dora_drop_rows(const DoraDropRowsParams& params, cudaStream_t stream);
cudaError_t launch_dora_mask_accumulate(const DoraMaskAccumulateParams& params, cudaStream_t stream);

}  // namespace deltakern
