// CUDA element-wise kernels of the adapter op; the GEMMs run in cuBLAS (adapter_cuda.cpp).
// Raw pointers and a stream only, no torch header. Values are loaded to fp32, computed in fp32
// with the formulas of deltakern/activations.h (CUDA's expf, erff, tanhf) and rounded once
// when stored; explicit conversions (convert.cuh) because torch builds with
// __CUDA_NO_HALF_OPERATORS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__. All index math is 64-bit.
//
// Kernels:
//   init         out = residual + s·b_up                   rows x column blocks of [M, d]
//   activation   a = act(pre)                               flat grid-stride over [M, r]
//   column sums  dpre (a_s = s·act(pre), dpre = s·dz·act'(pre)) and grad_out (copy for dh),
//                each with per-row-group column sums of what it reads or writes: a block owns
//                32 columns x one row group; its 8 warps walk the group's rows (warp w takes
//                rows w, w + 8, ...), so every warp access is 32 consecutive elements of one
//                row; the 8 per-thread sums meet in shared memory and one fp32 partial per
//                (group, column) is stored. The caller sums the partials over the groups
//                (deterministic: no atomics).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "adapter.cuh"
#include "convert.cuh"
#include "deltakern/activations.h"
#include "deltakern/adapter_params.h"

// The row walk of the column sums is unrolled twice. Left to nvcc (which unrolls it 4 times or
// more), ptxas held the gelu_tanh instantiations at 32 registers and spilled 12 bytes to local
// memory on sm_80 (unrolled 4 times: 5 kernels spilled); twice or not at all, nothing spills.
#if defined(__CUDA_ARCH__)
#define DK_ADAPTER_UNROLL _Pragma("unroll 2")
#else
#define DK_ADAPTER_UNROLL
#endif

namespace deltakern {
namespace adapter_kernels {  // file-local (anonymous) below; named so a host harness can reach it
namespace {

constexpr int kThreads = 256;
constexpr int kColTile = 32;
constexpr int kRowLanes = kThreads / kColTile;
// Grids are capped here and the kernels grid-stride over the rest; 65535 blocks of 256 threads
// are many waves on any current GPU.
constexpr int64_t kMaxBlocks = 65535;

// What a kernel body reads of blockIdx, gridDim and threadIdx. The bodies below are
// __host__ __device__ so that a host program can include this file and run them with threads
// standing in for the lanes (no GPU needed to check their index math).
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

inline Geometry flat_geometry(int64_t n) { return {std::min(ceil_div(n, kThreads), kMaxBlocks), 1}; }

// init: gridDim.x blocks of kThreads columns, rows over gridDim.y.
inline Geometry init_geometry(int64_t M, int64_t d) {
  return {std::min(ceil_div(d, kThreads), kMaxBlocks), std::min(M, kMaxBlocks)};
}

// Column sums: column tiles of kColTile over gridDim.x, row groups over gridDim.y.
struct ColumnGeometry {
  int64_t group_rows, groups, col_tiles;
  Geometry grid;
};

inline ColumnGeometry column_geometry(int64_t M, int64_t cols) {
  ColumnGeometry g;
  g.group_rows = adapter_group_rows(M);
  g.groups = ceil_div(M, g.group_rows);
  g.col_tiles = ceil_div(cols, kColTile);
  g.grid = {std::min(g.col_tiles, kMaxBlocks), std::min(g.groups, kMaxBlocks)};
  return g;
}

// ---------------------------------------------------------------------------------------
// Kernel bodies.

// out[m, j] = residual[m, j] + scale · b_up[j]: rows grid-stride over gridDim.y, columns over
// gridDim.x blocks of kThreads (no division to find an element's column).
template <typename T>
DELTAKERN_HD void init_body(const Lane& l, const T* residual, const T* b_up, T* out, int64_t M, int64_t d,
                            float scale) {
  const int64_t col_stride = l.grid_x * kThreads;
  for (int64_t m = l.block_y; m < M; m += l.grid_y) {
    for (int64_t j = l.block_x * kThreads + l.tid; j < d; j += col_stride) {
      const int64_t i = m * d + j;
      float v = to_float(residual[i]);
      if (b_up != nullptr) v += scale * to_float(b_up[j]);
      out[i] = from_float<T>(v);
    }
  }
}

template <Activation kAct, typename T>
DELTAKERN_HD void activation_body(const Lane& l, const T* pre, T* a, int64_t n) {
  const int64_t stride = l.grid_x * kThreads;
  for (int64_t i = l.block_x * kThreads + l.tid; i < n; i += stride) {
    a[i] = from_float<T>(activation<kAct>(to_float(pre[i])));
  }
}

// Element i of the backward pass over [M, r]; returns the unrounded dpre[i] for the column
// sums. dz (fp32) may alias dpre for fp32: element i is read before it is written.
template <Activation kAct, typename T>
struct DpreOp {
  const T* pre;
  const float* dz;
  T* dpre;
  T* a_s;
  float scale;

  DELTAKERN_HD float operator()(int64_t i) const {
    float value;
    const float grad = activation_grad<kAct>(to_float(pre[i]), value);
    const float dp = scale * dz[i] * grad;
    a_s[i] = from_float<T>(scale * value);
    dpre[i] = from_float<T>(dp);
    return dp;
  }
};

// Element i of grad_out: copied to dh's residual term when asked, returned for db_up.
template <typename T>
struct ColsumOp {
  const T* src;
  T* copy;

  DELTAKERN_HD float operator()(int64_t i) const {
    const T v = src[i];
    if (copy != nullptr) copy[i] = v;
    return to_float(v);
  }
};

// partial[g, j] = Σ op(m * cols + j) over the rows m of group g (see the file comment); sums
// is the block's shared [kRowLanes][kColTile + 1] buffer.
template <typename Sync, typename Op>
DELTAKERN_HD void column_sum_body(const Lane& l, const Sync& sync, float (*sums)[kColTile + 1], const Op& op,
                                  float* partial, int64_t M, int64_t cols, int64_t group_rows, int64_t groups,
                                  int64_t col_tiles) {
  const int tx = l.tid % kColTile;
  const int ty = l.tid / kColTile;
  // Block-uniform bounds: every thread reaches the syncs.
  for (int64_t tile = l.block_x; tile < col_tiles; tile += l.grid_x) {
    const int64_t j = tile * kColTile + tx;
    for (int64_t g = l.block_y; g < groups; g += l.grid_y) {
      const int64_t row_end = min64(M, (g + 1) * group_rows);
      float acc = 0.f;
      if (j < cols) {
        DK_ADAPTER_UNROLL
        for (int64_t m = g * group_rows + ty; m < row_end; m += kRowLanes) acc += op(m * cols + j);
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

// ---------------------------------------------------------------------------------------
// Kernels.

template <typename T>
__global__ void __launch_bounds__(kThreads)
    adapter_init_kernel(const T* __restrict__ residual, const T* __restrict__ b_up,
                        T* __restrict__ out, int64_t M, int64_t d, float scale) {
#if defined(__CUDA_ARCH__)
  init_body(this_lane(), residual, b_up, out, M, d, scale);
#endif
}

template <Activation kAct, typename T>
__global__ void __launch_bounds__(kThreads)
    adapter_activation_kernel(const T* __restrict__ pre, T* __restrict__ a, int64_t n) {
#if defined(__CUDA_ARCH__)
  activation_body<kAct>(this_lane(), pre, a, n);
#endif
}

template <typename Op>
__global__ void __launch_bounds__(kThreads)
    adapter_column_sum_kernel(Op op, float* __restrict__ partial, int64_t M, int64_t cols,
                              int64_t group_rows, int64_t groups, int64_t col_tiles) {
#if defined(__CUDA_ARCH__)
  __shared__ float sums[kRowLanes][kColTile + 1];
  column_sum_body(this_lane(), DeviceSync{}, sums, op, partial, M, cols, group_rows, groups, col_tiles);
#endif
}

dim3 to_dim3(const Geometry& g) { return dim3(static_cast<unsigned>(g.grid_x), static_cast<unsigned>(g.grid_y)); }

template <typename Op>
cudaError_t launch_column_sum(const Op& op, float* partial, int64_t M, int64_t cols, cudaStream_t stream) {
  const ColumnGeometry g = column_geometry(M, cols);
  adapter_column_sum_kernel<<<to_dim3(g.grid), kThreads, 0, stream>>>(op, partial, M, cols, g.group_rows,
                                                                      g.groups, g.col_tiles);
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

}  // namespace
}  // namespace adapter_kernels

using namespace adapter_kernels;

cudaError_t launch_adapter_init(const AdapterInitParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.d == 0) return cudaSuccess;
  return with_type(p.dtype, [&](auto zero) {
    using T = decltype(zero);
    adapter_init_kernel<T><<<to_dim3(init_geometry(p.M, p.d)), kThreads, 0, stream>>>(
        static_cast<const T*>(p.residual), static_cast<const T*>(p.b_up), static_cast<T*>(p.out),
        p.M, p.d, p.scale);
    return cudaGetLastError();
  });
}

cudaError_t launch_adapter_activation(const AdapterActivationParams& p, cudaStream_t stream) {
  if (!is_activation_code(static_cast<int>(p.act))) return cudaErrorInvalidValue;
  if (p.n == 0) return cudaSuccess;
  return with_type(p.dtype, [&](auto zero) {
    using T = decltype(zero);
    return dispatch_activation(p.act, [&](auto act) {
      adapter_activation_kernel<decltype(act)::value, T><<<to_dim3(flat_geometry(p.n)), kThreads, 0, stream>>>(
          static_cast<const T*>(p.pre), static_cast<T*>(p.a), p.n);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_adapter_dpre(const AdapterDpreParams& p, cudaStream_t stream) {
  if (!is_activation_code(static_cast<int>(p.act))) return cudaErrorInvalidValue;
  if (p.M == 0 || p.r == 0) return cudaSuccess;
  return with_type(p.dtype, [&](auto zero) {
    using T = decltype(zero);
    return dispatch_activation(p.act, [&](auto act) {
      const DpreOp<decltype(act)::value, T> op{static_cast<const T*>(p.pre), p.dz, static_cast<T*>(p.dpre),
                                              static_cast<T*>(p.a_s), p.scale};
      return launch_column_sum(op, p.partial, p.M, p.r, stream);
    });
  });
}

cudaError_t launch_adapter_colsum(const AdapterColsumParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.d == 0) return cudaSuccess;
  return with_type(p.dtype, [&](auto zero) {
    using T = decltype(zero);
    const ColsumOp<T> op{static_cast<const T*>(p.src), static_cast<T*>(p.copy)};
    return launch_column_sum(op, p.partial, p.M, p.d, stream);
  });
}

}  // namespace deltakern
