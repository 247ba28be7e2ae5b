// Plain parameter structs of ia3_linear's CUDA kernels: pointers, sizes and flags, no
// framework types, so the CUDA sources compile without torch headers. The GEMMs of the op run
// in cuBLAS through ATen (csrc/cuda/ia3_linear_cuda.cpp); these kernels apply the scale around
// them and reduce its gradient.
//
// Every tensor is row-major and contiguous, in `dtype` unless said otherwise; values are
// computed in fp32 and rounded once when stored.
#pragma once

#include <cstdint>

#include "deltakern/dtype.h"

namespace deltakern {

// One pass over [rows, cols]: dst[r, c] = src[r, c] · scale[c] (per_column, scale [cols]) or
// src[r, c] · scale[r] (scale [rows]). The forward's out = z ⊙ s and its operand folds x ⊙ s
// and W ⊙ s (columns), the backward's W ⊙ s (rows). dst must not overlap src or scale.
struct Ia3ScaleParams {
  const void* src;
  const void* scale;
  void* dst;
  int64_t rows, cols;
  bool per_column;
  DType dtype;
};

// Backward of an input scale, one pass over [M, K] after the GEMM g = dY W, which cuBLAS writes
// in fp32 for every dtype (so g is never rounded to fp16/bf16):
//   dx[m, k]      = g[m, k] · scale[k]
//   partial[j, k] = Σ g[m, k] · x[m, k] over the rows m of row group j (fp32, [groups, K]),
// with the row groups of column_sum_row_groups(M); dscale is the sum of partial over j. For
// fp32, dx may be g itself (updated in place).
struct Ia3InputGradParams {
  const float* g;
  const void* x;
  const void* scale;
  void* dx;
  float* partial;
  int64_t M, K;
  DType dtype;
};

// Backward of an output scale, one pass over [M, N]:
//   partial[j, n]      = Σ grad_out[m, n] · z[m, n] over the rows m of row group j (fp32,
//                        [groups, N]), z the unscaled projection
//   scaled_grad[m, n]  = grad_out[m, n] · scale[n]   when scaled_grad is not null (the GEMM
//                        operand of dx = (dY ⊙ s) W; scale is read only then)
struct Ia3OutputGradParams {
  const void* grad_out;
  const void* z;
  const void* scale;
  void* scaled_grad;  // may be nullptr
  float* partial;
  int64_t M, N;
  DType dtype;
};

}  // namespace deltakern
