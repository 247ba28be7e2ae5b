// Host emulation of segmented_lora_linear's CUDA row kernels (csrc/cuda/segmented_lora_linear.cu),
// for machines without a GPU. Built by tests/csrc/test_segment_rows_cuda_host.py with
//   nvcc -O2 -std=c++20 -shared -Xcompiler -fPIC -Icsrc/include -Icsrc/cuda ...
// and driven through ctypes. It includes the very source the GPU build compiles and runs the
// kernels' __host__ __device__ bodies lane by lane (no sync, no shared memory), with each lane's
// block and thread numbers as the kernels compute them from the caller's grid.
#include <cstdint>

#include "../../csrc/cuda/segmented_lora_linear.cu"

using namespace deltakern;

namespace {

// body(row0, row_step, col0, col_step) for every lane of grid (grid_x, grid_y) of
// kSegmentRowsThreads threads, as the kernels call it; 0, or 1 for an unknown dtype or no blocks.
template <template <typename> class Body>
int run_lanes(const SegmentRowsParams& p, int64_t grid_x, int64_t grid_y) {
  if (grid_x < 1 || grid_y < 1) return 1;
  const cudaError_t err = column_sum::with_type(p.dtype, [&](auto zero) {
    for (int64_t by = 0; by < grid_y; ++by) {
      for (int64_t lane = 0; lane < grid_x * kSegmentRowsThreads; ++lane) {
        Body<decltype(zero)>::run(p, by, grid_y, lane, grid_x * kSegmentRowsThreads);
      }
    }
    return cudaSuccess;
  });
  return err == cudaSuccess ? 0 : 1;
}

template <typename T>
struct Gather {
  static void run(const SegmentRowsParams& p, int64_t r, int64_t rs, int64_t c, int64_t cs) {
    segment_rows_kernels::gather_body<T>(p, r, rs, c, cs);
  }
};

template <typename T>
struct ScatterAdd {
  static void run(const SegmentRowsParams& p, int64_t r, int64_t rs, int64_t c, int64_t cs) {
    segment_rows_kernels::scatter_add_body<T>(p, r, rs, c, cs);
  }
};

SegmentRowsParams params(int dtype, const void* src, void* dst, const int64_t* rows, int64_t n, int64_t cols,
                         float alpha) {
  return {src, dst, rows, n, cols, alpha, static_cast<DType>(dtype)};
}

}  // namespace

// The launchers' grid: {blocks_x, blocks_y}.
extern "C" void dk_rows_host_geometry(int64_t n, int64_t cols, int64_t* out) {
  const SegmentRowsGeometry g = segment_rows_geometry(n, cols);
  out[0] = g.blocks_x;
  out[1] = g.blocks_y;
}

extern "C" int dk_rows_host_gather(int dtype, const void* src, const int64_t* rows, void* dst, int64_t n, int64_t cols,
                                   int64_t grid_x, int64_t grid_y) {
  return run_lanes<Gather>(params(dtype, src, dst, rows, n, cols, 1.0f), grid_x, grid_y);
}

extern "C" int dk_rows_host_scatter_add(int dtype, const void* src, const int64_t* rows, float alpha, void* dst,
                                        int64_t n, int64_t cols, int64_t grid_x, int64_t grid_y) {
  return run_lanes<ScatterAdd>(params(dtype, src, dst, rows, n, cols, alpha), grid_x, grid_y);
}
