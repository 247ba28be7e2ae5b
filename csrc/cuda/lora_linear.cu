// CUDA kernels of lora_linear's dropout parts: the dropout-fused shrink xa = drop(x) A^T and
// the one-pass dropout backward. Raw pointers and a stream only; no torch header, so nvcc
// compiles this file in seconds. The glue lives in lora_linear_cuda.cpp.
//
// Dropout mask (DESIGN.md, "Dropout randomness"): element e = m * K + k of the [M, K] view
// is kept when lane e % 4 of philox4x32_10(seed, e / 4) passes dropout_keep(bits, dropout_p). Both
// kernels work in "counter groups": group c is the four elements 4c .. 4c+3 of the flattened
// index space, which one Philox call serves.
//
// fp32 math for every dtype, with explicit conversion intrinsics because torch builds with
// __CUDA_NO_HALF_OPERATORS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__. All index math is 64-bit.
// The kernels are thin wrappers around __host__ __device__ bodies that see blockIdx, gridDim and
// threadIdx only through a column_sum::Lane, and the shrink's __syncthreads and warp shuffles
// only through a Sync; the launchers' grid, block, shared memory and instantiation come from
// plain plan functions (shrink_plan, backward_plan). So tests/csrc/lora_cuda_host.cu includes
// this file and runs the bodies on the CPU with the launchers' own plans. The per-group and
// per-chunk pieces carry no #pragma unroll (g++ warns on it): nvcc fully unrolls their
// constant-trip loops anyway, which keeps the shrink accumulators in registers (same PTX with and
// without the pragmas); the loops that hold a shuffle keep theirs, on the device only.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "column_sum.cuh"
#include "convert.cuh"
#include "deltakern/lora_params.h"
#include "deltakern/philox.h"
#include "lora_linear.cuh"

#if defined(__CUDA_ARCH__)
#define DK_LORA_UNROLL _Pragma("unroll")
#else
#define DK_LORA_UNROLL
#endif

namespace deltakern {
namespace {

using column_sum::Lane;

// Dropping multiplies by 0 rather than selecting 0, so NaN and inf propagate as in the
// reference x * mask / (1 - dropout_p) and the CPU kernels.

// Bit l is set when element 4c + l is kept. A uniform is never below 0, so dropout_p == 0 keeps
// everything and Philox is skipped: LoRA without dropout pays nothing for the RNG.
DELTAKERN_HD unsigned keep_mask(uint64_t seed, int64_t c, float dropout_p) {
  if (dropout_p <= 0.f) return 0xFu;
  const PhiloxOut r = philox4x32_10(seed, static_cast<uint64_t>(c));
  unsigned mask = 0;
  for (int l = 0; l < 4; ++l) mask |= static_cast<unsigned>(dropout_keep(r.v[l], dropout_p)) << l;
  return mask;
}

// One counter group in memory. A group starts at a multiple of 4 elements of the flat index,
// so with a 4-element-aligned base pointer every full group is one 16-byte (fp32) or 8-byte
// (fp16/bf16) access.
template <typename T>
struct alignas(4 * sizeof(T)) Group {
  T v[4];
};

// Elements 4c .. 4c+3 of src[0, n) as floats; those at or past n read as 0.
// kVec: src is 4-element aligned, so a full group is a single vector load.
template <typename T, bool kVec>
DELTAKERN_HD void load_group(const T* src, int64_t c, int64_t n, float out[4]) {
  const int64_t e0 = 4 * c;
  if (kVec && e0 + 4 <= n) {
    const Group<T> g = *reinterpret_cast<const Group<T>*>(src + e0);
    for (int l = 0; l < 4; ++l) out[l] = to_float(g.v[l]);
  } else {
    for (int l = 0; l < 4; ++l) out[l] = e0 + l < n ? to_float(src[e0 + l]) : 0.f;
  }
}

// Stores in[0..3] to elements 4c .. 4c+3 of dst[0, n); those at or past n are skipped.
template <typename T, bool kVec>
DELTAKERN_HD void store_group(T* dst, int64_t c, int64_t n, const float in[4]) {
  const int64_t e0 = 4 * c;
  if (kVec && e0 + 4 <= n) {
    Group<T> g;
    for (int l = 0; l < 4; ++l) g.v[l] = from_float<T>(in[l]);
    *reinterpret_cast<Group<T>*>(dst + e0) = g;
  } else {
    for (int l = 0; l < 4; ++l) {
      if (e0 + l < n) dst[e0 + l] = from_float<T>(in[l]);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Shrink: xa[M, R] = drop(x)[M, K] @ A[R, K]^T.
//
// Design: a block owns kShrinkRows rows of x and a tile of kShrinkRTile outputs r, and walks
// K in chunks of kShrinkChunk columns. Each chunk of the block's rows is dropped and staged
// in shared memory in fp32 (the drop(x) temporary never exists in global memory); then warp
// w accumulates the outputs r = tile + w + j * kShrinkWarps (j < kShrinkRPerWarp) for all
// the block's rows, each lane over the columns lane, lane + 32, ... of the chunk. Every A
// value loaded is used for kShrinkRows rows and every staged x value for up to
// kShrinkRPerWarp outputs, from registers. Partial sums stay in registers across chunks and
// are reduced with warp shuffles once per tile. Outputs are interleaved over the warps so a
// small R (8, 16) still keeps every warp busy; the r < R test is warp-uniform. R above the
// tile size takes more tiles (gridDim.y), which regenerate the mask: cheap next to the
// K * kShrinkRTile multiply-adds per row of a tile.
//
// Staging works on counter groups: chunk [k0, k0 + kc) of row m is the flat range
// [lo, hi) = m * K + [k0, k0 + kc), covered by groups lo / 4 .. (hi - 1) / 4. A group that
// straddles a row or chunk boundary (K % 4 != 0, or the chunk edge) is simply generated by
// both sides, each keeping its own elements: at most two extra Philox calls per row chunk.
constexpr int kShrinkWarps = 8;
constexpr int kShrinkThreads = kShrinkWarps * 32;
constexpr int kShrinkRows = 8;
constexpr int kShrinkRPerWarp = 8;
constexpr int kShrinkRTile = kShrinkWarps * kShrinkRPerWarp;
constexpr int kShrinkChunk = 256;
// Groups touching one row's chunk of kc <= kShrinkChunk elements (kShrinkChunk % 4 == 0).
constexpr int kShrinkGroupsPerRow = kShrinkChunk / 4 + 1;
static_assert(kShrinkChunk % 4 == 0, "kShrinkGroupsPerRow assumes whole groups per chunk");

// Writes the elements of group lo / 4 + gi that lie in [lo, hi) to xs_row[e - lo], dropped
// and scaled. Groups past the range are skipped.
template <typename T, bool kVec>
DELTAKERN_HD void stage_group(const T* x, int64_t n, int64_t lo, int64_t hi, int gi,
                              float dropout_p, float keep_scale, uint64_t seed, float* xs_row) {
  const int64_t c = lo / 4 + gi;
  if (4 * c >= hi) return;
  float v[4];
  load_group<T, kVec>(x, c, n, v);
  const unsigned keep = keep_mask(seed, c, dropout_p);
  for (int l = 0; l < 4; ++l) {
    const int64_t e = 4 * c + l;
    if (e >= lo && e < hi) xs_row[e - lo] = v[l] * ((keep >> l) & 1u ? keep_scale : 0.f);
  }
}

// Thread tid's share of staging chunk [k0, k0 + kc) of rows row0 .. row0 + kShrinkRows - 1
// into xs: slot s = (row b, group gi) for s = tid, tid + kShrinkThreads, ...
template <typename T, bool kVec>
DELTAKERN_HD void stage_chunk(const T* x, int64_t M, int64_t K, int64_t row0, int64_t k0, int kc,
                              int tid, float dropout_p, float keep_scale, uint64_t seed,
                              float (*xs)[kShrinkChunk]) {
  for (int s = tid; s < kShrinkRows * kShrinkGroupsPerRow; s += kShrinkThreads) {
    const int b = s / kShrinkGroupsPerRow;
    // Rows past M stage a copy of row M - 1: their sums are computed but never stored, and
    // every value read from xs is defined.
    const int64_t m = min64(row0 + b, M - 1);
    const int64_t lo = m * K + k0;
    stage_group<T, kVec>(x, M * K, lo, lo + kc, s % kShrinkGroupsPerRow, dropout_p, keep_scale, seed,
                         xs[b]);
  }
}

// One lane's share of a chunk: acc[j][b] += sum over k = lane, lane + 32, ... < kc of
// A[r_j, k0 + k] * xs[b][k], for the outputs r_j = r_first + j * kShrinkWarps below R.
template <typename T>
DELTAKERN_HD void accumulate_chunk(const float (*xs)[kShrinkChunk], const T* A, int64_t K,
                                   int64_t R, int64_t k0, int kc, int64_t r_first, int lane,
                                   float (&acc)[kShrinkRPerWarp][kShrinkRows]) {
  for (int k = lane; k < kc; k += 32) {
    float xv[kShrinkRows];
    for (int b = 0; b < kShrinkRows; ++b) xv[b] = xs[b][k];
    for (int j = 0; j < kShrinkRPerWarp; ++j) {
      const int64_t r = r_first + static_cast<int64_t>(j) * kShrinkWarps;
      if (r < R) {
        const float a = to_float(A[r * K + k0 + k]);
        for (int b = 0; b < kShrinkRows; ++b) acc[j][b] += a * xv[b];
      }
    }
  }
}

// __syncthreads and the warp's xor-shuffle sum of the shrink body on the GPU; the host harness
// passes its own (barriers of the emulated threads, the same butterfly over their values).
struct ShrinkDeviceSync {
  DELTAKERN_HD void block() const {
#if defined(__CUDA_ARCH__)
    __syncthreads();
#endif
  }
  DELTAKERN_HD float warp_sum(float v) const {
#if defined(__CUDA_ARCH__)
    DK_LORA_UNROLL
    for (int offset = 16; offset > 0; offset /= 2) {
      v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
#endif
    return v;
  }
};

// One block of the shrink kernel (see the design above); xs is its __shared__ staging buffer.
template <typename T, bool kVec, typename Sync>
DELTAKERN_HD void shrink_body(const Lane& l, const Sync& sync, float (*xs)[kShrinkChunk], const T* x, const T* A,
                              T* xa, int64_t M, int64_t K, int64_t R, float dropout_p, float keep_scale,
                              uint64_t seed) {
  const int warp = static_cast<unsigned>(l.tid) / 32;  // unsigned, as threadIdx.x: no sign fix-up
  const int lane = static_cast<unsigned>(l.tid) % 32;
  const int64_t row_blocks = (M + kShrinkRows - 1) / kShrinkRows;
  const int64_t r_tiles = (R + kShrinkRTile - 1) / kShrinkRTile;

  // Grid-stride over (row block, r tile) so any M and R fit the grid limits. The bounds are
  // block-uniform, so the block syncs below are reached by the whole block.
  for (int64_t rt = l.block_y; rt < r_tiles; rt += l.grid_y) {
    const int64_t r_first = rt * kShrinkRTile + warp;
    for (int64_t rb = l.block_x; rb < row_blocks; rb += l.grid_x) {
      const int64_t row0 = rb * kShrinkRows;
      float acc[kShrinkRPerWarp][kShrinkRows] = {};

      for (int64_t k0 = 0; k0 < K; k0 += kShrinkChunk) {
        const int kc = static_cast<int>(min64(kShrinkChunk, K - k0));
        sync.block();  // the previous chunk's readers are done with xs
        stage_chunk<T, kVec>(x, M, K, row0, k0, kc, l.tid, dropout_p, keep_scale, seed, xs);
        sync.block();
        accumulate_chunk<T>(xs, A, K, R, k0, kc, r_first, lane, acc);
      }

      DK_LORA_UNROLL
      for (int j = 0; j < kShrinkRPerWarp; ++j) {
        const int64_t r = r_first + static_cast<int64_t>(j) * kShrinkWarps;
        if (r >= R) continue;  // warp-uniform
        DK_LORA_UNROLL
        for (int b = 0; b < kShrinkRows; ++b) {
          const float v = sync.warp_sum(acc[j][b]);
          if (lane == 0 && row0 + b < M) xa[(row0 + b) * R + r] = from_float<T>(v);
        }
      }
    }
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kShrinkThreads)
    lora_dropout_shrink_kernel(const T* __restrict__ x, const T* __restrict__ A,
                               T* __restrict__ xa, int64_t M, int64_t K, int64_t R, float dropout_p,
                               float keep_scale, uint64_t seed) {
#if defined(__CUDA_ARCH__)
  __shared__ float xs[kShrinkRows][kShrinkChunk];
  shrink_body<T, kVec>(column_sum::this_lane(), ShrinkDeviceSync{}, xs, x, A, xa, M, K, R, dropout_p, keep_scale,
                       seed);
#endif
}

// ---------------------------------------------------------------------------------------
// Dropout backward: one thread per counter group, so the mask of four consecutive elements
// costs one Philox call and rows do not matter at all (the flat index is the element index).
constexpr int kBackwardThreads = 256;

template <typename T, bool kVec>
DELTAKERN_HD void dropout_backward_group(const T* x, T* dx, T* x_dropped, int64_t n, int64_t c,
                                         float dropout_p, float keep_scale, uint64_t seed) {
  const unsigned keep = keep_mask(seed, c, dropout_p);
  float xv[4], dv[4];
  load_group<T, kVec>(x, c, n, xv);
  load_group<T, kVec>(dx, c, n, dv);
  for (int l = 0; l < 4; ++l) {
    const float scale = (keep >> l) & 1u ? keep_scale : 0.f;
    xv[l] *= scale;
    dv[l] *= scale;
  }
  store_group<T, kVec>(x_dropped, c, n, xv);
  store_group<T, kVec>(dx, c, n, dv);
}

// One lane's counter groups c = block_x * kBackwardThreads + tid, then every grid's worth on.
template <typename T, bool kVec>
DELTAKERN_HD void dropout_backward_body(const Lane& l, const T* x, T* dx, T* x_dropped, int64_t n, float dropout_p,
                                        float keep_scale, uint64_t seed) {
  const int64_t groups = (n + 3) / 4;
  const int64_t stride = l.grid_x * kBackwardThreads;
  for (int64_t c = l.block_x * kBackwardThreads + l.tid; c < groups; c += stride) {
    dropout_backward_group<T, kVec>(x, dx, x_dropped, n, c, dropout_p, keep_scale, seed);
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kBackwardThreads)
    lora_dropout_backward_kernel(const T* __restrict__ x, T* __restrict__ dx,
                                 T* __restrict__ x_dropped, int64_t n, float dropout_p,
                                 float keep_scale, uint64_t seed) {
#if defined(__CUDA_ARCH__)
  dropout_backward_body<T, kVec>(column_sum::this_lane(), x, dx, x_dropped, n, dropout_p, keep_scale, seed);
#endif
}

// ---------------------------------------------------------------------------------------
// Launchers.

// Grid dimensions are capped here and the kernels grid-stride over the rest; 65535 blocks
// of 256 threads are many waves on any current GPU, so the cap only matters for huge inputs.
constexpr int64_t kMaxGridDim = 65535;

// What a launcher launches, decided from its params alone (no CUDA call), so that a host harness
// runs the kernel bodies with the launcher's own plan and tests the plan.
struct LaunchPlan {
  bool launch;            // false: the launcher returns cudaSuccess without launching
  int64_t grid_x, grid_y;
  int threads;            // per block
  int64_t shared_bytes;   // the kernel's static __shared__ memory (no dynamic shared memory)
  bool vec;               // the kVec instantiation: the vector-accessed pointers are 4-element aligned
};

// Bytes per element of dtype; 0 for an unknown dtype (the launchers then return cudaErrorInvalidValue).
inline int64_t dtype_bytes(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return 4;
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
  }
  return 0;
}

inline bool vec_aligned(const void* ptr, int64_t elem_bytes) {
  return elem_bytes > 0 && reinterpret_cast<uintptr_t>(ptr) % (4 * elem_bytes) == 0;
}

// (row blocks, r tiles) over (gridDim.x, gridDim.y), kShrinkThreads, the xs staging buffer; the
// vector loads of x when x is aligned (A and xa are accessed element by element).
inline LaunchPlan shrink_plan(const LoraShrinkParams& prm) {
  const int64_t row_blocks = (prm.M + kShrinkRows - 1) / kShrinkRows;
  const int64_t r_tiles = (prm.R + kShrinkRTile - 1) / kShrinkRTile;
  LaunchPlan plan;
  plan.launch = prm.M != 0 && prm.R != 0;
  plan.grid_x = std::min(row_blocks, kMaxGridDim);
  plan.grid_y = std::min(r_tiles, kMaxGridDim);
  plan.threads = kShrinkThreads;
  plan.shared_bytes = static_cast<int64_t>(sizeof(float)) * kShrinkRows * kShrinkChunk;
  plan.vec = vec_aligned(prm.x, dtype_bytes(prm.dtype));
  return plan;
}

// Counter groups over gridDim.x blocks of kBackwardThreads; vector accesses when all three
// tensors are aligned.
inline LaunchPlan backward_plan(const LoraDropoutBackwardParams& prm) {
  const int64_t n = prm.M * prm.K;
  const int64_t groups = (n + 3) / 4;
  const int64_t bytes = dtype_bytes(prm.dtype);
  LaunchPlan plan;
  plan.launch = prm.M != 0 && prm.K != 0;
  plan.grid_x = std::min((groups + kBackwardThreads - 1) / kBackwardThreads, kMaxGridDim);
  plan.grid_y = 1;
  plan.threads = kBackwardThreads;
  plan.shared_bytes = 0;
  plan.vec = vec_aligned(prm.x, bytes) && vec_aligned(prm.dx_lowrank, bytes) && vec_aligned(prm.x_dropped, bytes);
  return plan;
}

inline dim3 plan_grid(const LaunchPlan& plan) {
  return dim3(static_cast<unsigned>(plan.grid_x), static_cast<unsigned>(plan.grid_y));
}

template <typename T>
cudaError_t shrink_typed(const LoraShrinkParams& prm, const LaunchPlan& plan, cudaStream_t stream) {
  const T* x = static_cast<const T*>(prm.x);
  const T* A = static_cast<const T*>(prm.lora_A);
  T* xa = static_cast<T*>(prm.xa);
  if (plan.vec) {
    lora_dropout_shrink_kernel<T, true><<<plan_grid(plan), plan.threads, 0, stream>>>(
        x, A, xa, prm.M, prm.K, prm.R, prm.dropout_p, prm.keep_scale, prm.seed);
  } else {
    lora_dropout_shrink_kernel<T, false><<<plan_grid(plan), plan.threads, 0, stream>>>(
        x, A, xa, prm.M, prm.K, prm.R, prm.dropout_p, prm.keep_scale, prm.seed);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(const LoraDropoutBackwardParams& prm, const LaunchPlan& plan, cudaStream_t stream) {
  const int64_t n = prm.M * prm.K;
  const T* x = static_cast<const T*>(prm.x);
  T* dx = static_cast<T*>(prm.dx_lowrank);
  T* xd = static_cast<T*>(prm.x_dropped);
  if (plan.vec) {
    lora_dropout_backward_kernel<T, true><<<plan_grid(plan), plan.threads, 0, stream>>>(
        x, dx, xd, n, prm.dropout_p, prm.keep_scale, prm.seed);
  } else {
    lora_dropout_backward_kernel<T, false><<<plan_grid(plan), plan.threads, 0, stream>>>(
        x, dx, xd, n, prm.dropout_p, prm.keep_scale, prm.seed);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_lora_dropout_shrink(const LoraShrinkParams& params, cudaStream_t stream) {
  const LaunchPlan plan = shrink_plan(params);
  if (!plan.launch) return cudaSuccess;
  switch (params.dtype) {
    case DType::kFloat32: return shrink_typed<float>(params, plan, stream);
    case DType::kFloat16: return shrink_typed<__half>(params, plan, stream);
    case DType::kBFloat16: return shrink_typed<__nv_bfloat16>(params, plan, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_lora_dropout_backward(const LoraDropoutBackwardParams& params,
                                         cudaStream_t stream) {
  const LaunchPlan plan = backward_plan(params);
  if (!plan.launch) return cudaSuccess;
  switch (params.dtype) {
    case DType::kFloat32: return backward_typed<float>(params, plan, stream);
    case DType::kFloat16: return backward_typed<__half>(params, plan, stream);
    case DType::kBFloat16: return backward_typed<__nv_bfloat16>(params, plan, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace deltakern
