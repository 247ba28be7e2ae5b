// Host emulation of the element-wise CUDA kernels of adapter.cu and ia3_linear.cu, for
// machines without a GPU. Built by tests/csrc/test_elementwise_cuda_host.py with
//   nvcc -O2 -std=c++20 -shared -Xcompiler -fPIC -Icsrc/include -Icsrc/cuda ...
// and driven through ctypes.
//
// The kernels are thin wrappers around __host__ __device__ bodies that read blockIdx, gridDim
// and threadIdx only through a column_sum::Lane. This file includes the very sources the GPU
// build compiles and runs those bodies with explicit lanes:
//   column sums  column_sum_body with each op (adapter DpreOp for every activation, ColsumOp;
//                ia3 InputGradOp, OutputGradOp): one block is kThreads (256) std::threads and
//                __syncthreads is a std::barrier of them. The threads are started once per
//                launch and walk the grid's blocks in the same order; as the syncs of the body
//                are block-uniform, every thread arrives at the barrier equally often in each
//                block, so its phases line up block by block (a thread may start the next
//                block while others finish this one, as co-resident blocks would). Each block
//                has its own shared sums, NaN before the launch: a sum read before any lane
//                stored it shows as NaN in partial.
//   init, activation, scale   (no sync, no shared memory): lanes run one after another.
// The grid is the caller's, not the launchers' geometry, so a test can pass a grid smaller
// than the problem and make the bodies grid-stride; the geometry functions are exported too.
#include <barrier>
#include <cstdint>
#include <limits>
#include <thread>
#include <vector>

#include "../../csrc/cuda/adapter.cu"
#include "../../csrc/cuda/ia3_linear.cu"
#include "column_sum_host.h"

namespace deltakern {
namespace elementwise_host {
namespace {

using namespace host_harness;

// f(T{}, act) for dtype and the activation code act; 1 for an unknown code.
template <typename F>
int with_dtype_and_activation(int dtype, int act, int64_t grid_x, int64_t grid_y, F&& f) {
  if (!is_activation_code(act)) return 1;
  return with_dtype(dtype, grid_x, grid_y, [&](auto zero) {
    dispatch_activation(static_cast<Activation>(act), [&](auto kact) { f(zero, kact); });
  });
}

}  // namespace
}  // namespace elementwise_host
}  // namespace deltakern

// ---------------------------------------------------------------------------------------
// C entry points. Tensors are contiguous and row-major, in the layouts of adapter_params.h
// and ia3_params.h; dtype is deltakern::DType (0 fp32, 1 fp16, 2 bf16), act the activation
// code of activations.h. (grid_x, grid_y) is the emulated gridDim. Return 0, or 1 (nothing
// written) for an unknown dtype or activation, an empty grid, or a pack width other than 1 and
// 4 or not dividing cols.

using namespace deltakern;
using namespace deltakern::elementwise_host;

// The geometry of launch_column_sum: {group_rows, groups, col_tiles, grid_x, grid_y}.
extern "C" void dk_ew_host_column_geometry(int64_t M, int64_t cols, int64_t* out) {
  const column_sum::ColumnGeometry g = column_sum::column_geometry(M, cols);
  const int64_t values[5] = {g.group_rows, g.groups, g.col_tiles, g.grid.grid_x, g.grid.grid_y};
  for (int k = 0; k < 5; ++k) out[k] = values[k];
}

// row_groups.h's rule, as the torch glue uses it to allocate partial.
extern "C" int64_t dk_ew_host_row_groups(int64_t M) { return column_sum_row_groups(M); }

// The grids of launch_adapter_init, launch_adapter_activation and launch_scale: {grid_x, grid_y}.
extern "C" void dk_ew_host_adapter_init_geometry(int64_t M, int64_t d, int64_t* out) {
  const column_sum::Geometry g = adapter_kernels::init_geometry(M, d);
  out[0] = g.grid_x;
  out[1] = g.grid_y;
}
extern "C" void dk_ew_host_adapter_flat_geometry(int64_t n, int64_t* out) {
  const column_sum::Geometry g = adapter_kernels::flat_geometry(n);
  out[0] = g.grid_x;
  out[1] = g.grid_y;
}
extern "C" void dk_ew_host_ia3_scale_geometry(int64_t rows, int64_t packs, int64_t* out) {
  const column_sum::Geometry g = ia3_kernels::scale_geometry(rows, packs);
  out[0] = g.grid_x;
  out[1] = g.grid_y;
}

// launch_ia3_scale's alignment test of a pointer for dtype (1 aligned, 0 not, -1 bad dtype).
extern "C" int dk_ew_host_ia3_pack_aligned(const void* ptr, int dtype) {
  int aligned = -1;
  column_sum::with_type(static_cast<DType>(dtype), [&](auto zero) {
    aligned = ia3_kernels::pack_aligned<decltype(zero)>(ptr);
    return cudaSuccess;
  });
  return aligned;
}

// AdapterDpreParams: a_s = s·act(pre), dpre = s·dz·act'(pre), partial [groups, r].
extern "C" int dk_ew_host_adapter_dpre(int dtype, int act, const void* pre, const float* dz, void* dpre,
                                       void* a_s, float scale, float* partial, int64_t M, int64_t r,
                                       int64_t grid_x, int64_t grid_y) {
  return with_dtype_and_activation(dtype, act, grid_x, grid_y, [&](auto zero, auto kact) {
    using T = decltype(zero);
    const adapter_kernels::DpreOp<decltype(kact)::value, T> op{static_cast<const T*>(pre), dz,
                                                              static_cast<T*>(dpre), static_cast<T*>(a_s), scale};
    column_sum_host(op, partial, M, r, grid_x, grid_y);
  });
}

// AdapterColsumParams: partial [groups, d] of src, and copy = src when copy is not null.
extern "C" int dk_ew_host_adapter_colsum(int dtype, const void* src, void* copy, float* partial, int64_t M,
                                         int64_t d, int64_t grid_x, int64_t grid_y) {
  return with_dtype(dtype, grid_x, grid_y, [&](auto zero) {
    using T = decltype(zero);
    const adapter_kernels::ColsumOp<T> op{static_cast<const T*>(src), static_cast<T*>(copy)};
    column_sum_host(op, partial, M, d, grid_x, grid_y);
  });
}

// Ia3InputGradParams: dx = g ⊙ scale, partial [groups, K] of g ⊙ x.
extern "C" int dk_ew_host_ia3_input_grad(int dtype, const float* g, const void* x, const void* scale, void* dx,
                                         float* partial, int64_t M, int64_t K, int64_t grid_x, int64_t grid_y) {
  return with_dtype(dtype, grid_x, grid_y, [&](auto zero) {
    using T = decltype(zero);
    const ia3_kernels::InputGradOp<T> op{g, static_cast<const T*>(x), static_cast<const T*>(scale),
                                         static_cast<T*>(dx)};
    column_sum_host(op, partial, M, K, grid_x, grid_y);
  });
}

// Ia3OutputGradParams: partial [groups, N] of grad_out ⊙ z, scaled_grad = grad_out ⊙ scale
// when scaled_grad is not null.
extern "C" int dk_ew_host_ia3_output_grad(int dtype, const void* grad_out, const void* z, const void* scale,
                                          void* scaled_grad, float* partial, int64_t M, int64_t N,
                                          int64_t grid_x, int64_t grid_y) {
  return with_dtype(dtype, grid_x, grid_y, [&](auto zero) {
    using T = decltype(zero);
    const ia3_kernels::OutputGradOp<T> op{static_cast<const T*>(grad_out), static_cast<const T*>(z),
                                          static_cast<const T*>(scale), static_cast<T*>(scaled_grad)};
    column_sum_host(op, partial, M, N, grid_x, grid_y);
  });
}

// AdapterInitParams: out = residual + scale · b_up (b_up may be null).
extern "C" int dk_ew_host_adapter_init(int dtype, const void* residual, const void* b_up, void* out, int64_t M,
                                       int64_t d, float scale, int64_t grid_x, int64_t grid_y) {
  return with_dtype(dtype, grid_x, grid_y, [&](auto zero) {
    using T = decltype(zero);
    lanes_host(grid_x, grid_y, [&](const Lane& l) {
      adapter_kernels::init_body(l, static_cast<const T*>(residual), static_cast<const T*>(b_up),
                                 static_cast<T*>(out), M, d, scale);
    });
  });
}

// AdapterActivationParams: a = act(pre) over n elements.
extern "C" int dk_ew_host_adapter_activation(int dtype, int act, const void* pre, void* a, int64_t n,
                                             int64_t grid_x, int64_t grid_y) {
  return with_dtype_and_activation(dtype, act, grid_x, grid_y, [&](auto zero, auto kact) {
    using T = decltype(zero);
    lanes_host(grid_x, grid_y, [&](const Lane& l) {
      adapter_kernels::activation_body<decltype(kact)::value>(l, static_cast<const T*>(pre), static_cast<T*>(a), n);
    });
  });
}

// ia3_scale_kernel<T, width, per_column>: dst = src scaled per column (scale [cols]) or per
// row (scale [rows]) over [rows, cols], cols a multiple of width (1 or 4, the kPack of
// launch_ia3_scale; width 4 needs pack-aligned pointers, as the launcher checks).
extern "C" int dk_ew_host_ia3_scale(int dtype, int width, int per_column, const void* src, const void* scale,
                                    void* dst, int64_t rows, int64_t cols, int64_t grid_x, int64_t grid_y) {
  if ((width != 1 && width != ia3_kernels::kPack) || cols % width != 0) return 1;
  return with_dtype(dtype, grid_x, grid_y, [&](auto zero) {
    using T = decltype(zero);
    const T* s = static_cast<const T*>(src);
    const T* sc = static_cast<const T*>(scale);
    T* d = static_cast<T*>(dst);
    const int64_t packs = cols / width;
    lanes_host(grid_x, grid_y, [&](const Lane& l) {
      if (width == 1 && per_column) ia3_kernels::scale_body<T, 1, true>(l, s, sc, d, rows, packs);
      if (width == 1 && !per_column) ia3_kernels::scale_body<T, 1, false>(l, s, sc, d, rows, packs);
      if (width == ia3_kernels::kPack && per_column) {
        ia3_kernels::scale_body<T, ia3_kernels::kPack, true>(l, s, sc, d, rows, packs);
      }
      if (width == ia3_kernels::kPack && !per_column) {
        ia3_kernels::scale_body<T, ia3_kernels::kPack, false>(l, s, sc, d, rows, packs);
      }
    });
  });
}
