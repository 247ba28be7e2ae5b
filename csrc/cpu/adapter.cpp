// CPU forward and backward of the adapter op,
//   out = residual + s · (act(h w_downᵀ + b_down) w_upᵀ + b_up)      (residual defaults to h),
// as GEMMs with bias, activation, scale and residual fused into one element-wise pass each,
// all in row blocks that stay in cache (NOTE at block_rows_for), one parallel task per thread:
//   forward   pre = b_down + h w_downᵀ                                  GEMM onto the broadcast bias
//             a_s = s·act(pre)                                          pass over the block [rows, r]
//             out = residual + s·b_up                                   pass over the block [rows, d]
//             out += a_s w_upᵀ                                          GEMM, accumulating
//   backward  dz = dOut w_up                                            GEMM
//   (fp32,    a_s = s·act(pre), dpre = s·dz·act'(pre), db_down = Σ dpre  pass over [rows, r]
//    fp64)    dw_upᵀ += a_sᵀ dOut, dw_down += dpreᵀ h                   GEMMs into per-task partials
//             db_up = s·Σ dOut (and dh = dOut when the residual is h)   pass over [rows, d]
//             dh (+)= dpre w_down                                       GEMM, accumulating
// The block GEMMs run single-threaded inside the parallel region: oneDNN's brgemm microkernel
// for fp32 (brgemm of blocks.h), ATen's GEMM (MKL, oneDNN for bf16) for fp64 and bf16
// (block_gemm). So h, dOut and residual are read from memory once, out and dh written
// once, and the only element-wise work on [M, d] is the output initialisation (which the up GEMM
// then accumulates into while the block is in cache) and the read of dOut for db_up (on the
// block the dz GEMM has just read, also writing dh's residual term).
// bf16's backward (and fp32/fp64's, when the per-task partials would take too much memory)
// runs the products as whole-tensor GEMMs around one pass: see backward_passes.
//
// NOTE fp32, M=4096, d=1024, r=64, gelu, 2 threads (AMD EPYC with AVX-512), forward + backward
// with autograd, interleaved medians of 15 against the eager reference (F.linear, F.gelu,
// F.linear, scale, add): 9.3-9.6 ms against 27.5-29.5 ms (0.33x); forward alone 3.1 ms against
// 6.8 ms. With whole-tensor MKL GEMMs and separate passes the step took 19.6-22 ms (0.76-0.85x).
// The activations and their derivatives are the formulas of deltakern/activations.h; fp32 and
// bf16 evaluate them in 16-lane fp32 vectors (vec16.h: GCC vector extensions, compiled for
// AVX-512, AVX2 and the baseline and picked at load time) with the exp, erf and tanh of VecMath
// below; fp64 (for gradcheck) runs them in scalars with the C library's functions. bf16 is
// loaded to fp32, computed in fp32 and rounded once per stored value. The bias gradients sum the
// unrounded values in fp64 (PartialSums of blocks.h, whose NOTE gives the reason).
// The vector helpers below take and return 64-byte vectors, always inlined into the clones that
// use them (so the psABI note on passing such vectors without AVX-512 never applies); silenced
// before the includes, since activations.h's formulas are instantiated on them too.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "adapter.h"
#include "blocks.h"
#include "deltakern/activations.h"
#include "vec16.h"

namespace deltakern {
namespace {

constexpr const char* kOp = "deltakern.adapter";

using namespace vec16;

// exp, erf and tanh of 16 fp32 lanes: the Math policy of activations.h for the vector kernels.
// Each is within a few ulp of the C library's over the whole float range; NaN gives NaN.
struct VecMath {
  using Scalar = float;

  // Cephes expf, exp(x) = 2^n exp(r) (exp_reduced of vec16.h). 2^n is applied as
  // 2^(n/2) 2^(n - n/2) so that results down to the denormals (x > -104) and up to FLT_MAX come
  // out right.
  static DELTAKERN_ALWAYS_INLINE vfloat exp(vfloat x) {
    vfloat xc = x > 89.0f ? splat(89.0f) : x;
    xc = xc < -104.0f ? splat(-104.0f) : xc;
    vint n_int;
    vfloat y = exp_reduced(xc, n_int);
    const vint n1 = n_int >> 1;
    const vint n2 = n_int - n1;
    y = y * reinterpret_cast<vfloat>((n1 + 127) << 23) * reinterpret_cast<vfloat>((n2 + 127) << 23);
    return x > 88.72283935546875f ? splat(__builtin_inff()) : y;
  }

  // Odd rational approximation on [-4, 4] (Eigen's generic_fast_erf_float; erf(±4) rounds to
  // ±1 in fp32): max error 4e-7 absolute and relative, measured on a grid of 2e5 points.
  static DELTAKERN_ALWAYS_INLINE vfloat erf(vfloat x) {
    vfloat xc = x > 4.0f ? splat(4.0f) : x;
    xc = xc < -4.0f ? splat(-4.0f) : xc;
    const vfloat x2 = xc * xc;
    vfloat p = x2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
    p = x2 * p + -2.10102402082508e-06f;
    p = x2 * p + -5.69250639462346e-05f;
    p = x2 * p + -7.34990630326855e-04f;
    p = x2 * p + -2.95459980854025e-03f;
    p = x2 * p + -1.60960333262415e-02f;
    p = xc * p;
    vfloat q = x2 * -1.45660718464996e-05f + -2.13374055278905e-04f;
    q = x2 * q + -1.68282697438203e-03f;
    q = x2 * q + -7.37332916720468e-03f;
    q = x2 * q + -1.42647390514189e-02f;
    return p / q;
  }

  // Cephes tanhf: an odd polynomial below |x| = 0.625, else 1 - 2 / (e^(2|x|) + 1) with x's sign.
  static DELTAKERN_ALWAYS_INLINE vfloat tanh(vfloat x) {
    const vfloat ax = x < 0.0f ? -x : x;
    const vfloat z = x * x;
    vfloat p = z * -5.70498872745e-3f + 2.06390887954e-2f;
    p = p * z + -5.37397155531e-2f;
    p = p * z + 1.33314422036e-1f;
    p = p * z + -3.33332819422e-1f;
    p = p * z * x + x;
    vfloat big = 1.0f - 2.0f / (exp(ax + ax) + 1.0f);
    big = x < 0.0f ? -big : big;
    return ax < 0.625f ? p : big;
  }
};

// Calls FN<kAct> ARGS for the runtime activation act (ARGS is a parenthesized argument list),
// so every activation gets its own inlined loop inside the clone that expands this.
#define DELTAKERN_FOR_ACTIVATION(act, FN, ARGS)                        \
  switch (act) {                                                       \
    case Activation::kRelu: FN<Activation::kRelu> ARGS; break;         \
    case Activation::kGelu: FN<Activation::kGelu> ARGS; break;         \
    case Activation::kGeluTanh: FN<Activation::kGeluTanh> ARGS; break; \
    case Activation::kSilu: FN<Activation::kSilu> ARGS; break;         \
    case Activation::kTanh: FN<Activation::kTanh> ARGS; break;         \
  }

// ---------------------------------------------------------------------------------------
// The element-wise passes on one task's share. The *_impl templates hold the loops; the
// DELTAKERN_CLONES overloads instantiate them for fp32 and bf16 (vectors) and fp64 (scalars).

// a_s[i] = s·act(pre[i]) for i < n.
template <Activation kAct, typename scalar_t, typename acc_t>
DELTAKERN_ALWAYS_INLINE void activation_impl(const scalar_t* pre, scalar_t* a_s, acc_t s, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    for (int64_t i = 0; i < n; ++i) a_s[i] = s * activation<kAct>(pre[i]);
  } else {
    for_each_chunk(n, [&](int64_t c, int64_t count) __attribute__((always_inline)) {
      store_part(a_s + c, activation<kAct, vfloat, VecMath>(load_part(pre + c, count)) * s, count);
    });
  }
}

DELTAKERN_CLONES void activation_span(const float* pre, float* a_s, float s, int64_t n, Activation act) {
  DELTAKERN_FOR_ACTIVATION(act, activation_impl, (pre, a_s, s, n))
}
DELTAKERN_CLONES void activation_span(const c10::BFloat16* pre, c10::BFloat16* a_s, float s, int64_t n,
                                      Activation act) {
  DELTAKERN_FOR_ACTIVATION(act, activation_impl, (pre, a_s, s, n))
}
void activation_span(const double* pre, double* a_s, double s, int64_t n, Activation act) {
  DELTAKERN_FOR_ACTIVATION(act, activation_impl, (pre, a_s, s, n))
}

// out[m, :] = residual[m, :] + bias_s for the rows [0, rows) of [rows, d] blocks (bias_s = s·b_up
// in the accumulation type, or nullptr for a plain copy).
template <typename scalar_t, typename acc_t>
DELTAKERN_ALWAYS_INLINE void init_rows_impl(const scalar_t* residual, const acc_t* bias_s, scalar_t* out,
                                            int64_t rows, int64_t d) {
  if (bias_s == nullptr) {
    std::memcpy(out, residual, sizeof(scalar_t) * rows * d);
    return;
  }
  for (int64_t m = 0; m < rows; ++m) {
    const scalar_t* src = residual + m * d;
    scalar_t* dst = out + m * d;
    if constexpr (std::is_same_v<scalar_t, double>) {
      for (int64_t j = 0; j < d; ++j) dst[j] = src[j] + bias_s[j];
    } else {
      for_each_chunk(d, [&](int64_t c, int64_t count) __attribute__((always_inline)) {
        store_part(dst + c, load_part(src + c, count) + load_part(bias_s + c, count), count);
      });
    }
  }
}

DELTAKERN_CLONES void init_rows(const float* residual, const float* bias_s, float* out, int64_t rows, int64_t d) {
  init_rows_impl(residual, bias_s, out, rows, d);
}
DELTAKERN_CLONES void init_rows(const c10::BFloat16* residual, const float* bias_s, c10::BFloat16* out,
                                int64_t rows, int64_t d) {
  init_rows_impl(residual, bias_s, out, rows, d);
}
void init_rows(const double* residual, const double* bias_s, double* out, int64_t rows, int64_t d) {
  init_rows_impl(residual, bias_s, out, rows, d);
}

// The backward's pass over a block of rows [rows, r], dz in the accumulation type:
//   a_s = s·act(pre)       dz <- s·dz·act'(pre) (in place, unrounded)       col_sum += Σ_rows dpre
// and, for bf16, dpre = the rounded dz (for the GEMMs that read it); fp32 and fp64 have dz in
// the dpre tensor itself (dpre is nullptr).
template <Activation kAct, typename scalar_t, typename acc_t>
DELTAKERN_ALWAYS_INLINE void dpre_rows_impl(const scalar_t* pre, acc_t* dz, scalar_t* dpre, scalar_t* a_s, acc_t s,
                                            int64_t rows, int64_t r, double* col_sum) {
  const int64_t n = rows * r;
  if constexpr (std::is_same_v<scalar_t, double>) {
    for (int64_t i = 0; i < n; ++i) {
      double value;
      const double grad = activation_grad<kAct>(pre[i], value);
      a_s[i] = s * value;
      dz[i] = s * dz[i] * grad;
    }
  } else {
    for_each_chunk(n, [&](int64_t c, int64_t count) __attribute__((always_inline)) {
      vfloat value;
      const vfloat grad = activation_grad<kAct, vfloat, VecMath>(load_part(pre + c, count), value);
      store_part(a_s + c, value * s, count);
      const vfloat dp = load_part(dz + c, count) * s * grad;
      store_part(dz + c, dp, count);
      if constexpr (!std::is_same_v<scalar_t, acc_t>) store_part(dpre + c, dp, count);
    });
  }
  for (int64_t m = 0; m < rows; ++m) {
    const acc_t* row = dz + m * r;
    for (int64_t j = 0; j < r; ++j) col_sum[j] += row[j];
  }
}

DELTAKERN_CLONES void dpre_rows(const float* pre, float* dz, float* a_s, float s, int64_t rows, int64_t r,
                                double* col_sum, Activation act) {
  float* no_dpre = nullptr;
  DELTAKERN_FOR_ACTIVATION(act, dpre_rows_impl, (pre, dz, no_dpre, a_s, s, rows, r, col_sum))
}
DELTAKERN_CLONES void dpre_rows(const c10::BFloat16* pre, float* dz, c10::BFloat16* dpre, c10::BFloat16* a_s,
                                float s, int64_t rows, int64_t r, double* col_sum, Activation act) {
  DELTAKERN_FOR_ACTIVATION(act, dpre_rows_impl, (pre, dz, dpre, a_s, s, rows, r, col_sum))
}
void dpre_rows(const double* pre, double* dz, double* a_s, double s, int64_t rows, int64_t r, double* col_sum,
               Activation act) {
  double* no_dpre = nullptr;
  DELTAKERN_FOR_ACTIVATION(act, dpre_rows_impl, (pre, dz, no_dpre, a_s, s, rows, r, col_sum))
}

// dst[i] = src[i] in fp32 for i < n (exact).
DELTAKERN_CLONES void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  for_each_chunk(n, [&](int64_t c, int64_t count) __attribute__((always_inline)) {
    store_part(dst + c, load_part(src + c, count), count);
  });
}

// col_sum += Σ_rows g[m, :] over a block [rows, d]; copy (when not null) <- g.
template <typename scalar_t>
DELTAKERN_ALWAYS_INLINE void colsum_rows_impl(const scalar_t* g, scalar_t* copy, int64_t rows, int64_t d,
                                              double* col_sum) {
  if (copy != nullptr) std::memcpy(copy, g, sizeof(scalar_t) * rows * d);
  for (int64_t m = 0; m < rows; ++m) {
    const scalar_t* row = g + m * d;
    for (int64_t j = 0; j < d; ++j) col_sum[j] += static_cast<double>(static_cast<float>(row[j]));
  }
}

DELTAKERN_CLONES void colsum_rows(const float* g, float* copy, int64_t rows, int64_t d, double* col_sum) {
  colsum_rows_impl(g, copy, rows, d, col_sum);
}
DELTAKERN_CLONES void colsum_rows(const c10::BFloat16* g, c10::BFloat16* copy, int64_t rows, int64_t d,
                                  double* col_sum) {
  colsum_rows_impl(g, copy, rows, d, col_sum);
}
void colsum_rows(const double* g, double* copy, int64_t rows, int64_t d, double* col_sum) {
  if (copy != nullptr) std::memcpy(copy, g, sizeof(double) * rows * d);
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t j = 0; j < d; ++j) col_sum[j] += g[m * d + j];
  }
}

// ---------------------------------------------------------------------------------------
// Parallel drivers.

// Elements per task, at least, of the passes: smaller problems take fewer tasks.
constexpr int64_t kGrain = 1 << 14;

// Rows per block of backward_passes for fp32 and fp64 (the dpre pass reads its block of dz
// back for the column sums while it is in cache).
constexpr int64_t kSumRows = 64;

// Tasks of for_each_share over M rows of `cols` elements each: one per thread, fewer for small M.
int64_t row_tasks(int64_t M, int64_t cols) {
  const int64_t min_rows = std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1));
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (M + min_rows - 1) / min_rows));
}

// ---------------------------------------------------------------------------------------
// Block GEMMs: C[M, N] = (accumulate ? C : 0) + A[M, K] B[K, N] on row-major blocks given by
// raw pointers and leading dimensions, called single-threaded from inside the parallel
// regions. fp32 goes through brgemm (blocks.h: oneDNN's microkernel). NOTE: on this
// machine (AMD EPYC, AVX-512) the four backward GEMMs of 2048 rows (d=1024, r=64) in blocks of
// 128 rows took 4.5 ms on one thread through brgemm and 10.6 ms through at::mm_out / addmm_
// on the same blocks (MKL takes its AVX2 "zen" path on AMD and packs both operands per call).
// fp64 and bf16 take ATen's GEMM on views of the blocks (MKL; oneDNN for bf16, one rounding of
// C per call).
void block_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                float* C, int64_t ldc, bool accumulate) {
  brgemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

template <typename scalar_t>
void block_gemm_aten(int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t lda, const scalar_t* B,
                     int64_t ldb, scalar_t* C, int64_t ldc, bool accumulate) {
  const at::Tensor a = block_view(A, M, K, lda);
  const at::Tensor b = block_view(B, K, N, ldb);
  at::Tensor c = block_view(C, M, N, ldc);
  if (accumulate) {
    c.addmm_(a, b);
  } else {
    at::mm_out(c, a, b);
  }
}

void block_gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb,
                double* C, int64_t ldc, bool accumulate) {
  block_gemm_aten(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

void block_gemm(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda, const c10::BFloat16* B,
                int64_t ldb, c10::BFloat16* C, int64_t ldc, bool accumulate) {
  block_gemm_aten(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

// NOTE block_gemm with a long reduction (K = d: pre and dz) in chunks of kKChunk, each into a
// scratch block added onto C: oneDNN's microkernel sums K in one sequence. [128 x 1024] x
// [1024 x 64] in fp32, median relative error against fp64: MKL 2.3e-7; brgemm in one call
// 4.7e-7, in chunks of 256 / 128 / 64: 2.7e-7 / 2.0e-7 / 1.6e-7, for 5 / 9 / 21 % more time
// than one call (1.01 / 1.05 / 1.16 ms against 0.96 ms for 2048 rows). In one call, db_down
// (the sum of dpre over M) came out with up to 20 times eager PyTorch's error at M = 2053, r = 1.
// scratch holds M x N elements.
constexpr int64_t kKChunk = 128;

template <typename scalar_t>
void block_gemm_chunked(int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t lda, const scalar_t* B,
                        int64_t ldb, scalar_t* C, int64_t ldc, bool accumulate, scalar_t* scratch) {
  if constexpr (!std::is_same_v<scalar_t, float>) {
    block_gemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate);  // MKL blocks K itself
  } else {
    const int64_t first = std::min(K, kKChunk);
    block_gemm(M, N, first, A, lda, B, ldb, C, ldc, accumulate);
    for (int64_t k0 = first; k0 < K; k0 += kKChunk) {
      const int64_t kc = std::min(kKChunk, K - k0);
      block_gemm(M, N, kc, A + k0, lda, B + k0 * ldb, ldb, scratch, N, false);
      for (int64_t i = 0; i < M; ++i) {
        for (int64_t j = 0; j < N; ++j) C[i * ldc + j] += scratch[i * N + j];
      }
    }
  }
}

// NOTE rows per block: 128 at d = 1024, so a block of h, dOut or the output is 512 KiB in fp32
// and stays in the L2 of its core between the GEMM that reads or writes it and the pass over
// it. The four backward GEMMs over 2048 rows (d=1024, r=64, fp32, one thread) through brgemm:
// 4.4 / 4.5 / 5.7 ms in blocks of 64 / 128 / 256 rows. With MKL on the blocks, 64 to 256 rows
// were within 0.3 ms of each other (the whole backward: 11.5 ms on 2 threads in 128- and
// 256-row blocks against 12.9 ms for whole-tensor GEMMs).
int64_t block_rows_for(int64_t d) {
  return std::clamp<int64_t>((int64_t{1} << 17) / std::max<int64_t>(d, 1), 16, 256);
}

// The forward in row blocks, one parallel task per thread, each block through:
//   pre = b_down + h w_downᵀ (GEMM accumulating onto the broadcast bias, into pre's rows)
//   a_s = s·act(pre) (pass, into a block buffer)       out = residual + s·b_up (pass)
//   out += a_s w_upᵀ (GEMM, accumulating)
// w_downᵀ and w_upᵀ are made contiguous once ([d, r] and [r, d]): the block GEMMs multiply
// untransposed row-major operands.
template <typename scalar_t>
void forward_blocks(const at::Tensor& h, const at::Tensor& w_down, const std::optional<at::Tensor>& b_down,
                    const at::Tensor& w_up, const std::optional<at::Tensor>& b_up, const at::Tensor& residual,
                    double scaling, Activation act, at::Tensor& pre, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = h.size(0), d = h.size(1), r = w_down.size(0);
  std::vector<acc_t> bias_s;
  if (b_up.has_value()) {
    const scalar_t* b = b_up->const_data_ptr<scalar_t>();
    bias_s.resize(d);
    for (int64_t j = 0; j < d; ++j) bias_s[j] = static_cast<acc_t>(scaling) * static_cast<acc_t>(b[j]);
  }
  const acc_t* bias_up = b_up.has_value() ? bias_s.data() : nullptr;
  const scalar_t* bias_down = b_down.has_value() ? b_down->const_data_ptr<scalar_t>() : nullptr;
  const at::Tensor w_down_t = w_down.t().contiguous(), w_up_t = w_up.t().contiguous();
  const scalar_t* wd_t = w_down_t.const_data_ptr<scalar_t>();
  const scalar_t* wu_t = w_up_t.const_data_ptr<scalar_t>();
  const scalar_t* h_data = h.const_data_ptr<scalar_t>();
  const scalar_t* res_data = residual.const_data_ptr<scalar_t>();
  scalar_t* pre_data = pre.data_ptr<scalar_t>();
  scalar_t* out_data = out.data_ptr<scalar_t>();
  const acc_t s = static_cast<acc_t>(scaling);
  const int64_t rows_per_block = block_rows_for(d);
  for_each_share(M, row_tasks(M, d + r), [&](int64_t, int64_t row_begin, int64_t row_end) {
    std::vector<scalar_t> a_s(std::min(rows_per_block, row_end - row_begin) * r), scratch(a_s.size());
    for_each_block(row_begin, row_end, rows_per_block, [&](int64_t m, int64_t rows) {
      scalar_t* pre_blk = pre_data + m * r;
      scalar_t* out_blk = out_data + m * d;
      if (bias_down != nullptr) {
        for (int64_t i = 0; i < rows; ++i) std::copy(bias_down, bias_down + r, pre_blk + i * r);
      }
      block_gemm_chunked(rows, r, d, h_data + m * d, d, wd_t, r, pre_blk, r, bias_down != nullptr, scratch.data());
      activation_span(pre_blk, a_s.data(), s, rows * r, act);
      init_rows(res_data + m * d, bias_up, out_blk, rows, d);
      block_gemm(rows, d, r, a_s.data(), r, wu_t, d, out_blk, d, true);
    });
  });
}

// fp32 and fp64: the whole backward in row blocks, one parallel task per thread, each block
// through
//   dz = dOut w_up (GEMM)        a_s = s·act(pre), dpre = s·dz·act'(pre), Σ dpre (pass)
//   dw_upᵀ += a_sᵀ dOut, dw_down += dpreᵀ h (GEMMs into the task's partials; a_s and dpre
//   transposed into block buffers first)
//   Σ dOut, and dh = dOut when the residual is h (pass)       dh (+)= dpre w_down (GEMM)
// so dOut and h are read from memory once and dh written once; dz/dpre and a_s live in block
// buffers. The partials of the weight gradients ([tasks, r, d] each) are summed at the end.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_blocks(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& w_down, const at::Tensor& w_up,
    const at::Tensor& pre, double scaling, Activation act, bool residual_is_h, int64_t tasks) {
  static_assert(std::is_same_v<scalar_t, at::opmath_type<scalar_t>>, "fp32 and fp64 only");
  const int64_t M = grad_out.size(0), d = grad_out.size(1), r = pre.size(1);
  const int64_t rows_per_block = block_rows_for(d);
  at::Tensor dh = at::empty_like(grad_out);
  at::Tensor part_dw_up_t = at::zeros({tasks, r, d}, grad_out.options());
  at::Tensor part_dw_down = at::zeros({tasks, r, d}, grad_out.options());
  PartialSums partial_down(tasks, r), partial_up(tasks, d);
  const scalar_t* g_data = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* h_data = h.const_data_ptr<scalar_t>();
  const scalar_t* pre_data = pre.const_data_ptr<scalar_t>();
  const scalar_t* wu = w_up.const_data_ptr<scalar_t>();
  const scalar_t* wd = w_down.const_data_ptr<scalar_t>();
  scalar_t* dh_data = dh.data_ptr<scalar_t>();
  const scalar_t s = static_cast<scalar_t>(scaling);
  for_each_share(M, tasks, [&](int64_t t, int64_t row_begin, int64_t row_end) {
    const int64_t max_rows = std::min(rows_per_block, row_end - row_begin);
    std::vector<scalar_t> dpre(max_rows * r), a_s(max_rows * r), dpre_t(max_rows * r), a_s_t(max_rows * r),
        scratch(max_rows * r);
    scalar_t* dw_up_t = part_dw_up_t[t].data_ptr<scalar_t>();
    scalar_t* dw_down = part_dw_down[t].data_ptr<scalar_t>();
    double* task_down = partial_down.of(t);
    double* task_up = partial_up.of(t);
    for_each_block(row_begin, row_end, rows_per_block, [&](int64_t m, int64_t rows) {
      const scalar_t* g_blk = g_data + m * d;
      scalar_t* dh_blk = dh_data + m * d;
      block_gemm_chunked(rows, r, d, g_blk, d, wu, r, dpre.data(), r, false, scratch.data());
      dpre_rows(pre_data + m * r, dpre.data(), a_s.data(), s, rows, r, task_down, act);
      transpose_into(a_s.data(), rows, r, r, a_s_t.data());
      transpose_into(dpre.data(), rows, r, r, dpre_t.data());
      block_gemm(r, d, rows, a_s_t.data(), rows, g_blk, d, dw_up_t, d, true);
      block_gemm(r, d, rows, dpre_t.data(), rows, h_data + m * d, d, dw_down, d, true);
      colsum_rows(g_blk, residual_is_h ? dh_blk : nullptr, rows, d, task_up);
      block_gemm(rows, d, r, dpre.data(), r, wd, d, dh_blk, d, residual_is_h);
    });
  });
  return {dh, part_dw_down.sum(0), partial_down.sum(pre.options()), part_dw_up_t.sum(0).t().contiguous(),
          partial_up.sum(grad_out.options(), scaling)};
}

// The backward's passes up to the weight GEMMs, in one parallel region over row blocks of
// dOut; each block is processed while it is in cache:
//   a_s = s·act(pre), dpre = s·dz·act'(pre), db_down = Σ dpre         (dpre_rows, [rows, r])
//   db_up = s·Σ dOut, and dh = dOut when dh is given                    (colsum_rows, [rows, d])
// fp32 and fp64 take dz = dOut w_up from one GEMM beforehand, in dpre (made dpre in place).
// bf16 multiplies each block of dOut, converted to fp32, by w_up in fp32 here: dz is never
// rounded to bf16 (rounding it made db_down's error several times eager PyTorch's when the sum
// over M cancels, as it does for r = 1), and the conversion is the read of the block that the
// column sums then find in cache. Returns (db_down, db_up).
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> backward_passes(const at::Tensor& grad_out, const at::Tensor& w_up,
                                                   const at::Tensor& pre, double scaling, Activation act,
                                                   at::Tensor& dpre, at::Tensor& a_s, at::Tensor* dh) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;
  const int64_t M = grad_out.size(0), d = grad_out.size(1), r = pre.size(1);
  // bf16 row blocks of about 32K elements of dOut (128 KiB in fp32): 32 rows at d = 1024.
  const int64_t rows_per_block =
      kReduced ? std::clamp<int64_t>((int64_t{1} << 15) / std::max<int64_t>(d, 1), 8, 256) : kSumRows;
  const int64_t tasks = row_tasks(M, d + r);
  const at::Tensor w_up32 = kReduced ? w_up.to(at::kFloat).contiguous() : at::Tensor();
  PartialSums partial_down(tasks, r), partial_up(tasks, d);
  const scalar_t* g_data = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* pre_data = pre.const_data_ptr<scalar_t>();
  scalar_t* dpre_data = dpre.data_ptr<scalar_t>();
  scalar_t* a_data = a_s.data_ptr<scalar_t>();
  scalar_t* dh_data = dh != nullptr ? dh->data_ptr<scalar_t>() : nullptr;
  const acc_t s = static_cast<acc_t>(scaling);
  for_each_share(M, tasks, [&](int64_t t, int64_t row_begin, int64_t row_end) {
    std::vector<float> g32, dz32, scratch;
    if constexpr (kReduced) {
      g32.resize(rows_per_block * d);
      dz32.resize(rows_per_block * r);
      scratch.resize(rows_per_block * r);
    }
    double* task_down = partial_down.of(t);
    double* task_up = partial_up.of(t);
    for_each_block(row_begin, row_end, rows_per_block, [&](int64_t m, int64_t rows) {
      if constexpr (kReduced) {
        to_float(g_data + m * d, g32.data(), rows * d);
        block_gemm_chunked(rows, r, d, g32.data(), d, w_up32.const_data_ptr<float>(), r, dz32.data(), r, false,
                           scratch.data());
        dpre_rows(pre_data + m * r, dz32.data(), dpre_data + m * r, a_data + m * r, s, rows, r, task_down, act);
      } else {
        dpre_rows(pre_data + m * r, dpre_data + m * r, a_data + m * r, s, rows, r, task_down, act);
      }
      colsum_rows(g_data + m * d, dh_data != nullptr ? dh_data + m * d : nullptr, rows, d, task_up);
    });
  });
  return {partial_down.sum(pre.options()), partial_up.sum(grad_out.options(), scaling)};
}

void check_cpu_dtype(const at::Tensor& h) {
  const auto dtype = h.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kDouble, kOp,
              ": CPU kernels take float32, bfloat16 or float64, got ", dtype);
  TORCH_CHECK(h.device().is_cpu(), kOp, ": expected CPU tensors, got device ", h.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> adapter_fwd_cpu(const at::Tensor& h, const at::Tensor& w_down,
                                                   const std::optional<at::Tensor>& b_down,
                                                   const at::Tensor& w_up, const std::optional<at::Tensor>& b_up,
                                                   const std::optional<at::Tensor>& residual,
                                                   int64_t activation, double scaling) {
  check_adapter_fwd_args(h, w_down, b_down, w_up, b_up, residual, activation);
  check_cpu_dtype(h);
  at::Tensor pre = at::empty({h.size(0), w_down.size(0)}, h.options());
  at::Tensor out = at::empty_like(h);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, h.scalar_type(), "adapter_fwd_cpu", [&] {
    forward_blocks<scalar_t>(h, w_down, b_down, w_up, b_up, residual.has_value() ? *residual : h, scaling,
                             static_cast<Activation>(activation), pre, out);
  });
  return {out, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> adapter_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& w_down, const at::Tensor& w_up,
    const at::Tensor& pre, int64_t activation, double scaling, bool residual_is_h) {
  check_adapter_bwd_args(grad_out, h, w_down, w_up, pre, activation);
  check_cpu_dtype(h);
  const Activation act = static_cast<Activation>(activation);
  const int64_t M = h.size(0), d = h.size(1), r = w_down.size(0);

  // fp32 and fp64 run the whole backward in row blocks (backward_blocks) unless its per-task
  // weight-gradient partials, 2 r d elements per task, would outgrow dOut itself (and 4M
  // elements): many threads with a large r d and few rows. Then, and for bf16 (whose partials
  // would have to be fp32 GEMMs), the products are whole-tensor GEMMs around backward_passes.
  const int64_t tasks = row_tasks(M, d + r);
  if (h.scalar_type() != at::kBFloat16 && tasks * 2 * r * d <= std::max<int64_t>(M * d, int64_t{1} << 22)) {
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grads;
    AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "adapter_bwd_cpu", [&] {
      grads = backward_blocks<scalar_t>(grad_out, h, w_down, w_up, pre, scaling, act, residual_is_h, tasks);
    });
    return grads;
  }

  // fp32 and fp64: dz = dOut w_up, made dpre in place by the passes; bf16: see backward_passes.
  at::Tensor dpre = h.scalar_type() == at::kBFloat16 ? at::empty_like(pre) : at::mm(grad_out, w_up);
  at::Tensor a_s = at::empty_like(pre);
  at::Tensor dh = residual_is_h ? at::empty_like(grad_out) : at::Tensor();
  at::Tensor db_down, db_up;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, h.scalar_type(), "adapter_bwd_cpu", [&] {
    std::tie(db_down, db_up) =
        backward_passes<scalar_t>(grad_out, w_up, pre, scaling, act, dpre, a_s, residual_is_h ? &dh : nullptr);
  });
  // dw_up as dOutᵀ a_s and dw_down as (hᵀ dpre)ᵀ: MKL ran these orientations in 3.23 and
  // 3.31 ms against 3.37 and 3.34 ms for (a_sᵀ dOut)ᵀ and dpreᵀ h (M=4096, d=1024, r=64, fp32,
  // 2 threads, interleaved medians of 21).
  at::Tensor dw_up = at::mm(grad_out.t(), a_s);
  if (residual_is_h) {
    dh.addmm_(dpre, w_down);
  } else {
    dh = at::mm(dpre, w_down);
  }
  at::Tensor dw_down = at::mm(h.t(), dpre).t().contiguous();
  return {dh, dw_down, db_down, dw_up, db_up};
}

}  // namespace deltakern
