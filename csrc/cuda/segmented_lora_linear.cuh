// Launchers of segmented_lora_linear's CUDA kernels (csrc/cuda/segmented_lora_linear.cu): the
// row gather and scatter-add around an adapter's cuBLAS GEMMs. Framework-free: raw pointers and
// a cudaStream_t, so the torch glue (segmented_lora_linear_cuda.cpp) and the kernels compile
// apart. Each returns the launch error (cudaGetLastError), or cudaErrorInvalidValue for an
// unknown dtype; n == 0 or cols == 0 launches nothing.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "deltakern/dtype.h"

namespace deltakern {

// The rows of one segment: rows[j] (int64, distinct, in [0, M)) for j in [0, n).
//   gather:       dst[j, c] = src[rows[j], c]
//   scatter-add:  dst[rows[j], c] += alpha * src[j, c]   (in fp32, rounded once to dtype)
// src and dst row-major and contiguous with `cols` columns, in `dtype`; they do not overlap.
struct SegmentRowsParams {
  const void* src;
  void* dst;
  const int64_t* rows;
  int64_t n, cols;
  float alpha;
  DType dtype;
};

// Blocks of the two kernels: columns over x (kSegmentRowsThreads threads per block), rows over
// y, each capped at kSegmentRowsMaxBlocks and grid-strided beyond.
constexpr int kSegmentRowsThreads = 256;
constexpr int64_t kSegmentRowsMaxBlocks = 65535;
struct SegmentRowsGeometry {
  int64_t blocks_x, blocks_y;
};
SegmentRowsGeometry segment_rows_geometry(int64_t n, int64_t cols);

cudaError_t launch_gather_rows(const SegmentRowsParams& params, cudaStream_t stream);
cudaError_t launch_scatter_add_rows(const SegmentRowsParams& params, cudaStream_t stream);

}  // namespace deltakern
