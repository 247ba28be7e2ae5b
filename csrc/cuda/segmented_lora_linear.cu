// CUDA kernels of segmented_lora_linear: the gather of an adapter's rows before its cuBLAS GEMMs
// and the scatter-add of its low-rank output after them (the GEMMs run in
// segmented_lora_linear_cuda.cpp). Raw pointers and a stream only, no torch header. The rows of a
// segment are distinct, so no two threads write one element and no atomics are needed. All
// index math is 64-bit.
//
// The kernels are wrappers around __host__ __device__ bodies that take their block and lane
// numbers as arguments, so tests/csrc/segment_rows_cuda_host.cu runs the same bodies on the CPU.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "column_sum.cuh"
#include "convert.cuh"
#include "segmented_lora_linear.cuh"

namespace deltakern {
namespace segment_rows_kernels {  // named so a host harness can reach it

// One lane's share: rows from row0 in steps of row_step, columns from col0 in steps of col_step.
template <typename T>
DELTAKERN_HD void gather_body(const SegmentRowsParams& p, int64_t row0, int64_t row_step, int64_t col0,
                              int64_t col_step) {
  const T* src = static_cast<const T*>(p.src);
  T* dst = static_cast<T*>(p.dst);
  for (int64_t j = row0; j < p.n; j += row_step) {
    const T* src_row = src + p.rows[j] * p.cols;
    T* dst_row = dst + j * p.cols;
    for (int64_t c = col0; c < p.cols; c += col_step) dst_row[c] = src_row[c];
  }
}

template <typename T>
DELTAKERN_HD void scatter_add_body(const SegmentRowsParams& p, int64_t row0, int64_t row_step, int64_t col0,
                                   int64_t col_step) {
  const T* src = static_cast<const T*>(p.src);
  T* dst = static_cast<T*>(p.dst);
  for (int64_t j = row0; j < p.n; j += row_step) {
    const T* src_row = src + j * p.cols;
    T* dst_row = dst + p.rows[j] * p.cols;
    for (int64_t c = col0; c < p.cols; c += col_step) {
      dst_row[c] = from_float<T>(to_float(dst_row[c]) + p.alpha * to_float(src_row[c]));
    }
  }
}

namespace {

template <typename T>
__global__ void gather_rows_kernel(SegmentRowsParams p) {
  gather_body<T>(p, blockIdx.y, gridDim.y, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                 static_cast<int64_t>(gridDim.x) * blockDim.x);
}

template <typename T>
__global__ void scatter_add_rows_kernel(SegmentRowsParams p) {
  scatter_add_body<T>(p, blockIdx.y, gridDim.y, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                      static_cast<int64_t>(gridDim.x) * blockDim.x);
}

}  // namespace
}  // namespace segment_rows_kernels

SegmentRowsGeometry segment_rows_geometry(int64_t n, int64_t cols) {
  return {std::min(ceil_div(cols, kSegmentRowsThreads), kSegmentRowsMaxBlocks), std::min(n, kSegmentRowsMaxBlocks)};
}

namespace {

template <template <typename> class Launch>
cudaError_t launch(const SegmentRowsParams& params, cudaStream_t stream) {
  if (params.n == 0 || params.cols == 0) return cudaSuccess;
  const SegmentRowsGeometry g = segment_rows_geometry(params.n, params.cols);
  const dim3 grid(static_cast<unsigned>(g.blocks_x), static_cast<unsigned>(g.blocks_y));
  return column_sum::with_type(params.dtype, [&](auto zero) {
    Launch<decltype(zero)>::run(grid, params, stream);
    return cudaGetLastError();
  });
}

template <typename T>
struct GatherLaunch {
  static void run(dim3 grid, const SegmentRowsParams& p, cudaStream_t stream) {
    segment_rows_kernels::gather_rows_kernel<T><<<grid, kSegmentRowsThreads, 0, stream>>>(p);
  }
};

template <typename T>
struct ScatterAddLaunch {
  static void run(dim3 grid, const SegmentRowsParams& p, cudaStream_t stream) {
    segment_rows_kernels::scatter_add_rows_kernel<T><<<grid, kSegmentRowsThreads, 0, stream>>>(p);
  }
};

}  // namespace

cudaError_t launch_gather_rows(const SegmentRowsParams& params, cudaStream_t stream) {
  return launch<GatherLaunch>(params, stream);
}

cudaError_t launch_scatter_add_rows(const SegmentRowsParams& params, cudaStream_t stream) {
  return launch<ScatterAddLaunch>(params, stream);
}

}  // namespace deltakern
