// Plain parameter structs of the adapter's CUDA element-wise kernels: pointers, sizes and
// scalars, no framework types, so the CUDA sources compile without torch headers. The GEMMs
// of the op run in cuBLAS through ATen (csrc/cuda/adapter_cuda.cpp); these kernels are the
// passes around them.
//
// Every tensor is row-major and contiguous, in `dtype` unless said otherwise; values are
// computed in fp32 and rounded once when stored.
#pragma once

#include <cstdint>

#include "deltakern/activations.h"  // Activation
#include "deltakern/dtype.h"

namespace deltakern {

// Forward, before the up GEMM accumulates s · a w_upᵀ into out:
//   out[m, j] = residual[m, j] + scale · b_up[j]           residual, out [M, d]; b_up [d] or null
struct AdapterInitParams {
  const void* residual;
  const void* b_up;  // may be nullptr: out = residual
  void* out;
  int64_t M, d;
  float scale;
  DType dtype;
};

// Forward: a[i] = act(pre[i]) for the n elements of pre [M, r].
struct AdapterActivationParams {
  const void* pre;
  void* a;
  int64_t n;
  Activation act;
  DType dtype;
};

// Backward, one pass over [M, r] after the GEMM dz = dOut w_up, which cuBLAS writes in fp32
// for every dtype (so dz is never rounded to fp16/bf16):
//   a_s[m, j]  = scale · act(pre[m, j])
//   dpre[m, j] = scale · dz[m, j] · act'(pre[m, j])
//   partial[g, j] = Σ dpre[m, j] (unrounded) over the rows m of row group g (fp32, [groups, r]),
// with the row groups of column_sum_row_groups(M); db_down is the sum of partial over g. For
// fp32, dz may be dpre itself (updated in place).
struct AdapterDpreParams {
  const void* pre;
  const float* dz;
  void* dpre;
  void* a_s;
  float* partial;
  int64_t M, r;
  float scale;
  Activation act;
  DType dtype;
};

// Backward, one pass over grad_out [M, d]:
//   partial[g, j] = Σ grad_out[m, j] over the rows m of row group g (fp32, [groups, d])
//   copy[m, j] = grad_out[m, j]   when copy is not null (dh's residual term when the residual is h)
struct AdapterColsumParams {
  const void* src;
  void* copy;  // may be nullptr
  float* partial;
  int64_t M, d;
  DType dtype;
};

}  // namespace deltakern
