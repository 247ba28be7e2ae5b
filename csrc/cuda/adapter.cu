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
//                each with per-row-group column sums of what it reads or writes
//                (column_sum.cuh).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "adapter.cuh"
#include "column_sum.cuh"
#include "convert.cuh"
#include "deltakern/activations.h"
#include "deltakern/adapter_params.h"

namespace deltakern {
namespace adapter_kernels {  // file-local (anonymous) below; named so a host harness can reach it
namespace {

using namespace column_sum;

inline Geometry flat_geometry(int64_t n) { return {std::min(ceil_div(n, kThreads), kMaxBlocks), 1}; }

// init: gridDim.x blocks of kThreads columns, rows over gridDim.y.
inline Geometry init_geometry(int64_t M, int64_t d) {
  return {std::min(ceil_div(d, kThreads), kMaxBlocks), std::min(M, kMaxBlocks)};
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

  DELTAKERN_HD float column(int64_t) const { return 0.f; }  // nothing per column

  DELTAKERN_HD float operator()(int64_t i, float) const {
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

  DELTAKERN_HD float column(int64_t) const { return 0.f; }  // nothing per column

  DELTAKERN_HD float operator()(int64_t i, float) const {
    const T v = src[i];
    if (copy != nullptr) copy[i] = v;
    return to_float(v);
  }
};

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
