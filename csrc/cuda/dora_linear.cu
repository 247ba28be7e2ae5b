// CUDA element-wise kernels of dora_linear around the cuBLAS GEMMs of dora_linear_cuda.cpp. Raw
// pointers and a stream only, no torch header. Values are loaded to fp32, computed in fp32 and
// rounded once when stored; explicit conversions (convert.cuh) because torch builds with
// __CUDA_NO_HALF_OPERATORS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__. All index math is 64-bit.
//
// Kernels (the bodies are __host__ __device__ and see the grid only through a column_sum::Lane,
// so tests/csrc/dora_cuda_host.cu runs them on the CPU):
//   scale columns   y = (c − shift) ⊙ z + b: rows over gridDim.y, columns over gridDim.x blocks
//                   of kThreads, one element per thread (coalesced; no division per element)
//   scale grad      g_scaled = (c − shift) ⊙ g with per-row-group column sums of g ⊙ z
//                   (column_sum.cuh: deterministic fp32 partials, no atomics)
//   drop rows       a row block of x̃ = drop(x), one thread per Philox counter group
//   mask accumulate dx += mask ⊙ t / (1 − p) and t = x̃, one thread per counter group
// The dropout kernels work in counter groups: group c is the elements 4c .. 4c + 3 of the
// flattened [M, K] index space, which one Philox call serves (DESIGN.md, "Dropout randomness").
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "column_sum.cuh"
#include "convert.cuh"
#include "deltakern/philox.h"
#include "dora_linear.cuh"

namespace deltakern {
namespace dora_kernels {  // file-local (anonymous) below; named so a host harness can reach it
namespace {

using namespace column_sum;

// scale columns: column blocks of kThreads over gridDim.x, rows over gridDim.y.
inline Geometry rows_geometry(int64_t M, int64_t N) {
  return {std::min(ceil_div(N, kThreads), kMaxBlocks), std::min(M, kMaxBlocks)};
}

// The dropout kernels: counter groups [first_group, last_group) over gridDim.x blocks of kThreads.
struct GroupRange {
  int64_t first_group, last_group;
  Geometry grid;
};

// The counter groups that cover the elements [begin, end).
inline GroupRange group_range(int64_t begin, int64_t end) {
  GroupRange r;
  r.first_group = begin / 4;
  r.last_group = ceil_div(end, 4);
  r.grid = {std::max<int64_t>(1, std::min(ceil_div(r.last_group - r.first_group, kThreads), kMaxBlocks)), 1};
  return r;
}

// ---------------------------------------------------------------------------------------
// Kernel bodies.

// y[m, j] = (scale[j] − shift) · z[m, j] + bias[j]. z may alias y: element i is read before it is
// written, by the same thread.
template <typename T>
DELTAKERN_HD void scale_columns_body(const Lane& l, const T* z, const float* scale, float shift, const T* bias, T* y,
                                     int64_t M, int64_t N) {
  const int64_t col_stride = l.grid_x * kThreads;
  for (int64_t m = l.block_y; m < M; m += l.grid_y) {
    for (int64_t j = l.block_x * kThreads + l.tid; j < N; j += col_stride) {
      const int64_t i = m * N + j;
      float v = (scale[j] - shift) * to_float(z[i]);
      if (bias != nullptr) v += to_float(bias[j]);
      y[i] = from_float<T>(v);
    }
  }
}

// Element i = m * N + n of the backward pass: stores g_scaled[i] = g[i] · (c_n − shift) and
// returns g[i] · z[i] for d_scale's column sums.
template <typename T>
struct ScaleGradOp {
  const T* grad_out;
  const T* z;
  const float* scale;
  float shift;
  T* g_scaled;

  DELTAKERN_HD float column(int64_t n) const { return scale[n] - shift; }

  DELTAKERN_HD float operator()(int64_t i, float factor) const {
    const float g = to_float(grad_out[i]);
    g_scaled[i] = from_float<T>(g * factor);
    return g * to_float(z[i]);
  }
};

// Bit l is set when element 4c + l is kept.
DELTAKERN_HD unsigned keep_bits(uint64_t seed, int64_t c, float dropout_p) {
  const PhiloxOut r = philox4x32_10(seed, static_cast<uint64_t>(c));
  unsigned bits = 0;
  for (int l = 0; l < 4; ++l) bits |= static_cast<unsigned>(dropout_keep(r.v[l], dropout_p)) << l;
  return bits;
}

// out[e − begin] = drop(x)[e] for the elements e in [begin, end) of the groups of range.
template <typename T>
DELTAKERN_HD void drop_rows_body(const Lane& l, const T* x, T* out, int64_t begin, int64_t end,
                                 const GroupRange& range, float dropout_p, float keep_scale, uint64_t seed) {
  const int64_t stride = l.grid_x * kThreads;
  for (int64_t c = range.first_group + l.block_x * kThreads + l.tid; c < range.last_group; c += stride) {
    const unsigned keep = keep_bits(seed, c, dropout_p);
    for (int t = 0; t < 4; ++t) {
      const int64_t e = 4 * c + t;
      if (e >= begin && e < end) out[e - begin] = from_float<T>(to_float(x[e]) * ((keep >> t) & 1u ? keep_scale : 0.f));
    }
  }
}

// dx[e] += f · t[e], t[e] = f · x[e] with f = keep ? keep_scale : 0, for e < n.
template <typename T>
DELTAKERN_HD void mask_accumulate_body(const Lane& l, const T* x, T* t, T* dx, int64_t n, const GroupRange& range,
                                       float dropout_p, float keep_scale, uint64_t seed) {
  const int64_t stride = l.grid_x * kThreads;
  for (int64_t c = range.first_group + l.block_x * kThreads + l.tid; c < range.last_group; c += stride) {
    const unsigned keep = keep_bits(seed, c, dropout_p);
    for (int q = 0; q < 4; ++q) {
      const int64_t e = 4 * c + q;
      if (e >= n) break;
      const float f = (keep >> q) & 1u ? keep_scale : 0.f;
      dx[e] = from_float<T>(to_float(dx[e]) + f * to_float(t[e]));
      t[e] = from_float<T>(f * to_float(x[e]));
    }
  }
}

// ---------------------------------------------------------------------------------------
// Kernels.

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dora_scale_columns_kernel(const T* z, const float* __restrict__ scale, float shift, const T* __restrict__ bias,
                              T* y, int64_t M, int64_t N) {
#if defined(__CUDA_ARCH__)
  scale_columns_body(this_lane(), z, scale, shift, bias, y, M, N);
#endif
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dora_drop_rows_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t begin, int64_t end,
                          GroupRange range, float dropout_p, float keep_scale, uint64_t seed) {
#if defined(__CUDA_ARCH__)
  drop_rows_body(this_lane(), x, out, begin, end, range, dropout_p, keep_scale, seed);
#endif
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dora_mask_accumulate_kernel(const T* __restrict__ x, T* __restrict__ t, T* __restrict__ dx, int64_t n,
                                GroupRange range, float dropout_p, float keep_scale, uint64_t seed) {
#if defined(__CUDA_ARCH__)
  mask_accumulate_body(this_lane(), x, t, dx, n, range, dropout_p, keep_scale, seed);
#endif
}

}  // namespace
}  // namespace dora_kernels

using namespace dora_kernels;

cudaError_t launch_dora_scale_columns(const DoraScaleColumnsParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  return with_type(p.dtype, [&](auto zero) {
    using T = decltype(zero);
    dora_scale_columns_kernel<T><<<to_dim3(rows_geometry(p.M, p.N)), kThreads, 0, stream>>>(
        static_cast<const T*>(p.z), p.scale, p.shift, static_cast<const T*>(p.bias), static_cast<T*>(p.y), p.M, p.N);
    return cudaGetLastError();
  });
}

cudaError_t launch_dora_scale_grad(const DoraScaleGradParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  return with_type(p.dtype, [&](auto zero) {
    using T = decltype(zero);
    const ScaleGradOp<T> op{static_cast<const T*>(p.grad_out), static_cast<const T*>(p.z), p.scale, p.shift,
                            static_cast<T*>(p.g_scaled)};
    return launch_column_sum(op, p.partial, p.M, p.N, stream);
  });
}

cudaError_t launch_dora_drop_rows(const DoraDropRowsParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.K == 0) return cudaSuccess;
  const int64_t begin = p.row0 * p.K, end = (p.row0 + p.rows) * p.K;
  const GroupRange range = group_range(begin, end);
  return with_type(p.dtype, [&](auto zero) {
    using T = decltype(zero);
    dora_drop_rows_kernel<T><<<to_dim3(range.grid), kThreads, 0, stream>>>(
        static_cast<const T*>(p.x), static_cast<T*>(p.out), begin, end, range, p.dropout_p, p.keep_scale, p.seed);
    return cudaGetLastError();
  });
}

cudaError_t launch_dora_mask_accumulate(const DoraMaskAccumulateParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.K == 0) return cudaSuccess;
  const int64_t n = p.M * p.K;
  const GroupRange range = group_range(0, n);
  return with_type(p.dtype, [&](auto zero) {
    using T = decltype(zero);
    dora_mask_accumulate_kernel<T><<<to_dim3(range.grid), kThreads, 0, stream>>>(
        static_cast<const T*>(p.x), static_cast<T*>(p.t), static_cast<T*>(p.dx), n, range, p.dropout_p,
        p.keep_scale, p.seed);
    return cudaGetLastError();
  });
}

}  // namespace deltakern
