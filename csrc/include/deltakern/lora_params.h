// Plain parameter structs of the LoRA dropout kernels: pointers, sizes and scalars, no
// framework types, so the CUDA sources compile without torch headers.
#pragma once

#include <cstdint>

#include "deltakern/dtype.h"

namespace deltakern {

// xa[M, R] = drop(x)[M, K] @ lora_A[R, K]^T, accumulated in fp32 and stored in `dtype`.
// x, lora_A and xa are row-major and contiguous. drop() multiplies element e = m * K + k by
// keep_scale = 1 / (1 - dropout_p) when philox.h keeps it and by 0 when it drops it (a product, not a
// select, so NaN and inf propagate as in the reference x * mask / (1 - dropout_p)).
struct LoraShrinkParams {
  const void* x;
  const void* lora_A;
  void* xa;
  int64_t M, K, R;
  float dropout_p;
  float keep_scale;
  uint64_t seed;
  DType dtype;
};

// The dropout part of the LoRA backward, one pass over [M, K], with f = keep(m, k) ? keep_scale : 0:
//   dx_lowrank[m, k] = dx_lowrank[m, k] * f   (in place)
//   x_dropped[m, k]  = x[m, k] * f
// All three are row-major and contiguous, in `dtype`.
struct LoraDropoutBackwardParams {
  const void* x;
  void* dx_lowrank;
  void* x_dropped;
  int64_t M, K;
  float dropout_p;
  float keep_scale;
  uint64_t seed;
  DType dtype;
};

}  // namespace deltakern
