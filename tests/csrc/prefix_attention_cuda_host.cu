// Host emulation of the prefix_attention CUDA kernels (csrc/cuda/prefix_attention.cu), for
// machines without a GPU. Built by tests/csrc/test_prefix_attention_cuda_host.py with
//   nvcc -O2 -std=c++20 -shared -Xcompiler -fPIC -Icsrc/include -Icsrc/cuda ...
// and driven through ctypes.
//
// The kernels' per-block bodies (forward_block, delta_block, dq_block, dkdv_block) are
// __host__ __device__ templates over an execution context. This file includes the very source
// the GPU build compiles and instantiates those bodies with HostCtx: one CUDA block of kThreads
// (128) threads is 128 std::threads, and
//   sync_block()       = a std::barrier of the block's 128 threads (__syncthreads),
//   sync_warp()        = a std::barrier of the warp's 32 threads (__syncwarp),
//   warp_max/warp_sum  = each lane writes its value to the warp's scratch slot, warp barrier,
//                        every lane reduces the 32 slots (same order, so the same result in
//                        every lane, like the xor-shuffle butterfly), warp barrier again before
//                        the scratch is reused,
//   atomic_add         = std::atomic_ref<float>::fetch_add (the B blocks of a batch-shared
//                        prefix tile add into the same accumulators when several blocks run).
// A "launch" starts n_blocks emulated blocks at once (n_blocks * 128 threads, each block with
// its own barriers and dynamic shared memory) that grid-stride over the tiles exactly as the
// __global__ kernels do (t = blockIdx.x; t < n_tiles; t += gridDim.x), and joins them; the
// backward runs delta, dQ, dK/dV in that order, as bwd_typed launches them. Dynamic shared
// memory is a 16-byte aligned host buffer of the kernel's *_smem_floats<kD>() floats plus a
// guard, all filled with NaN before the launch: reading a float no staging wrote (or one past
// the declared size) shows up as NaN in the results, and a write into the guard fails the call.
#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "../../csrc/cuda/prefix_attention.cu"

namespace deltakern {
namespace pa {
namespace {

// State one emulated block shares among its threads: barriers, warp scratch, shared memory.
// The dynamic shared memory is followed by a guard of kGuardFloats; all of it starts as NaN, so
// a read past the kernel's *_smem_floats<kD>() shows up as NaN in the results and a write there
// is caught by guard_intact() after the launch.
struct HostBlock {
  static constexpr size_t kGuardFloats = 1024;
  explicit HostBlock(size_t smem_floats)
      : block(kThreads), n_floats(smem_floats), smem((smem_floats + kGuardFloats + 3) / 4) {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::fill(smem.begin(), smem.end(), float4{nan, nan, nan, nan});
    for (int w = 0; w < kWarps; ++w) warp[w] = std::make_unique<std::barrier<>>(kWarpSize);
  }
  float* smem_floats() { return reinterpret_cast<float*>(smem.data()); }
  bool guard_intact() {
    const uint32_t nan_bits = std::bit_cast<uint32_t>(std::numeric_limits<float>::quiet_NaN());
    const float* f = smem_floats();
    for (size_t i = n_floats; i < smem.size() * 4; ++i) {
      if (std::bit_cast<uint32_t>(f[i]) != nan_bits) return false;
    }
    return true;
  }

  std::barrier<> block;
  std::unique_ptr<std::barrier<>> warp[kWarps];
  float scratch[kWarps][kWarpSize];
  size_t n_floats;
  std::vector<float4> smem;  // float4: 16-byte aligned, like the kernels' extern __shared__ float4
};

// The execution context of the block bodies on the host: one per emulated thread. The methods
// are __host__ __device__ only so that nvcc's device pass accepts their calls from the
// __host__ __device__ block bodies; nothing on the device uses HostCtx, and that pass sees
// empty bodies.
struct HostCtx {
  int tid;
  HostBlock* blk;

  __host__ __device__ void sync_block() const {
#if !defined(__CUDA_ARCH__)
    blk->block.arrive_and_wait();
#endif
  }
  __host__ __device__ void sync_warp() const {
#if !defined(__CUDA_ARCH__)
    blk->warp[tid / kWarpSize]->arrive_and_wait();
#endif
  }
  // Lane l writes slot l of its warp's scratch, the warp meets, every lane folds slots 0 .. 31
  // in the same order (so every lane gets the same value, as after the xor-shuffle butterfly),
  // and the warp meets again before the next reduction may overwrite the slots.
  __host__ __device__ float warp_max(float v) const {
#if !defined(__CUDA_ARCH__)
    const float* slots = publish(v);
    v = slots[0];
    for (int l = 1; l < kWarpSize; ++l) v = slots[l] > v ? slots[l] : v;
    sync_warp();
#endif
    return v;
  }
  __host__ __device__ float warp_sum(float v) const {
#if !defined(__CUDA_ARCH__)
    const float* slots = publish(v);
    v = slots[0];
    for (int l = 1; l < kWarpSize; ++l) v += slots[l];
    sync_warp();
#endif
    return v;
  }
  // The B blocks of a batch-shared prefix tile add into the same floats when several emulated
  // blocks run at once (within a block every (key, column) belongs to one thread).
  __host__ __device__ void atomic_add(float* p, float v) const {
#if !defined(__CUDA_ARCH__)
    std::atomic_ref<float>(*p).fetch_add(v, std::memory_order_relaxed);
#endif
  }

#if !defined(__CUDA_ARCH__)
 private:
  const float* publish(float v) const {
    float* slots = blk->scratch[tid / kWarpSize];
    slots[tid % kWarpSize] = v;
    sync_warp();
    return slots;
  }
#endif
};

// Emulates kernel<<<n_blocks, kThreads, smem_floats * 4>>>(prm, n_tiles): body(t, smem, ctx)
// is the per-tile call of the kernel's grid-stride loop. False if a block wrote past its
// dynamic shared memory.
template <class Body>
bool launch_host(int64_t n_tiles, size_t smem_floats, int64_t n_blocks, Body body) {
  if (n_tiles <= 0) return true;  // as launch(): nothing to do
  n_blocks = std::max<int64_t>(1, std::min(n_blocks, std::min(n_tiles, kMaxBlocks)));
  std::vector<std::unique_ptr<HostBlock>> blocks;
  for (int64_t b = 0; b < n_blocks; ++b) blocks.push_back(std::make_unique<HostBlock>(smem_floats));
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(n_blocks * kThreads));
  for (int64_t bx = 0; bx < n_blocks; ++bx) {
    HostBlock* blk = blocks[static_cast<size_t>(bx)].get();
    for (int tid = 0; tid < kThreads; ++tid) {
      threads.emplace_back([=, &body] {
        const HostCtx ctx{tid, blk};
        for (int64_t t = bx; t < n_tiles; t += n_blocks) body(t, blk->smem_floats(), ctx);
      });
    }
  }
  for (std::thread& th : threads) th.join();
  return std::all_of(blocks.begin(), blocks.end(), [](const auto& b) { return b->guard_intact(); });
}

template <typename T, int kD>
bool fwd_host(const PrefixAttentionFwdParams& prm, int64_t n_blocks) {
  return launch_host(query_tiles(prm.in), fwd_smem_floats<kD>(), n_blocks,
                     [&](int64_t t, float* smem, const HostCtx& ctx) {
                       forward_block<T, kD>(prm, t, smem, ctx);
                     });
}

// delta, dQ, dK/dV, in bwd_typed's order (each launch is joined before the next starts).
template <typename T, int kD>
bool bwd_host(const PrefixAttentionBwdParams& prm, int64_t n_blocks) {
  bool ok = launch_host(delta_tiles(prm.in), 0, n_blocks, [&](int64_t t, float*, const HostCtx& ctx) {
    delta_block<T>(prm, t, ctx);
  });
  ok &= launch_host(query_tiles(prm.in), dq_smem_floats<kD>(), n_blocks,
                    [&](int64_t t, float* smem, const HostCtx& ctx) {
                      dq_block<T, kD>(prm, t, smem, ctx);
                    });
  ok &= launch_host(key_tiles(prm.in), dkdv_smem_floats<kD>(), n_blocks,
                    [&](int64_t t, float* smem, const HostCtx& ctx) {
                      dkdv_block<T, kD>(prm, t, smem, ctx);
                    });
  return ok;
}

PrefixAttentionProblem make_problem(const void* q, const void* k, const void* v,
                                    const void* prefix_k, const void* prefix_v,
                                    const uint8_t* key_padding_mask, int64_t B, int64_t Hq,
                                    int64_t Hkv, int64_t Lq, int64_t Lk, int64_t P, int64_t D,
                                    int prefix_shared, int causal, float scale, int dtype) {
  PrefixAttentionProblem in{};
  in.q = q;
  in.k = k;
  in.v = v;
  in.prefix_k = prefix_k;
  in.prefix_v = prefix_v;
  in.key_padding_mask = key_padding_mask;
  in.B = B;
  in.Hq = Hq;
  in.Hkv = Hkv;
  in.Lq = Lq;
  in.Lk = Lk;
  in.P = P;
  in.D = D;
  in.prefix_shared = prefix_shared != 0;
  in.causal = causal != 0;
  in.scale = scale;
  in.dtype = static_cast<DType>(dtype);
  return in;
}

}  // namespace
}  // namespace pa
}  // namespace deltakern

// ---------------------------------------------------------------------------------------
// C entry points. Tensors are contiguous, in the layouts of prefix_attention_params.h; dtype is
// deltakern::DType (0 fp32, 1 fp16, 2 bf16); key_padding_mask is [B, Lk] bytes (nonzero =
// keep) or null. n_blocks is the emulated gridDim.x (capped at the tile count). Return 0; 1
// where launch_prefix_attention_{fwd,bwd} would return cudaErrorInvalidValue; 2 if a block
// wrote past its dynamic shared memory.

extern "C" int dk_pa_host_fwd(const void* q, const void* k, const void* v, const void* prefix_k,
                              const void* prefix_v, const uint8_t* key_padding_mask, int64_t B,
                              int64_t Hq, int64_t Hkv, int64_t Lq, int64_t Lk, int64_t P,
                              int64_t D, int prefix_shared, int causal, float scale, int dtype,
                              void* out, float* lse, int64_t n_blocks) {
  using namespace deltakern;
  using namespace deltakern::pa;
  PrefixAttentionFwdParams prm{};
  prm.in = make_problem(q, k, v, prefix_k, prefix_v, key_padding_mask, B, Hq, Hkv, Lq, Lk, P, D,
                        prefix_shared, causal, scale, dtype);
  prm.out = out;
  prm.lse = lse;
  // As launch_prefix_attention_fwd.
  if (!valid_problem(prm.in)) return 1;
  if (query_tiles(prm.in) == 0) return 0;
  const bool small = prm.in.D <= 64;
  bool ok;
  switch (prm.in.dtype) {
    case DType::kFloat32:
      ok = small ? fwd_host<float, 64>(prm, n_blocks) : fwd_host<float, 128>(prm, n_blocks);
      break;
    case DType::kFloat16:
      ok = small ? fwd_host<__half, 64>(prm, n_blocks) : fwd_host<__half, 128>(prm, n_blocks);
      break;
    case DType::kBFloat16:
      ok = small ? fwd_host<__nv_bfloat16, 64>(prm, n_blocks)
                 : fwd_host<__nv_bfloat16, 128>(prm, n_blocks);
      break;
    default:
      return 1;
  }
  return ok ? 0 : 2;
}

// dprefix_k_acc / dprefix_v_acc: fp32, the prefix's shape, zeroed by the caller (the kernel
// adds into them). delta: fp32 [B, Hq, Lq] workspace.
extern "C" int dk_pa_host_bwd(const void* q, const void* k, const void* v, const void* prefix_k,
                              const void* prefix_v, const uint8_t* key_padding_mask, int64_t B,
                              int64_t Hq, int64_t Hkv, int64_t Lq, int64_t Lk, int64_t P,
                              int64_t D, int prefix_shared, int causal, float scale, int dtype,
                              const void* grad_out, const void* out, const float* lse,
                              float* delta, void* dq, void* dk, void* dv, float* dprefix_k_acc,
                              float* dprefix_v_acc, int64_t n_blocks) {
  using namespace deltakern;
  using namespace deltakern::pa;
  PrefixAttentionBwdParams prm{};
  prm.in = make_problem(q, k, v, prefix_k, prefix_v, key_padding_mask, B, Hq, Hkv, Lq, Lk, P, D,
                        prefix_shared, causal, scale, dtype);
  prm.grad_out = grad_out;
  prm.out = out;
  prm.lse = lse;
  prm.delta = delta;
  prm.dq = dq;
  prm.dk = dk;
  prm.dv = dv;
  prm.dprefix_k_acc = dprefix_k_acc;
  prm.dprefix_v_acc = dprefix_v_acc;
  // As launch_prefix_attention_bwd.
  if (!valid_problem(prm.in)) return 1;
  if (prm.in.D == 0) return 0;
  const bool small = prm.in.D <= 64;
  bool ok;
  switch (prm.in.dtype) {
    case DType::kFloat32:
      ok = small ? bwd_host<float, 64>(prm, n_blocks) : bwd_host<float, 128>(prm, n_blocks);
      break;
    case DType::kFloat16:
      ok = small ? bwd_host<__half, 64>(prm, n_blocks) : bwd_host<__half, 128>(prm, n_blocks);
      break;
    case DType::kBFloat16:
      ok = small ? bwd_host<__nv_bfloat16, 64>(prm, n_blocks)
                 : bwd_host<__nv_bfloat16, 128>(prm, n_blocks);
      break;
    default:
      return 1;
  }
  return ok ? 0 : 2;
}
