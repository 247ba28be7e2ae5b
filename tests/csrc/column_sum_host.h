// The host harness of the CUDA column-sum kernels (csrc/cuda/column_sum.cuh) shared by the
// tests/csrc/*_cuda_host.cu files: include it after the .cu sources under test. One block is
// kThreads std::threads with __syncthreads as a std::barrier; see elementwise_cuda_host.cu.
#pragma once

#include <barrier>
#include <cstdint>
#include <limits>
#include <thread>
#include <vector>

namespace deltakern {
namespace host_harness {

using column_sum::kColTile;
using column_sum::kRowLanes;
using column_sum::kThreads;
using column_sum::Lane;

// __syncthreads of the emulated block. __host__ __device__ only so that nvcc's device pass
// accepts the call from the __host__ __device__ body; nothing on the device uses it.
struct BarrierSync {
  std::barrier<>* barrier;
  __host__ __device__ void block() const {
#if !defined(__CUDA_ARCH__)
    barrier->arrive_and_wait();
#endif
  }
};

// The __shared__ float sums[kRowLanes][kColTile + 1] of one block.
struct SharedSums {
  float v[kRowLanes][kColTile + 1];
};

// column_sum_kernel<<<dim3(grid_x, grid_y), kThreads>>>(op, partial, M, cols, geometry) with
// the geometry of launch_column_sum (column_geometry) and the caller's grid.
template <typename Op>
void column_sum_host(const Op& op, float* partial, int64_t M, int64_t cols, int64_t grid_x, int64_t grid_y) {
  const column_sum::ColumnGeometry g = column_sum::column_geometry(M, cols);
  SharedSums nan_sums;
  for (auto& row : nan_sums.v) {
    for (float& v : row) v = std::numeric_limits<float>::quiet_NaN();
  }
  std::vector<SharedSums> shared(static_cast<size_t>(grid_x * grid_y), nan_sums);
  std::barrier<> barrier(kThreads);
  const BarrierSync sync{&barrier};
  std::vector<std::thread> threads;
  threads.reserve(kThreads);
  for (int tid = 0; tid < kThreads; ++tid) {
    threads.emplace_back([&, tid] {
      for (int64_t by = 0; by < grid_y; ++by) {
        for (int64_t bx = 0; bx < grid_x; ++bx) {
          column_sum::column_sum_body(Lane{bx, by, grid_x, grid_y, tid}, sync,
                                      shared[static_cast<size_t>(by * grid_x + bx)].v, op, partial, M, cols,
                                      g.group_rows, g.groups, g.col_tiles);
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
}

// A sync-free body over the grid: body(lane) for every lane of every block, one after another.
template <typename Body>
void lanes_host(int64_t grid_x, int64_t grid_y, Body body) {
  for (int64_t by = 0; by < grid_y; ++by) {
    for (int64_t bx = 0; bx < grid_x; ++bx) {
      for (int tid = 0; tid < kThreads; ++tid) body(Lane{bx, by, grid_x, grid_y, tid});
    }
  }
}

// f(T{}) for dtype (0 fp32, 1 fp16, 2 bf16): 0, or 1 for an unknown dtype or a grid without
// blocks.
template <typename F>
int with_dtype(int dtype, int64_t grid_x, int64_t grid_y, F&& f) {
  if (grid_x < 1 || grid_y < 1) return 1;
  const cudaError_t err = column_sum::with_type(static_cast<DType>(dtype), [&](auto zero) {
    f(zero);
    return cudaSuccess;
  });
  return err == cudaSuccess ? 0 : 1;
}

}  // namespace host_harness
}  // namespace deltakern
