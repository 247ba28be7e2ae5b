// Plain parameter structs of the prefix_attention CUDA kernels: pointers, sizes and flags, no
// framework types, so the CUDA sources compile without torch headers.
//
// Layouts (all row-major and contiguous, element strides derived from the sizes):
//   q, out, grad_out   [B, Hq, Lq, D]          dtype
//   k, v               [B, Hkv, Lk, D]         dtype
//   prefix_k, prefix_v [Hkv, P, D] (prefix_shared) or [B, Hkv, P, D]   dtype
//   key_padding_mask   [B, Lk] bytes, nonzero = keep; nullptr = keep every key
//   lse, delta         [B, Hq, Lq]             fp32
// Query head h reads kv head h / (Hq / Hkv). Keys of a query row are the P prefix keys (always
// visible) followed by the Lk input keys (padding and bottom-right causal masks, attention.h).
#pragma once

#include <cstdint>

#include "deltakern/dtype.h"

namespace deltakern {

// The inputs and the problem shape, shared by the forward and the backward.
struct PrefixAttentionProblem {
  const void* q;
  const void* k;
  const void* v;
  const void* prefix_k;
  const void* prefix_v;
  const uint8_t* key_padding_mask;  // may be nullptr
  int64_t B, Hq, Hkv, Lq, Lk, P, D;
  bool prefix_shared;  // prefix is [Hkv, P, D], one for the whole batch
  bool causal;
  float scale;  // scores are (q . k) * scale
  DType dtype;
};

// Forward: out = softmax(q [Pk; k]^T * scale + mask) [Pv; v] and the row log-sum-exp.
// Every element of out and lse is written; a row with no visible key gets out 0, lse -inf.
struct PrefixAttentionFwdParams {
  PrefixAttentionProblem in;
  void* out;   // [B, Hq, Lq, D], dtype
  float* lse;  // [B, Hq, Lq]
};

// Backward (FlashAttention-2 style, from the saved out and lse).
//   dq, dk, dv: every element is written (dtype).
//   dprefix_k_acc, dprefix_v_acc: fp32 buffers of the prefix's shape, ZEROED by the caller; the
//     kernel adds into them with atomics (the B batch elements of a shared prefix meet there).
//   delta: fp32 workspace [B, Hq, Lq], overwritten (rowsum(grad_out * out)).
struct PrefixAttentionBwdParams {
  PrefixAttentionProblem in;
  const void* grad_out;  // [B, Hq, Lq, D], dtype
  const void* out;       // [B, Hq, Lq, D], dtype
  const float* lse;      // [B, Hq, Lq]
  float* delta;          // [B, Hq, Lq] workspace
  void* dq;              // [B, Hq, Lq, D], dtype
  void* dk;              // [B, Hkv, Lk, D], dtype
  void* dv;              // [B, Hkv, Lk, D], dtype
  float* dprefix_k_acc;  // prefix shape, fp32, zeroed
  float* dprefix_v_acc;  // prefix shape, fp32, zeroed
};

}  // namespace deltakern
