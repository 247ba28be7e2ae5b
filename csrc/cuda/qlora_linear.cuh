// Launcher of the NF4 dequantisation kernel of qlora_linear (csrc/cuda/qlora_linear.cu).
// Framework-free: raw pointers and a cudaStream_t, so that the torch glue (qlora_linear_cuda.cpp)
// and the kernel compile apart.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "deltakern/dtype.h"

namespace deltakern {

// out[j] = the NF4 weight's flat element first + j (csrc/include/deltakern/nf4.h), j in
// [0, count), rounded to `dtype`:
//   packed  uint8 codes of the whole weight, two a byte, high nibble first
//   absmax  fp32 scales of the whole weight, one per blocksize elements
//   code    the 16 fp32 NF4 levels
//   out     count contiguous elements of `dtype` (a tile of whole rows of the [N, K] weight is
//           the flat range [n0 K, (n0 + rows) K))
// Every element of out is written; nothing else is. count == 0 launches nothing.
struct Nf4DequantizeParams {
  const uint8_t* packed;
  const float* absmax;
  const float* code;
  int64_t blocksize;
  int64_t first, count;
  void* out;
  DType dtype;
};

// The launch geometry: threads per block and blocks (capped; the kernel grid-strides over the
// rest). Each thread decodes one byte (two elements) per step.
struct Nf4DequantizeGeometry {
  int threads;
  int64_t blocks;
};
Nf4DequantizeGeometry nf4_dequantize_geometry(int64_t first, int64_t count);

// Returns the launch error (cudaGetLastError), or cudaErrorInvalidValue for an unknown dtype.
cudaError_t launch_nf4_dequantize(const Nf4DequantizeParams& params, cudaStream_t stream);

}  // namespace deltakern
