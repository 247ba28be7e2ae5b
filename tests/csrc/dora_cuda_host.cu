// Host emulation of dora_linear's CUDA element-wise kernels (csrc/cuda/dora_linear.cu), for
// machines without a GPU. Built by tests/csrc/test_dora_cuda_host.py with
//   nvcc -O2 -std=c++20 -shared -Xcompiler -fPIC -Icsrc/include -Icsrc/cuda ...
// and driven through ctypes.
//
// The kernels are thin wrappers around __host__ __device__ bodies that read blockIdx, gridDim
// and threadIdx only through a column_sum::Lane. This file includes the very source the GPU
// build compiles and runs those bodies with explicit lanes:
//   scale grad   column_sum_body with ScaleGradOp: one block is kThreads (256) std::threads and
//                __syncthreads is a std::barrier of them; the threads walk the grid's blocks in
//                the same order (the body's syncs are block-uniform, so the barrier's phases line
//                up block by block). Each block has its own shared sums, NaN before the launch.
//   scale columns, drop rows, mask accumulate   (no sync, no shared memory): lanes one after
//                another.
// The grid is the caller's, so a test can pass a grid smaller than the problem and make the
// bodies grid-stride; the launchers' geometry functions are exported too.
#include <barrier>
#include <cstdint>
#include <limits>
#include <thread>
#include <vector>

#include "../../csrc/cuda/dora_linear.cu"
#include "column_sum_host.h"

// ---------------------------------------------------------------------------------------
// C entry points. Tensors are contiguous and row-major, in the layouts of dora_linear.cuh; dtype
// is deltakern::DType (0 fp32, 1 fp16, 2 bf16). (grid_x, grid_y) is the emulated gridDim. Return
// 0, or 1 (nothing written) for an unknown dtype or an empty grid.

using namespace deltakern;
using namespace deltakern::host_harness;

// launch_dora_scale_columns's grid: {grid_x, grid_y}.
extern "C" void dk_dora_host_rows_geometry(int64_t M, int64_t N, int64_t* out) {
  const column_sum::Geometry g = dora_kernels::rows_geometry(M, N);
  out[0] = g.grid_x;
  out[1] = g.grid_y;
}

// launch_dora_scale_grad's grid (launch_column_sum's): {grid_x, grid_y}.
extern "C" void dk_dora_host_column_grid(int64_t M, int64_t N, int64_t* out) {
  const column_sum::ColumnGeometry g = column_sum::column_geometry(M, N);
  out[0] = g.grid.grid_x;
  out[1] = g.grid.grid_y;
}

// The counter groups and grid of the dropout kernels over the elements [begin, end):
// {first_group, last_group, grid_x, grid_y}.
extern "C" void dk_dora_host_group_range(int64_t begin, int64_t end, int64_t* out) {
  const dora_kernels::GroupRange r = dora_kernels::group_range(begin, end);
  out[0] = r.first_group;
  out[1] = r.last_group;
  out[2] = r.grid.grid_x;
  out[3] = r.grid.grid_y;
}

// DoraScaleColumnsParams: y = (scale − shift) ⊙ z + bias (bias may be null; y may be z).
extern "C" int dk_dora_host_scale_columns(int dtype, const void* z, const float* scale, float shift, const void* bias,
                                          void* y, int64_t M, int64_t N, int64_t grid_x, int64_t grid_y) {
  return with_dtype(dtype, grid_x, grid_y, [&](auto zero) {
    using T = decltype(zero);
    lanes_host(grid_x, grid_y, [&](const Lane& l) {
      dora_kernels::scale_columns_body(l, static_cast<const T*>(z), scale, shift, static_cast<const T*>(bias),
                                       static_cast<T*>(y), M, N);
    });
  });
}

// DoraScaleGradParams: g_scaled = (scale − shift) ⊙ grad_out, partial [groups, N] of grad_out ⊙ z.
extern "C" int dk_dora_host_scale_grad(int dtype, const void* grad_out, const void* z, const float* scale, float shift,
                                       void* g_scaled, float* partial, int64_t M, int64_t N, int64_t grid_x,
                                       int64_t grid_y) {
  return with_dtype(dtype, grid_x, grid_y, [&](auto zero) {
    using T = decltype(zero);
    const dora_kernels::ScaleGradOp<T> op{static_cast<const T*>(grad_out), static_cast<const T*>(z), scale, shift,
                                          static_cast<T*>(g_scaled)};
    column_sum_host(op, partial, M, N, grid_x, grid_y);
  });
}

// DoraDropRowsParams: out [rows, K] = rows row0 .. row0 + rows − 1 of drop(x), x the whole [M, K];
// the counter groups of launch_dora_drop_rows, over grid_x blocks.
extern "C" int dk_dora_host_drop_rows(int dtype, const void* x, void* out, int64_t row0, int64_t rows, int64_t K,
                                      float dropout_p, float keep_scale, uint64_t seed, int64_t grid_x) {
  const int64_t begin = row0 * K, end = (row0 + rows) * K;
  const dora_kernels::GroupRange range = dora_kernels::group_range(begin, end);
  return with_dtype(dtype, grid_x, 1, [&](auto zero) {
    using T = decltype(zero);
    lanes_host(grid_x, 1, [&](const Lane& l) {
      dora_kernels::drop_rows_body(l, static_cast<const T*>(x), static_cast<T*>(out), begin, end, range, dropout_p,
                                   keep_scale, seed);
    });
  });
}

// DoraMaskAccumulateParams: dx += mask ⊙ t · keep_scale, t = mask ⊙ x · keep_scale over [M, K];
// the counter groups of launch_dora_mask_accumulate, over grid_x blocks.
extern "C" int dk_dora_host_mask_accumulate(int dtype, const void* x, void* t, void* dx, int64_t M, int64_t K,
                                            float dropout_p, float keep_scale, uint64_t seed, int64_t grid_x) {
  const int64_t n = M * K;
  const dora_kernels::GroupRange range = dora_kernels::group_range(0, n);
  return with_dtype(dtype, grid_x, 1, [&](auto zero) {
    using T = decltype(zero);
    lanes_host(grid_x, 1, [&](const Lane& l) {
      dora_kernels::mask_accumulate_body(l, static_cast<const T*>(x), static_cast<T*>(t), static_cast<T*>(dx), n,
                                         range, dropout_p, keep_scale, seed);
    });
  });
}
