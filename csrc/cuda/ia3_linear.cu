// CUDA kernels of ia3_linear: the scale applied around the cuBLAS GEMMs and its gradient
// (the GEMMs run in ia3_linear_cuda.cpp). Raw pointers and a stream only, no torch header.
// Values are loaded to fp32, multiplied and summed in fp32 and rounded once when stored;
// explicit conversions (convert.cuh) because torch builds with __CUDA_NO_HALF_OPERATORS__ /
// __CUDA_NO_BFLOAT16_CONVERSIONS__. All index math is 64-bit.
//
// Kernels:
//   scale        dst = src ⊙ s, s broadcast over rows (per column) or columns (per row):
//                rows grid-stride over gridDim.y, the row's columns over gridDim.x blocks of
//                kThreads packs of kPack elements (4, or 1 when a row is not 4-element
//                aligned), one pack per thread and access: a warp moves 32 x 16 bytes (fp32)
//                or 32 x 8 bytes (fp16/bf16) per access and no thread divides to find its
//                column.
//   column sums  the two backward passes (input scale: dx = g ⊙ s, Σ g ⊙ x; output scale:
//                Σ dY ⊙ z and, when asked, dY ⊙ s), with per-row-group column sums of the
//                products (column_sum.cuh).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "column_sum.cuh"
#include "convert.cuh"
#include "deltakern/ia3_params.h"
#include "ia3_linear.cuh"

// The scale kernel's column loop is not unrolled: its grid covers a row's packs, so the loop runs
// once per row, and nvcc's unrolling of it (fp32) cost a 64-bit division per row for the trip
// count (div.u64 in the PTX).
#if defined(__CUDA_ARCH__)
#define DK_IA3_NO_UNROLL _Pragma("unroll 1")
#else
#define DK_IA3_NO_UNROLL
#endif

namespace deltakern {
namespace ia3_kernels {  // file-local (anonymous) below; named so a host harness can reach it
namespace {

using namespace column_sum;

constexpr int kPack = 4;

// scale: packs of kWidth columns over gridDim.x blocks of kThreads, rows over gridDim.y.
inline Geometry scale_geometry(int64_t rows, int64_t packs) {
  return {std::min(ceil_div(packs, kThreads), kMaxBlocks), std::min(rows, kMaxBlocks)};
}

// ---------------------------------------------------------------------------------------
// Kernel bodies.

// kWidth consecutive elements, one aligned access.
template <typename T, int kWidth>
struct alignas(kWidth * sizeof(T)) Pack {
  T v[kWidth];
};

// dst[r, c] = src[r, c] · scale[c] (kPerColumn) or src[r, c] · scale[r], for the packs of
// kWidth columns of each row; packs = cols / kWidth (cols is a multiple of kWidth).
template <typename T, int kWidth, bool kPerColumn>
DELTAKERN_HD void scale_body(const Lane& l, const T* src, const T* scale, T* dst, int64_t rows,
                             int64_t packs) {
  using P = Pack<T, kWidth>;
  const P* src_packs = reinterpret_cast<const P*>(src);
  const P* scale_packs = reinterpret_cast<const P*>(scale);
  P* dst_packs = reinterpret_cast<P*>(dst);
  const int64_t stride = l.grid_x * kThreads;
  for (int64_t r = l.block_y; r < rows; r += l.grid_y) {
    const float row_scale = kPerColumn ? 1.f : to_float(scale[r]);
    DK_IA3_NO_UNROLL
    for (int64_t p = l.block_x * kThreads + l.tid; p < packs; p += stride) {
      const P a = src_packs[r * packs + p];
      const P s = kPerColumn ? scale_packs[p] : P{};
      P b;
      for (int w = 0; w < kWidth; ++w) {
        b.v[w] = from_float<T>(to_float(a.v[w]) * (kPerColumn ? to_float(s.v[w]) : row_scale));
      }
      dst_packs[r * packs + p] = b;
    }
  }
}

// Element i = m * K + k of the input-scale backward: stores dx[i] = g[i] · s_k and returns
// g[i] · x[i] for the scale's column sums. g (fp32) may alias dx for fp32: element i is read
// before it is written.
template <typename T>
struct InputGradOp {
  const float* g;
  const T* x;
  const T* scale;
  T* dx;

  DELTAKERN_HD float column(int64_t k) const { return to_float(scale[k]); }

  DELTAKERN_HD float operator()(int64_t i, float s_k) const {
    const float gi = g[i];
    const float xi = to_float(x[i]);
    dx[i] = from_float<T>(gi * s_k);
    return gi * xi;
  }
};

// Element i = m * N + n of the output-scale backward: returns dY[i] · z[i] for the scale's
// column sums and stores scaled_grad[i] = dY[i] · s_n when asked.
template <typename T>
struct OutputGradOp {
  const T* grad_out;
  const T* z;
  const T* scale;
  T* scaled_grad;

  DELTAKERN_HD float column(int64_t n) const {
    return scaled_grad != nullptr ? to_float(scale[n]) : 0.f;
  }

  DELTAKERN_HD float operator()(int64_t i, float s_n) const {
    const float dy = to_float(grad_out[i]);
    if (scaled_grad != nullptr) scaled_grad[i] = from_float<T>(dy * s_n);
    return dy * to_float(z[i]);
  }
};

// ---------------------------------------------------------------------------------------
// Kernels.

template <typename T, int kWidth, bool kPerColumn>
__global__ void __launch_bounds__(kThreads)
    ia3_scale_kernel(const T* __restrict__ src, const T* __restrict__ scale, T* __restrict__ dst,
                     int64_t rows, int64_t packs) {
#if defined(__CUDA_ARCH__)
  scale_body<T, kWidth, kPerColumn>(this_lane(), src, scale, dst, rows, packs);
#endif
}

template <typename T>
bool pack_aligned(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % (kPack * sizeof(T)) == 0;
}

template <typename T, int kWidth>
cudaError_t launch_scale(const Ia3ScaleParams& p, cudaStream_t stream) {
  const int64_t packs = p.cols / kWidth;
  const dim3 grid = to_dim3(scale_geometry(p.rows, packs));
  const T* src = static_cast<const T*>(p.src);
  const T* scale = static_cast<const T*>(p.scale);
  T* dst = static_cast<T*>(p.dst);
  if (p.per_column) {
    ia3_scale_kernel<T, kWidth, true><<<grid, kThreads, 0, stream>>>(src, scale, dst, p.rows, packs);
  } else {
    ia3_scale_kernel<T, kWidth, false><<<grid, kThreads, 0, stream>>>(src, scale, dst, p.rows, packs);
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace ia3_kernels

using namespace ia3_kernels;

cudaError_t launch_ia3_scale(const Ia3ScaleParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  return with_type(p.dtype, [&](auto zero) {
    using T = decltype(zero);
    // A per-row scale is read one element per row, so only src and dst need the alignment.
    const bool packed = p.cols % kPack == 0 && pack_aligned<T>(p.src) && pack_aligned<T>(p.dst) &&
                        (!p.per_column || pack_aligned<T>(p.scale));
    return packed ? launch_scale<T, kPack>(p, stream) : launch_scale<T, 1>(p, stream);
  });
}

cudaError_t launch_ia3_input_grad(const Ia3InputGradParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.K == 0) return cudaSuccess;
  return with_type(p.dtype, [&](auto zero) {
    using T = decltype(zero);
    const InputGradOp<T> op{p.g, static_cast<const T*>(p.x), static_cast<const T*>(p.scale),
                            static_cast<T*>(p.dx)};
    return launch_column_sum(op, p.partial, p.M, p.K, stream);
  });
}

cudaError_t launch_ia3_output_grad(const Ia3OutputGradParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  return with_type(p.dtype, [&](auto zero) {
    using T = decltype(zero);
    const OutputGradOp<T> op{static_cast<const T*>(p.grad_out), static_cast<const T*>(p.z),
                             static_cast<const T*>(p.scale), static_cast<T*>(p.scaled_grad)};
    return launch_column_sum(op, p.partial, p.M, p.N, stream);
  });
}

}  // namespace deltakern
