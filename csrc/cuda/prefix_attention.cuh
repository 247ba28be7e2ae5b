// Launchers of the prefix_attention CUDA kernels (csrc/cuda/prefix_attention.cu).
// Framework-free: raw pointers in the params structs of deltakern/prefix_attention_params.h and
// a cudaStream_t, so the torch glue (prefix_attention_cuda.cpp) and the kernels compile apart.
#pragma once

#include <cuda_runtime.h>

#include "deltakern/prefix_attention_params.h"

namespace deltakern {

// Largest head dimension the kernels take (they are instantiated for D <= 64 and D <= 128).
constexpr int64_t kPrefixAttentionMaxHeadDim = 128;

// Forward. Writes every element of out [B, Hq, Lq, D] and lse [B, Hq, Lq] (fp32): a row with
// no visible key gets zeros and -inf. B * Hq * Lq == 0 launches nothing. Accumulates in fp32.
// Returns the launch error (cudaGetLastError), or cudaErrorInvalidValue for an unknown dtype
// or D > kPrefixAttentionMaxHeadDim.
cudaError_t launch_prefix_attention_fwd(const PrefixAttentionFwdParams& params,
                                        cudaStream_t stream);

// Backward: delta = rowsum(grad_out * out), then dq (one pass per query tile, no atomics), then
// dk, dv and the prefix gradients (one pass per key tile over every query of its kv head's
// query heads). Writes every element of dq, dk and dv; ADDS into the zeroed fp32
// dprefix_k_acc / dprefix_v_acc (atomics; a shared prefix sums over the batch). Sizes that
// leave nothing to compute launch nothing (and, e.g. for Lq == 0, dk and dv are written as 0).
// Returns as launch_prefix_attention_fwd.
cudaError_t launch_prefix_attention_bwd(const PrefixAttentionBwdParams& params,
                                        cudaStream_t stream);

}  // namespace deltakern
