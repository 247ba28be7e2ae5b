// The math prefix_attention's CPU and CUDA kernels share: the masking rule and the online
// softmax of one query row. Framework-free, host and device (nvcc) alike; acc_t is float, or
// double for the CPU kernels' fp64 (gradcheck) instantiation.
//
// Keys of a row are the P prefix keys (always visible) followed by the Lk input keys. Input key
// j (0-based) is visible to query i (0-based of Lq) when the key padding mask keeps it and, with
// causal masking, when j <= i + Lk - Lq: causal masking is aligned bottom-right, as in
// FlashAttention, so a query block that ends the sequence (decoding with a KV cache) sees every
// cached key. A row with no visible key outputs zeros and its log-sum-exp is -inf.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "deltakern/hd.h"

namespace deltakern {

template <typename acc_t>
DELTAKERN_HD acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

template <typename acc_t>
DELTAKERN_HD acc_t exp_of(acc_t x) {
#if defined(__CUDA_ARCH__)
  return exp(x);  // CUDA's float and double overloads
#else
  return std::exp(x);
#endif
}

template <typename acc_t>
DELTAKERN_HD acc_t log_of(acc_t x) {
#if defined(__CUDA_ARCH__)
  return log(x);
#else
  return std::log(x);
#endif
}

// Exclusive end of the input keys query i may see under causal masking: keys j < end, clamped
// to [0, Lk]. Without causal masking every query sees all Lk input keys.
DELTAKERN_HD int64_t causal_key_end(int64_t i, int64_t Lq, int64_t Lk, bool causal) {
  if (!causal) return Lk;
  const int64_t end = i + Lk - Lq + 1;
  return end < 0 ? 0 : (end > Lk ? Lk : end);
}

// Whether input key j is visible to query i (padding aside).
DELTAKERN_HD bool input_key_visible(int64_t i, int64_t j, int64_t Lq, int64_t Lk, bool causal) {
  return j < causal_key_end(i, Lq, Lk, causal);
}

// Running max and sum of exp(score - max) of one query row over the key blocks seen so far.
template <typename acc_t>
struct SoftmaxRow {
  acc_t max = neg_inf<acc_t>();
  acc_t sum = acc_t(0);
};

// Starts a key block whose largest score for this row is block_max (scaled; masked scores are
// -inf). Returns the factor by which the caller multiplies the row's output accumulator; the
// running sum is rescaled here. Afterwards the caller adds softmax_weight(row, s) for each score
// s of the block to row.sum and to the accumulator (weighted by the value row).
template <typename acc_t>
DELTAKERN_HD acc_t softmax_rescale(SoftmaxRow<acc_t>& row, acc_t block_max) {
  const acc_t new_max = row.max > block_max ? row.max : block_max;
  if (new_max == neg_inf<acc_t>()) return acc_t(1);  // nothing visible yet: all zeros stay zeros
  const acc_t factor = row.max == neg_inf<acc_t>() ? acc_t(0) : exp_of(row.max - new_max);
  row.sum *= factor;
  row.max = new_max;
  return factor;
}

// exp(s - max) for a score of the current block; 0 for a masked score.
template <typename acc_t>
DELTAKERN_HD acc_t softmax_weight(const SoftmaxRow<acc_t>& row, acc_t s) {
  return s == neg_inf<acc_t>() ? acc_t(0) : exp_of(s - row.max);
}

// After the last block: the row's log-sum-exp (saved for backward; -inf for a row with no
// visible key) and the factor that normalises its accumulator (0 for such a row).
template <typename acc_t>
DELTAKERN_HD acc_t softmax_lse(const SoftmaxRow<acc_t>& row) {
  return row.sum > acc_t(0) ? row.max + log_of(row.sum) : neg_inf<acc_t>();
}

template <typename acc_t>
DELTAKERN_HD acc_t softmax_inv_sum(const SoftmaxRow<acc_t>& row) {
  return row.sum > acc_t(0) ? acc_t(1) / row.sum : acc_t(0);
}

// Backward: the probability of a score from the saved log-sum-exp; 0 for a masked score or a
// row with no visible key (so such rows give no gradient and never a NaN).
template <typename acc_t>
DELTAKERN_HD acc_t softmax_prob(acc_t s, acc_t lse) {
  return (s == neg_inf<acc_t>() || lse == neg_inf<acc_t>()) ? acc_t(0) : exp_of(s - lse);
}

}  // namespace deltakern
