// Per-row-group column sums over an element-wise pass on [M, cols] (a bias or scale gradient
// summed over the rows while the pass writes its other outputs), with the launch scaffolding of
// element-wise kernels (lanes, grid geometry, dtype dispatch). Included by .cu files only; raw
// pointers and a stream, no torch header.
//
// Column sums: a block owns 32 columns x one row group (row_groups.h); its 8 warps walk the
// group's rows (warp w takes rows w, w + 8, ...), so every warp access is 32 consecutive elements
// of one row; the 8 per-thread sums meet in shared memory and one fp32 partial per (group,
// column) is stored. The caller sums the partials over the groups (deterministic: no atomics).
//
// What a kernel does to each element is its Op:
//   float op.column(j)  what the elements of column j share, loaded once per column tile rather
//                       than once per row (the op's stores may alias its loads, so the compiler
//                       would not hoist the load out of the row walk);
//   float op(i, c)      element i = m * cols + j, given c = op.column(j): reads and writes what
//                       the pass needs and returns the element's term of the column sum.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "convert.cuh"
#include "deltakern/dtype.h"
#include "row_groups.h"

// The row walk of the column sums is unrolled twice. Left to nvcc (which unrolls it 4 times or
// more), ptxas held the ops' gelu_tanh instantiations at 32 registers and spilled 12 bytes to
// local memory on sm_80 (unrolled 4 times: 5 kernels spilled); twice or not at all, nothing
// spills. More would not overlap the rows' memory accesses: as the op's stores may alias its
// loads, each row's loads are issued after the previous row's stores.
#if defined(__CUDA_ARCH__)
#define DK_COLUMN_SUM_UNROLL _Pragma("unroll 2")
#else
#define DK_COLUMN_SUM_UNROLL
#endif

namespace deltakern {
namespace column_sum {

constexpr int kThreads = 256;
constexpr int kColTile = 32;
constexpr int kRowLanes = kThreads / kColTile;
// Grids are capped here and the kernels grid-stride over the rest; 65535 blocks of 256 threads
// are many waves on any current GPU.
constexpr int64_t kMaxBlocks = 65535;

// What a kernel body reads of blockIdx, gridDim and threadIdx. The bodies are __host__ __device__
// so that a host program can include the .cu files and run them with threads standing in for the
// lanes (no GPU needed to check their index math).
struct Lane {
  int64_t block_x, block_y, grid_x, grid_y;
  int tid;
};

#if defined(__CUDA_ARCH__)
__device__ __forceinline__ Lane this_lane() {
  return Lane{blockIdx.x, blockIdx.y, gridDim.x, gridDim.y, static_cast<int>(threadIdx.x)};
}
#endif

// __syncthreads on the GPU; the host harness passes its own (a barrier of the block's threads).
struct DeviceSync {
  DELTAKERN_HD void block() const {
#if defined(__CUDA_ARCH__)
    __syncthreads();
#endif
  }
};

// Launch geometry, shared by the launchers and a host harness. The divisions of the index
// space are done here, on the host: a 64-bit division is a called subroutine on the GPU (it
// cost 8 bytes of stack in the kernels that had one).
struct Geometry {
  int64_t grid_x, grid_y;
};

// Column sums: column tiles of kColTile over gridDim.x, row groups over gridDim.y.
struct ColumnGeometry {
  int64_t group_rows, groups, col_tiles;
  Geometry grid;
};

inline ColumnGeometry column_geometry(int64_t M, int64_t cols) {
  ColumnGeometry g;
  g.group_rows = column_sum_group_rows(M);
  g.groups = ceil_div(M, g.group_rows);
  g.col_tiles = ceil_div(cols, kColTile);
  g.grid = {std::min(g.col_tiles, kMaxBlocks), std::min(g.groups, kMaxBlocks)};
  return g;
}

// partial[g, j] = Σ op(m * cols + j, op.column(j)) over the rows m of group g (see the file
// comment); sums is the block's shared [kRowLanes][kColTile + 1] buffer.
template <typename Sync, typename Op>
DELTAKERN_HD void column_sum_body(const Lane& l, const Sync& sync, float (*sums)[kColTile + 1], const Op& op,
                                  float* partial, int64_t M, int64_t cols, int64_t group_rows, int64_t groups,
                                  int64_t col_tiles) {
  const int tx = l.tid % kColTile;
  const int ty = l.tid / kColTile;
  // Block-uniform bounds: every thread reaches the syncs.
  for (int64_t tile = l.block_x; tile < col_tiles; tile += l.grid_x) {
    const int64_t j = tile * kColTile + tx;
    const float c = j < cols ? op.column(j) : 0.f;
    for (int64_t g = l.block_y; g < groups; g += l.grid_y) {
      const int64_t row_end = min64(M, (g + 1) * group_rows);
      float acc = 0.f;
      if (j < cols) {
        DK_COLUMN_SUM_UNROLL
        for (int64_t m = g * group_rows + ty; m < row_end; m += kRowLanes) acc += op(m * cols + j, c);
      }
      sync.block();  // the previous group's readers of sums are done
      sums[ty][tx] = acc;
      sync.block();
      if (ty == 0 && j < cols) {
        float total = 0.f;
        for (int k = 0; k < kRowLanes; ++k) total += sums[k][tx];
        partial[g * cols + j] = total;
      }
    }
  }
}

template <typename Op>
__global__ void __launch_bounds__(kThreads)
    column_sum_kernel(Op op, float* __restrict__ partial, int64_t M, int64_t cols, int64_t group_rows,
                      int64_t groups, int64_t col_tiles) {
#if defined(__CUDA_ARCH__)
  __shared__ float sums[kRowLanes][kColTile + 1];
  column_sum_body(this_lane(), DeviceSync{}, sums, op, partial, M, cols, group_rows, groups, col_tiles);
#endif
}

inline dim3 to_dim3(const Geometry& g) {
  return dim3(static_cast<unsigned>(g.grid_x), static_cast<unsigned>(g.grid_y));
}

template <typename Op>
cudaError_t launch_column_sum(const Op& op, float* partial, int64_t M, int64_t cols, cudaStream_t stream) {
  const ColumnGeometry g = column_geometry(M, cols);
  column_sum_kernel<<<to_dim3(g.grid), kThreads, 0, stream>>>(op, partial, M, cols, g.group_rows, g.groups,
                                                              g.col_tiles);
  return cudaGetLastError();
}

// Calls f(T{}) with the storage type of dtype.
template <typename F>
cudaError_t with_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace column_sum
}  // namespace deltakern
