// Plain parameter structs of the LoRA dropout kernels: pointers, sizes and scalars, no
// framework types, so the CUDA sources compile without torch headers.
#pragma once

#include <cstdint>

namespace deltakern {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// xa[M, R] = drop(x)[M, K] @ lora_A[R, K]^T, accumulated in fp32 and stored in `dtype`.
// x, lora_A and xa are row-major and contiguous. drop() keeps element e = m * K + k per
// philox.h and multiplies kept elements by keep_scale = 1 / (1 - p).
struct LoraShrinkParams {
  const void* x;
  const void* lora_A;
  void* xa;
  int64_t M, K, R;
  float p;
  float keep_scale;
  uint64_t seed;
  DType dtype;
};

// The dropout part of the LoRA backward, one pass over [M, K]:
//   dx_lowrank[m, k] = keep(m, k) ? dx_lowrank[m, k] * keep_scale : 0   (in place)
//   x_dropped[m, k]  = keep(m, k) ? x[m, k] * keep_scale : 0
// All three are row-major and contiguous, in `dtype`.
struct LoraDropoutBackwardParams {
  const void* x;
  void* dx_lowrank;
  void* x_dropped;
  int64_t M, K;
  float p;
  float keep_scale;
  uint64_t seed;
  DType dtype;
};

}  // namespace deltakern
