// Host emulation of lora_linear's CUDA dropout kernels (csrc/cuda/lora_linear.cu), for machines
// without a GPU. Built by tests/csrc/test_lora_cuda_host.py with
//   nvcc -O2 -std=c++20 -shared -Xcompiler -fPIC -Icsrc/include -Icsrc/cuda ...
// and driven through ctypes.
//
// The kernels are thin wrappers around __host__ __device__ bodies that see blockIdx, gridDim and
// threadIdx only through a column_sum::Lane. This file includes the very source the GPU build
// compiles and runs those bodies with the launchers' own plans (shrink_plan, backward_plan:
// grid, block size, shared memory, the kVec instantiation), or a caller's smaller grid:
//   shrink     shrink_body with HostSync: one block is kShrinkThreads (256) std::threads,
//              __syncthreads is a std::barrier of them, and the warp sum is the GPU's xor-shuffle
//              butterfly (v += shfl_xor(v, 16), 8, 4, 2, 1) evaluated on the 32 lanes' values,
//              which each lane publishes in its warp's slots before a barrier of the warp: the
//              same fp32 additions in the same order, so the same bits in every lane. The threads
//              walk the grid's blocks in the same order; the body's block syncs are block-uniform
//              and its warp sums warp-uniform, so the barriers' phases line up block by block. Each
//              block has its own shared memory of plan.shared_bytes plus a guard, all NaN before
//              the launch: a staged value read before it was written shows as NaN in xa, and a
//              write past the plan's bytes fails the call.
//   backward   dropout_backward_body (no sync, no shared memory): lanes one after another.
#include <barrier>
#include <bit>
#include <cstdint>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "../../csrc/cuda/lora_linear.cu"
#include "column_sum_host.h"

namespace deltakern {
namespace lora_host {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = kShrinkThreads / kWarpSize;
static_assert(kBackwardThreads == column_sum::kThreads, "lanes_host runs column_sum::kThreads lanes per block");

// The warps' barriers and exchange slots of the emulated block (shared by the blocks a launch
// walks through). Two slot buffers, used in turn: a lane writes buffer b again only after the
// barrier of the next warp sum, which every lane reaches only after reading buffer b.
struct Warps {
  Warps() {
    for (auto& w : barrier) w = std::make_unique<std::barrier<>>(kWarpSize);
  }
  std::unique_ptr<std::barrier<>> barrier[kWarpsPerBlock];
  float slots[kWarpsPerBlock][2][kWarpSize];
};

// What shrink_body calls for __syncthreads and the warp's shuffle sum, for one emulated thread.
// __host__ __device__ only so that nvcc's device pass accepts the calls from the body; nothing on
// the device uses it.
struct HostSync {
  std::barrier<>* block_barrier;
  Warps* warps;
  int tid;
  int* turn;  // this thread's count of warp sums, mod 2: the slot buffer to use

  __host__ __device__ void block() const {
#if !defined(__CUDA_ARCH__)
    block_barrier->arrive_and_wait();
#endif
  }
  __host__ __device__ float warp_sum(float v) const {
#if !defined(__CUDA_ARCH__)
    const int w = tid / kWarpSize, lane = tid % kWarpSize;
    float* slots = warps->slots[w][*turn];
    *turn ^= 1;
    slots[lane] = v;
    warps->barrier[w]->arrive_and_wait();
    // The butterfly: after the step with offset o, lane i holds t[i] + t[i ^ o] (fp32 addition
    // commutes, so both lanes of a pair hold the same bits).
    float t[kWarpSize], u[kWarpSize];
    for (int i = 0; i < kWarpSize; ++i) t[i] = slots[i];
    for (int o = 16; o > 0; o /= 2) {
      for (int i = 0; i < kWarpSize; ++i) u[i] = t[i] + t[i ^ o];
      for (int i = 0; i < kWarpSize; ++i) t[i] = u[i];
    }
    v = t[lane];
#endif
    return v;
  }
};

// The shared memory of one emulated block: plan.shared_bytes, then kGuardFloats, all NaN.
struct SharedBlock {
  static constexpr size_t kGuardFloats = 1024;
  explicit SharedBlock(int64_t shared_bytes)
      : n_floats(static_cast<size_t>(shared_bytes) / sizeof(float)),
        v((n_floats + kGuardFloats + 3) / 4) {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::fill(v.begin(), v.end(), float4{nan, nan, nan, nan});
  }
  float* floats() { return reinterpret_cast<float*>(v.data()); }
  bool guard_intact() {
    const uint32_t nan_bits = std::bit_cast<uint32_t>(std::numeric_limits<float>::quiet_NaN());
    const float* f = floats();
    for (size_t i = n_floats; i < v.size() * 4; ++i) {
      if (std::bit_cast<uint32_t>(f[i]) != nan_bits) return false;
    }
    return true;
  }
  size_t n_floats;
  std::vector<float4> v;  // 16-byte aligned, like __shared__ memory
};

// f(T{}, kVec) for dtype and vec; 1 for an unknown dtype.
template <typename F>
int with_dtype_vec(int dtype, bool vec, F&& f) {
  const cudaError_t err = column_sum::with_type(static_cast<DType>(dtype), [&](auto zero) {
    if (vec) {
      f(zero, std::true_type{});
    } else {
      f(zero, std::false_type{});
    }
    return cudaSuccess;
  });
  return err == cudaSuccess ? 0 : 1;
}

void export_plan(const LaunchPlan& p, int64_t* out) {
  const int64_t values[6] = {p.launch, p.grid_x, p.grid_y, p.threads, p.shared_bytes, p.vec};
  for (int k = 0; k < 6; ++k) out[k] = values[k];
}

LoraShrinkParams shrink_params(int dtype, const void* x, const void* A, void* xa, int64_t M, int64_t K, int64_t R,
                               float dropout_p, float keep_scale, uint64_t seed) {
  return {x, A, xa, M, K, R, dropout_p, keep_scale, seed, static_cast<DType>(dtype)};
}

LoraDropoutBackwardParams backward_params(int dtype, const void* x, void* dx, void* xd, int64_t M, int64_t K,
                                          float dropout_p, float keep_scale, uint64_t seed) {
  return {x, dx, xd, M, K, dropout_p, keep_scale, seed, static_cast<DType>(dtype)};
}

}  // namespace
}  // namespace lora_host
}  // namespace deltakern

// ---------------------------------------------------------------------------------------
// C entry points. Tensors are contiguous and row-major, in the layouts of lora_linear.cuh; dtype
// is deltakern::DType (0 fp32, 1 fp16, 2 bf16). A plan is {launch, grid_x, grid_y, threads,
// shared_bytes, vec}. (grid_x, grid_y) is the emulated gridDim, or the plan's grid when grid_x <= 0.
// The runs return 0 (also when the plan launches nothing: nothing is run, as the launcher), 1 for
// an unknown dtype, or 2 if a block wrote past its shared memory.

using namespace deltakern;
using namespace deltakern::lora_host;

extern "C" void dk_lora_host_shrink_plan(int dtype, const void* x, int64_t M, int64_t K, int64_t R, int64_t* out) {
  export_plan(shrink_plan(shrink_params(dtype, x, nullptr, nullptr, M, K, R, 0.f, 1.f, 0)), out);
}

extern "C" void dk_lora_host_backward_plan(int dtype, const void* x, const void* dx, const void* xd, int64_t M,
                                           int64_t K, int64_t* out) {
  export_plan(backward_plan(backward_params(dtype, x, const_cast<void*>(dx), const_cast<void*>(xd), M, K, 0.f, 1.f, 0)),
              out);
}

// launch_lora_dropout_shrink: xa[M, R] = drop(x)[M, K] @ A[R, K]^T.
extern "C" int dk_lora_host_shrink(int dtype, const void* x, const void* A, void* xa, int64_t M, int64_t K, int64_t R,
                                   float dropout_p, float keep_scale, uint64_t seed, int64_t grid_x, int64_t grid_y) {
  const LoraShrinkParams prm = shrink_params(dtype, x, A, xa, M, K, R, dropout_p, keep_scale, seed);
  const LaunchPlan plan = shrink_plan(prm);
  if (!plan.launch) return 0;
  if (grid_x <= 0) grid_x = plan.grid_x, grid_y = plan.grid_y;
  if (grid_y <= 0) return 1;
  std::vector<std::unique_ptr<SharedBlock>> shared;
  for (int64_t b = 0; b < grid_x * grid_y; ++b) shared.push_back(std::make_unique<SharedBlock>(plan.shared_bytes));
  const int err = with_dtype_vec(dtype, plan.vec, [&](auto zero, auto vec) {
    using T = decltype(zero);
    constexpr bool kVec = decltype(vec)::value;
    std::barrier<> block_barrier(plan.threads);
    Warps warps;
    std::vector<std::thread> threads;
    threads.reserve(static_cast<size_t>(plan.threads));
    for (int tid = 0; tid < plan.threads; ++tid) {
      threads.emplace_back([&, tid] {
        int turn = 0;
        const HostSync sync{&block_barrier, &warps, tid, &turn};
        for (int64_t by = 0; by < grid_y; ++by) {
          for (int64_t bx = 0; bx < grid_x; ++bx) {
            float* xs = shared[static_cast<size_t>(by * grid_x + bx)]->floats();
            shrink_body<T, kVec>(Lane{bx, by, grid_x, grid_y, tid}, sync, reinterpret_cast<float (*)[kShrinkChunk]>(xs),
                                 static_cast<const T*>(x), static_cast<const T*>(A), static_cast<T*>(xa), M, K, R,
                                 dropout_p, keep_scale, seed);
          }
        }
      });
    }
    for (std::thread& t : threads) t.join();
  });
  if (err != 0) return err;
  for (const auto& s : shared) {
    if (!s->guard_intact()) return 2;
  }
  return 0;
}

// launch_lora_dropout_backward: dx *= f in place, x_dropped = f x, f = keep ? keep_scale : 0.
extern "C" int dk_lora_host_backward(int dtype, const void* x, void* dx, void* x_dropped, int64_t M, int64_t K,
                                     float dropout_p, float keep_scale, uint64_t seed, int64_t grid_x) {
  const LoraDropoutBackwardParams prm = backward_params(dtype, x, dx, x_dropped, M, K, dropout_p, keep_scale, seed);
  const LaunchPlan plan = backward_plan(prm);
  if (!plan.launch) return 0;
  if (grid_x <= 0) grid_x = plan.grid_x;
  const int64_t n = M * K;
  return with_dtype_vec(dtype, plan.vec, [&](auto zero, auto vec) {
    using T = decltype(zero);
    constexpr bool kVec = decltype(vec)::value;
    host_harness::lanes_host(grid_x, plan.grid_y, [&](const Lane& l) {
      dropout_backward_body<T, kVec>(l, static_cast<const T*>(x), static_cast<T*>(dx), static_cast<T*>(x_dropped), n,
                                     dropout_p, keep_scale, seed);
    });
  });
}
