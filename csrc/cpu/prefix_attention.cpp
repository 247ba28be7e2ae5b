// CPU kernels of prefix_attention: a blocked, flash-style forward and a FlashAttention-2 style
// backward. Keys are the P prefix keys, read in place from the [Hkv, P, D] (batch-shared) or
// [B, Hkv, P, D] prefix, followed by the Lk input keys; the prefix is never expanded over the
// batch nor concatenated with k, and no [Lq x Lk] buffer exists: every task works on one
// [query block x key block] tile at a time. The masking rule and the online softmax come from
// deltakern/attention.h, shared with the CUDA kernel.
//
// Block GEMMs run on raw pointers through brgemm (blocks.h: row-major C (+)= A B, oneDNN's
// microkernel, as in PyTorch's own CPU flash attention). It only multiplies untransposed
// operands, so the K and V blocks are transposed into small buffers once per block.
// bf16 blocks are converted to fp32 on load and every GEMM and softmax runs in fp32; fp64 (for
// gradcheck) uses plain loops.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "blocks.h"
#include "deltakern/attention.h"
#include "prefix_attention.h"
#include "vec16.h"

namespace deltakern {
namespace {

// NOTE rows per query block and per key block. Measured on 2 cores (Zen 4), fp32, B=4,
// Hq=Hkv=8, Lq=Lk=512, P=64, D=64, causal, forward + backward of all five inputs (interleaved
// medians of 11): 64 x 64 20.7 ms, 128 x 64 20.9 ms, 64 x 128 21.2 ms, 32 x 64 21.7 ms (the
// forward alone 6.4-7.2 ms). Larger key blocks waste more of the causal diagonal tiles: before
// the softmax was vectorized, 64 x 256 took 42 ms and 128 x 256 53 ms against 33 ms for 64 x 64.
// PEFT's way (prefix expanded and concatenated, dense mask, SDPA, autograd) takes 53 ms (16.5 ms
// forward), so the kernel runs the step in 0.39x its time (forward 0.40x).
constexpr int64_t kQueryBlock = 64;
constexpr int64_t kKeyBlock = 64;

// The softmax rows run in the 16-lane vectors of vec16.h: GCC 12 left the scalar loops
// unvectorized ("control flow in loop" from the exp's range select, and no vector type for the
// bool mask). Vectorizing them took the benchmark of the NOTE above from 32 ms to 20 ms
// (forward 11.2 ms to 6.4 ms).
using namespace vec16;

// exp(x) for the softmax arguments (x <= 0 up to rounding) within 2 ulp; exactly 0 for
// x < -87 and for -inf (a masked score), as softmax_weight/softmax_prob of attention.h give;
// NaN stays NaN. Cody-Waite reduction and the Cephes polynomial: exp_reduced of vec16.h.
DELTAKERN_ALWAYS_INLINE vfloat exp_score(vfloat x) {
  const vfloat xc = x < -87.0f ? splat(-87.0f) : x;
  vint n_int;
  const vfloat y = exp_reduced(xc, n_int);
  const vfloat pow2n = reinterpret_cast<vfloat>((n_int + 127) << 23);
  return x < -87.0f ? vfloat{} : y * pow2n;
}

DELTAKERN_ALWAYS_INLINE vfloat lane_index() {
  return vfloat{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
}

DELTAKERN_ALWAYS_INLINE float reduce_max(vfloat v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}

DELTAKERN_ALWAYS_INLINE float reduce_sum(vfloat v) {
  float sum = 0.0f;
  for (int i = 0; i < kLanes; ++i) sum += v[i];
  return sum;
}

// The row operations of the softmax tiles, in fp32 vectors and in plain fp64 loops. bias is
// 0 (keep) or -inf (padded) per key, nullptr when nothing is padded.

// s = s * scale + bias; returns the row maximum (-inf when every key is masked).
DELTAKERN_ALWAYS_INLINE float row_scale_max(float* s, int64_t n, const float* bias, float scale) {
  vfloat m = splat(neg_inf<float>());
  for_each_chunk(n, [&](int64_t c, int64_t count) __attribute__((always_inline)) {
    vfloat x = load_part(s + c, count, 0.0f) * scale;
    if (bias != nullptr) x += load_part(bias + c, count, 0.0f);
    if (count < kLanes) x = lane_index() < static_cast<float>(count) ? x : splat(neg_inf<float>());
    store_part(s + c, x, count);
    m = m > x ? m : x;
  });
  return reduce_max(m);
}

DELTAKERN_ALWAYS_INLINE double row_scale_max(double* s, int64_t n, const double* bias, double scale) {
  double m = neg_inf<double>();
  for (int64_t c = 0; c < n; ++c) {
    s[c] = s[c] * scale + (bias != nullptr ? bias[c] : 0.0);
    m = std::max(m, s[c]);
  }
  return m;
}

// s = softmax_weight(s) = exp(s - row_max) (0 for a masked -inf); returns the row sum.
DELTAKERN_ALWAYS_INLINE float row_exp_sum(float* s, int64_t n, float row_max) {
  vfloat sum{};
  for_each_chunk(n, [&](int64_t c, int64_t count) __attribute__((always_inline)) {
    const vfloat w = exp_score(load_part(s + c, count, neg_inf<float>()) - row_max);
    store_part(s + c, w, count);
    sum += w;
  });
  return reduce_sum(sum);
}

DELTAKERN_ALWAYS_INLINE double row_exp_sum(double* s, int64_t n, double row_max) {
  double sum = 0.0;
  for (int64_t c = 0; c < n; ++c) {
    s[c] = softmax_weight(SoftmaxRow<double>{row_max, 0.0}, s[c]);
    sum += s[c];
  }
  return sum;
}

// p = softmax_prob(s * scale + bias, lse) into s; dS = p (dp - di) scale into dp.
DELTAKERN_ALWAYS_INLINE void row_prob_grad(float* s, float* dp, int64_t n, const float* bias, float scale,
                                           float lse, float di) {
  for_each_chunk(n, [&](int64_t c, int64_t count) __attribute__((always_inline)) {
    vfloat x = load_part(s + c, count, 0.0f) * scale - lse;
    if (bias != nullptr) x += load_part(bias + c, count, 0.0f);
    const vfloat prob = exp_score(x);
    store_part(s + c, prob, count);
    store_part(dp + c, prob * (load_part(dp + c, count, 0.0f) - di) * scale, count);
  });
}

DELTAKERN_ALWAYS_INLINE void row_prob_grad(double* s, double* dp, int64_t n, const double* bias, double scale,
                                           double lse, double di) {
  for (int64_t c = 0; c < n; ++c) {
    const double prob = softmax_prob(s[c] * scale + (bias != nullptr ? bias[c] : 0.0), lse);
    s[c] = prob;
    dp[c] = prob * (dp[c] - di) * scale;
  }
}

// C[M, N] = (accumulate ? C : 0) + A[M, K] B[K, N]; row-major, leading dimensions lda/ldb/ldc.
inline void gemm_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                    int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  brgemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

inline void gemm_nn(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda,
                    const double* B, int64_t ldb, double* C, int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < M; ++i) {
    double* c = C + i * ldc;
    if (!accumulate) std::fill(c, c + N, 0.0);
    for (int64_t k = 0; k < K; ++k) {
      const double a = A[i * lda + k];
      const double* b = B + k * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

// n elements of src as acc_t: src itself when the types match, else converted into buf.
template <typename scalar_t, typename acc_t>
const acc_t* as_acc(const scalar_t* src, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(src[i]);
    return buf;
  }
}

// Where an accumulator of n elements lives: in the output itself when it has the accumulation
// type (fp32, fp64), else (bf16) in buf, stored to the output by store_acc.
template <typename scalar_t, typename acc_t>
acc_t* acc_target(scalar_t* out, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return out;
  } else {
    return buf;
  }
}

template <typename scalar_t, typename acc_t>
void store_acc(const acc_t* acc, int64_t n, scalar_t* out) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(acc[i]);
  }
}

// The problem, on the raw pointers of contiguous tensors.
template <typename scalar_t>
struct Problem {
  const scalar_t *q, *k, *v, *prefix_k, *prefix_v;
  const bool* keep;  // key_padding_mask [B, Lk], True = keep; nullptr keeps every key
  int64_t B, Hq, Hkv, Lq, Lk, P, D;
  bool shared_prefix, causal;

  int64_t group() const { return Hq / Hkv; }
  int64_t q_offset(int64_t b, int64_t h, int64_t i) const { return ((b * Hq + h) * Lq + i) * D; }
  int64_t k_offset(int64_t b, int64_t g, int64_t j) const { return ((b * Hkv + g) * Lk + j) * D; }
  int64_t prefix_offset(int64_t b, int64_t g, int64_t p) const {
    return ((shared_prefix ? g : b * Hkv + g) * P + p) * D;
  }
  int64_t row(int64_t b, int64_t h, int64_t i) const { return (b * Hq + h) * Lq + i; }
  // Whether the padding mask keeps any of the input keys [j0, j0 + n) of batch element b.
  bool any_kept(int64_t b, int64_t j0, int64_t n) const {
    if (keep == nullptr) return true;
    const bool* m = keep + b * Lk + j0;
    return std::any_of(m, m + n, [](bool x) { return x; });
  }
  // First query that sees input key j0 (causal_key_end(i) > j0), Lq when none does.
  int64_t first_query_seeing(int64_t j0) const {
    if (!causal) return 0;
    return std::min(Lq, std::max<int64_t>(0, j0 - Lk + Lq));
  }
};

// Which keys the rows of a [qn x kn] score tile see: all of a prefix tile; of an input tile
// starting at key j0, those before the row's causal end (attention.h) that the padding mask
// keeps (bias 0, -inf for a padded key; nullptr when none of the tile's keys is padded).
template <typename acc_t>
struct TileMask {
  bool prefix;
  int64_t i0, j0, Lq, Lk;
  bool causal;
  const acc_t* bias;

  int64_t limit(int64_t r, int64_t kn) const {
    if (prefix) return kn;
    return std::clamp<int64_t>(causal_key_end(i0 + r, Lq, Lk, causal) - j0, 0, kn);
  }
};

// bias of the input keys [j0, j0 + kn) of batch element b into buf; nullptr when all are kept.
template <typename scalar_t, typename acc_t>
const acc_t* padding_bias(const Problem<scalar_t>& p, int64_t b, int64_t j0, int64_t kn, acc_t* buf) {
  if (p.keep == nullptr) return nullptr;
  const bool* keep = p.keep + b * p.Lk + j0;
  if (std::all_of(keep, keep + kn, [](bool x) { return x; })) return nullptr;
  for (int64_t c = 0; c < kn; ++c) buf[c] = keep[c] ? acc_t(0) : neg_inf<acc_t>();
  return buf;
}

// Forward: one tile of scores S [qn x kn] through the online softmax (attention.h): scales and
// masks S, updates the row statistics, rescales the output accumulator O [qn x D] (when given)
// and leaves in S the weights softmax_weight(row, s) that O accumulates against V.
template <typename acc_t>
DELTAKERN_ALWAYS_INLINE void softmax_tile_impl(acc_t* S, int64_t qn, int64_t kn, const TileMask<acc_t>& m,
                                               acc_t scale, SoftmaxRow<acc_t>* rows, acc_t* O,
                                               int64_t D) {
  for (int64_t r = 0; r < qn; ++r) {
    acc_t* s = S + r * kn;
    const int64_t limit = m.limit(r, kn);
    std::fill(s + limit, s + kn, acc_t(0));  // causally masked: weight 0
    const acc_t factor = softmax_rescale(rows[r], row_scale_max(s, limit, m.bias, scale));
    if (rows[r].max == neg_inf<acc_t>()) {  // no key of the row visible yet: weights 0, O stays 0
      std::fill(s, s + limit, acc_t(0));
      continue;
    }
    rows[r].sum += row_exp_sum(s, limit, rows[r].max);
    if (O != nullptr && factor != acc_t(1)) {
      acc_t* o = O + r * D;
      for (int64_t d = 0; d < D; ++d) o[d] *= factor;
    }
  }
}

// Backward: from the recomputed scores S and dP = dO Vᵀ of a tile, the probabilities
// P = softmax_prob(s, lse) (into S) and dS = P (dP - D_i) scale (into dP). A masked key, or a
// row without any visible key (lse = -inf), gets P = dS = 0.
template <typename acc_t>
DELTAKERN_ALWAYS_INLINE void softmax_grad_tile_impl(acc_t* S, acc_t* dP, int64_t qn, int64_t kn,
                                                    const TileMask<acc_t>& m, acc_t scale,
                                                    const acc_t* lse, const acc_t* Di) {
  for (int64_t r = 0; r < qn; ++r) {
    acc_t* s = S + r * kn;
    acc_t* dp = dP + r * kn;
    const int64_t limit = lse[r] == neg_inf<acc_t>() ? 0 : m.limit(r, kn);
    row_prob_grad(s, dp, limit, m.bias, scale, lse[r], Di[r]);
    std::fill(s + limit, s + kn, acc_t(0));
    std::fill(dp + limit, dp + kn, acc_t(0));
  }
}

// The fp32 instantiations are DELTAKERN_CLONES (vec16.h).
DELTAKERN_CLONES void softmax_tile(
    float* S, int64_t qn, int64_t kn, const TileMask<float>& m, float scale, SoftmaxRow<float>* rows,
    float* O, int64_t D) {
  softmax_tile_impl(S, qn, kn, m, scale, rows, O, D);
}

void softmax_tile(double* S, int64_t qn, int64_t kn, const TileMask<double>& m, double scale,
                  SoftmaxRow<double>* rows, double* O, int64_t D) {
  softmax_tile_impl(S, qn, kn, m, scale, rows, O, D);
}

DELTAKERN_CLONES void softmax_grad_tile(
    float* S, float* dP, int64_t qn, int64_t kn, const TileMask<float>& m, float scale, const float* lse,
    const float* Di) {
  softmax_grad_tile_impl(S, dP, qn, kn, m, scale, lse, Di);
}

void softmax_grad_tile(double* S, double* dP, int64_t qn, int64_t kn, const TileMask<double>& m,
                       double scale, const double* lse, const double* Di) {
  softmax_grad_tile_impl(S, dP, qn, kn, m, scale, lse, Di);
}

// The forward over all (batch, query head, query block) tasks: out (when not null) in
// scalar_t and the row log-sum-exp in lse_t (fp32 for the op; fp64 when the fp64 backward
// recomputes it, see prefix_attention_bwd_cpu).
template <typename scalar_t, typename lse_t>
void forward_kernel(const Problem<scalar_t>& p, double scale_d, scalar_t* out, lse_t* lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const int64_t D = p.D, group = p.group();
  const int64_t n_qblocks = (p.Lq + kQueryBlock - 1) / kQueryBlock;
  at::parallel_for(0, p.B * p.Hq * n_qblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q_buf(kQueryBlock * D), kt_buf(D * kKeyBlock), v_buf(kKeyBlock * D), bias_buf(kKeyBlock);
    std::vector<acc_t> S(kQueryBlock * kKeyBlock), O(kQueryBlock * D);
    std::vector<SoftmaxRow<acc_t>> rows(kQueryBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qblock = task % n_qblocks, bh = task / n_qblocks;
      const int64_t b = bh / p.Hq, h = bh % p.Hq, g = h / group;
      const int64_t i0 = qblock * kQueryBlock, qn = std::min(kQueryBlock, p.Lq - i0);
      const acc_t* Q = as_acc(p.q + p.q_offset(b, h, i0), qn * D, q_buf.data());
      std::fill(O.begin(), O.begin() + qn * D, acc_t(0));
      std::fill(rows.begin(), rows.begin() + qn, SoftmaxRow<acc_t>{});
      acc_t* O_or_null = out != nullptr ? O.data() : nullptr;

      auto tile = [&](const scalar_t* k_rows, const scalar_t* v_rows, int64_t kn, const TileMask<acc_t>& m) {
        transpose_into(k_rows, kn, D, D, kt_buf.data());
        gemm_nn(qn, kn, D, Q, D, kt_buf.data(), kn, S.data(), kn, false);
        softmax_tile(S.data(), qn, kn, m, scale, rows.data(), O_or_null, D);
        if (out != nullptr) {
          const acc_t* V = as_acc(v_rows, kn * D, v_buf.data());
          gemm_nn(qn, D, kn, S.data(), kn, V, D, O.data(), D, true);
        }
      };
      // The prefix: visible to every query, read in place from the (shared) prefix tensors.
      for_each_block(0, p.P, kKeyBlock, [&](int64_t j0, int64_t kn) {
        const int64_t off = p.prefix_offset(b, g, j0);
        tile(p.prefix_k + off, p.prefix_v + off, kn, TileMask<acc_t>{true, i0, j0, p.Lq, p.Lk, p.causal, nullptr});
      });
      // The input keys up to the causal end of the block's last query; key blocks that the
      // padding mask hides entirely are skipped.
      const int64_t key_end = causal_key_end(i0 + qn - 1, p.Lq, p.Lk, p.causal);
      for_each_block(0, key_end, kKeyBlock, [&](int64_t j0, int64_t kn) {
        if (!p.any_kept(b, j0, kn)) return;
        const int64_t off = p.k_offset(b, g, j0);
        const acc_t* bias = padding_bias(p, b, j0, kn, bias_buf.data());
        tile(p.k + off, p.v + off, kn, TileMask<acc_t>{false, i0, j0, p.Lq, p.Lk, p.causal, bias});
      });

      for (int64_t r = 0; r < qn; ++r) {
        lse[p.row(b, h, i0 + r)] = static_cast<lse_t>(softmax_lse(rows[r]));
        if (out != nullptr) {
          const acc_t inv_sum = softmax_inv_sum(rows[r]);
          scalar_t* o = out + p.q_offset(b, h, i0 + r);
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(O[r * D + d] * inv_sum);
        }
      }
    }
  });
}

// Per-thread buffers of the backward tasks.
template <typename acc_t>
struct BackwardScratch {
  std::vector<acc_t> kt, vt, k, q, dout, S, dP, T, dk, dv, bias;
  BackwardScratch(int64_t D)
      : kt(D * kKeyBlock), vt(D * kKeyBlock), k(kKeyBlock * D), q(kQueryBlock * D),
        dout(kQueryBlock * D), S(kQueryBlock * kKeyBlock), dP(kQueryBlock * kKeyBlock),
        T(kKeyBlock * kQueryBlock), dk(kKeyBlock * D), dv(kKeyBlock * D), bias(kKeyBlock) {}
};

// The backward through one key block (kn rows of K and V, of kv head g) for the query blocks
// of batch element b and query heads of g that see it:
//   S = Q Kᵀ, dP = dO Vᵀ, P = softmax_prob(S), dS = P (dP - D_i) scale,
//   dV += Pᵀ dO and dK += dSᵀ Q into dK/dV (when not null), dQ += dS K into dQ (when not null,
//   rows of the task's query heads [group, Lq, D]).
template <typename scalar_t, typename acc_t>
void backward_key_block(const Problem<scalar_t>& p, const scalar_t* grad_out, const acc_t* lse,
                        const acc_t* Di, acc_t scale, int64_t b, int64_t g, const scalar_t* k_rows,
                        const scalar_t* v_rows, int64_t kn, bool prefix, int64_t j0,
                        BackwardScratch<acc_t>& w, acc_t* dK, acc_t* dV, acc_t* dQ) {
  const int64_t D = p.D, group = p.group();
  transpose_into(k_rows, kn, D, D, w.kt.data());
  transpose_into(v_rows, kn, D, D, w.vt.data());
  const acc_t* K = as_acc(k_rows, kn * D, w.k.data());
  const acc_t* bias = prefix ? nullptr : padding_bias(p, b, j0, kn, w.bias.data());
  const int64_t first_query = prefix ? 0 : p.first_query_seeing(j0);
  for (int64_t h = g * group; h < (g + 1) * group; ++h) {
    for_each_block(first_query / kQueryBlock * kQueryBlock, p.Lq, kQueryBlock, [&](int64_t i0, int64_t qn) {
      const acc_t* Q = as_acc(p.q + p.q_offset(b, h, i0), qn * D, w.q.data());
      const acc_t* dO = as_acc(grad_out + p.q_offset(b, h, i0), qn * D, w.dout.data());
      const int64_t row = p.row(b, h, i0);
      gemm_nn(qn, kn, D, Q, D, w.kt.data(), kn, w.S.data(), kn, false);
      gemm_nn(qn, kn, D, dO, D, w.vt.data(), kn, w.dP.data(), kn, false);
      const TileMask<acc_t> m{prefix, i0, j0, p.Lq, p.Lk, p.causal, bias};
      softmax_grad_tile(w.S.data(), w.dP.data(), qn, kn, m, scale, lse + row, Di + row);
      if (dV != nullptr) {
        transpose_into(w.S.data(), qn, kn, kn, w.T.data());
        gemm_nn(kn, D, qn, w.T.data(), qn, dO, D, dV, D, true);
        transpose_into(w.dP.data(), qn, kn, kn, w.T.data());
        gemm_nn(kn, D, qn, w.T.data(), qn, Q, D, dK, D, true);
      }
      if (dQ != nullptr) {
        gemm_nn(qn, D, kn, w.dP.data(), kn, K, D, dQ + ((h - g * group) * p.Lq + i0) * D, D, true);
      }
    });
  }
}

template <typename scalar_t>
void backward_kernel(const Problem<scalar_t>& p, double scale_d, const scalar_t* grad_out,
                     const scalar_t* out, const float* lse32, scalar_t* dq, scalar_t* dk,
                     scalar_t* dv, scalar_t* dprefix_k, scalar_t* dprefix_v) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const int64_t D = p.D, group = p.group(), n_rows = p.B * p.Hq * p.Lq;

  // The saved lse is fp32 (the op's contract), which would cap the fp64 gradients at fp32
  // accuracy (~1e-7 instead of the 1e-10 that gradcheck-grade tests ask for): in fp64 the
  // row statistics are recomputed in fp64 by a forward pass without the output.
  const acc_t* lse;
  std::vector<acc_t> lse_recomputed;
  if constexpr (std::is_same_v<acc_t, float>) {
    lse = lse32;
  } else {
    lse_recomputed.resize(n_rows);
    forward_kernel<scalar_t, acc_t>(p, scale_d, nullptr, lse_recomputed.data());
    lse = lse_recomputed.data();
  }

  // D_i = rowsum(dO ∘ O), one per query row ([B, Hq, Lq]).
  std::vector<acc_t> Di(n_rows);
  at::parallel_for(0, n_rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      acc_t sum = 0;
      for (int64_t d = 0; d < D; ++d) sum += static_cast<acc_t>(grad_out[r * D + d]) * static_cast<acc_t>(out[r * D + d]);
      Di[r] = sum;
    }
  });

  // One task per (batch element, kv head): it owns dk, dv (and a per-batch prefix's gradient)
  // of that head and dq of the group's query heads, so key block after key block it
  // accumulates all three without atomics. A shared prefix's keys give dq here; their own
  // gradient, a sum over the batch, is the next pass.
  at::parallel_for(0, p.B * p.Hkv, 1, [&](int64_t begin, int64_t end) {
    BackwardScratch<acc_t> w(D);
    std::vector<acc_t> dq_buf(std::is_same_v<scalar_t, acc_t> ? 0 : group * p.Lq * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p.Hkv, g = task % p.Hkv;
      scalar_t* dq_task = dq + p.q_offset(b, g * group, 0);
      acc_t* dQ = acc_target(dq_task, dq_buf.data());
      if constexpr (!std::is_same_v<scalar_t, acc_t>) std::fill(dq_buf.begin(), dq_buf.end(), acc_t(0));

      auto key_block = [&](const scalar_t* k_rows, const scalar_t* v_rows, scalar_t* dk_rows,
                           scalar_t* dv_rows, int64_t kn, bool prefix, int64_t j0) {
        acc_t* dK = nullptr;
        acc_t* dV = nullptr;
        if (dk_rows != nullptr) {
          dK = acc_target(dk_rows, w.dk.data());
          dV = acc_target(dv_rows, w.dv.data());
          if constexpr (!std::is_same_v<scalar_t, acc_t>) {
            std::fill(w.dk.begin(), w.dk.end(), acc_t(0));
            std::fill(w.dv.begin(), w.dv.end(), acc_t(0));
          }
        }
        backward_key_block(p, grad_out, lse, Di.data(), scale, b, g, k_rows, v_rows, kn, prefix, j0, w, dK, dV, dQ);
        if (dk_rows != nullptr) {
          store_acc(dK, kn * D, dk_rows);
          store_acc(dV, kn * D, dv_rows);
        }
      };
      for_each_block(0, p.P, kKeyBlock, [&](int64_t j0, int64_t kn) {
        const int64_t off = p.prefix_offset(b, g, j0);
        key_block(p.prefix_k + off, p.prefix_v + off, p.shared_prefix ? nullptr : dprefix_k + off,
                  p.shared_prefix ? nullptr : dprefix_v + off, kn, true, j0);
      });
      for_each_block(0, p.Lk, kKeyBlock, [&](int64_t j0, int64_t kn) {
        // Blocks no query sees (causally after the last query or all padded) keep dk = dv = 0.
        if (p.first_query_seeing(j0) >= p.Lq || !p.any_kept(b, j0, kn)) return;
        const int64_t off = p.k_offset(b, g, j0);
        key_block(p.k + off, p.v + off, dk + off, dv + off, kn, false, j0);
      });
      store_acc(dQ, group * p.Lq * D, dq_task);
    }
  });

  // dprefix_k/dprefix_v of a shared prefix: one task per (kv head, prefix key block) loops
  // over every batch element and query head of the group, so the batch sum accumulates in the
  // task's own [kn, D] block, without a [B, Hkv, P, D] temporary. Its S and dP are the second
  // computation of those of the pass above (which needs them for dq): the prefix's share of
  // the work, P / (P + visible keys), is small.
  if (p.shared_prefix && p.P > 0) {
    const int64_t n_pblocks = (p.P + kKeyBlock - 1) / kKeyBlock;
    at::parallel_for(0, p.Hkv * n_pblocks, 1, [&](int64_t begin, int64_t end) {
      BackwardScratch<acc_t> w(D);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t g = task / n_pblocks, j0 = task % n_pblocks * kKeyBlock;
        const int64_t kn = std::min(kKeyBlock, p.P - j0);
        const int64_t off = p.prefix_offset(0, g, j0);
        acc_t* dK = acc_target(dprefix_k + off, w.dk.data());
        acc_t* dV = acc_target(dprefix_v + off, w.dv.data());
        if constexpr (!std::is_same_v<scalar_t, acc_t>) {
          std::fill(w.dk.begin(), w.dk.end(), acc_t(0));
          std::fill(w.dv.begin(), w.dv.end(), acc_t(0));
        }
        for (int64_t b = 0; b < p.B; ++b) {
          backward_key_block(p, grad_out, lse, Di.data(), scale, b, g, p.prefix_k + off,
                             p.prefix_v + off, kn, true, j0, w, dK, dV, static_cast<acc_t*>(nullptr));
        }
        store_acc(dK, kn * D, dprefix_k + off);
        store_acc(dV, kn * D, dprefix_v + off);
      }
    });
  }
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                  const std::optional<at::Tensor>& key_padding_mask) {
  const char* op = "deltakern.prefix_attention";
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k, v must be 4-D");
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have one shape");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3), op, ": k must be [B, Hkv, Lk, D] like q");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": Hq must be a multiple of Hkv");
  TORCH_CHECK(prefix_k.sizes() == prefix_v.sizes(), op, ": prefix_k and prefix_v must have one shape");
  const bool shared = prefix_k.dim() == 3;
  TORCH_CHECK((shared || prefix_k.dim() == 4) && prefix_k.size(-1) == q.size(3) &&
                  prefix_k.size(-3) == k.size(1) && (shared || prefix_k.size(0) == q.size(0)),
              op, ": prefix_k must be [Hkv, P, D] or [B, Hkv, P, D]");
  for (const at::Tensor* t : {&q, &k, &v, &prefix_k, &prefix_v}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == q.scalar_type(), op,
                ": q, k, v, prefix_k, prefix_v must be contiguous CPU tensors of one dtype");
  }
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.is_contiguous() && m.device().is_cpu() && m.dim() == 2 &&
                    m.size(0) == q.size(0) && m.size(1) == k.size(2),
                op, ": key_padding_mask must be a contiguous bool [B, Lk] CPU tensor");
  }
}

template <typename scalar_t>
Problem<scalar_t> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                               const std::optional<at::Tensor>& key_padding_mask, bool causal) {
  return Problem<scalar_t>{
      q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
      prefix_k.const_data_ptr<scalar_t>(), prefix_v.const_data_ptr<scalar_t>(),
      key_padding_mask.has_value() ? key_padding_mask->const_data_ptr<bool>() : nullptr,
      q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), prefix_k.size(-2), q.size(3),
      prefix_k.dim() == 3, causal};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> prefix_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const std::optional<at::Tensor>& key_padding_mask, bool causal,
    double scale) {
  check_inputs(q, k, v, prefix_k, prefix_v, key_padding_mask);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "prefix_attention_fwd_cpu", [&] {
    const auto p = make_problem<scalar_t>(q, k, v, prefix_k, prefix_v, key_padding_mask, causal);
    forward_kernel<scalar_t, float>(p, scale, out.data_ptr<scalar_t>(), lse.data_ptr<float>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& prefix_k, const at::Tensor& prefix_v,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& out,
    const at::Tensor& lse, bool causal, double scale) {
  check_inputs(q, k, v, prefix_k, prefix_v, key_padding_mask);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes() && grad_out.is_contiguous() &&
                  out.is_contiguous() && grad_out.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type(),
              "deltakern.prefix_attention: grad_out and out must be contiguous, shaped and typed like q");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.dim() == 3 &&
                  lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "deltakern.prefix_attention: lse must be a contiguous fp32 [B, Hq, Lq] tensor");
  // Zeros: key blocks no query sees are never visited.
  at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  at::Tensor dprefix_k = at::zeros_like(prefix_k), dprefix_v = at::zeros_like(prefix_v);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "prefix_attention_bwd_cpu", [&] {
    const auto p = make_problem<scalar_t>(q, k, v, prefix_k, prefix_v, key_padding_mask, causal);
    backward_kernel<scalar_t>(p, scale, grad_out.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(),
                              lse.const_data_ptr<float>(), dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
                              dv.data_ptr<scalar_t>(), dprefix_k.data_ptr<scalar_t>(),
                              dprefix_v.data_ptr<scalar_t>());
  });
  return {dq, dk, dv, dprefix_k, dprefix_v};
}

}  // namespace deltakern
