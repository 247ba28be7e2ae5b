// CPU forward and backward of the adapter op,
//   out = residual + s · (act(h w_downᵀ + b_down) w_upᵀ + b_up)      (residual defaults to h),
// as GEMMs through ATen (MKL / oneDNN) with everything else fused into one element-wise pass
// each:
//   forward   pre = h w_downᵀ + b_down                                  GEMM (addmm)
//             a = act(pre)                                              pass over [M, r]
//             out = residual + s·b_up                                   pass over [M, d]
//             out += s · a w_upᵀ                                        GEMM, beta = 1
//   backward  dz = dOut w_up                                            GEMM
//             a_s = s·act(pre), dpre = s·dz·act'(pre), db_down = Σ dpre  pass over [M, r]
//             dw_up = (a_sᵀ dOut)ᵀ                                      GEMM
//             db_up = s·Σ dOut (and dh = dOut when the residual is h)   pass over [M, d]
//             dh (+)= dpre w_down                                       GEMM, beta = 1
//             dw_down = (hᵀ dpre)ᵀ                                      GEMM
// The only passes over [M, d] besides the GEMMs are the forward's output initialisation
// (which the up GEMM then accumulates into) and the backward's read of dOut for db_up (which
// also writes dh's residual term when the residual is h).
//
// The activations and their derivatives are the formulas of deltakern/activations.h; fp32 and
// bf16 evaluate them in 16-lane fp32 vectors (GCC vector extensions, compiled for AVX-512, AVX2
// and the baseline and picked at load time, as in prefix_attention.cpp) with the exp, erf and
// tanh of VecMath below; fp64 (for gradcheck) runs them in scalars with the C library's
// functions. bf16 is loaded to fp32, computed in fp32 and rounded once per stored value; the
// bias-gradient sums accumulate the unrounded fp32 values.
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

#include "deltakern/activations.h"
#include "kernels.h"

namespace deltakern {
namespace {

constexpr const char* kOp = "deltakern.adapter";

#define DELTAKERN_ALWAYS_INLINE inline __attribute__((always_inline))
#define DELTAKERN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

// ---------------------------------------------------------------------------------------
// 16 fp32 lanes (one AVX-512 register, two AVX2 ones, four SSE2 ones, whichever target the
// clone that inlines them is compiled for).
using vfloat = float __attribute__((vector_size(64)));
using vint = int32_t __attribute__((vector_size(64)));
using vuint = uint32_t __attribute__((vector_size(64)));
using vbf16 = uint16_t __attribute__((vector_size(32)));
constexpr int64_t kLanes = 16;

DELTAKERN_ALWAYS_INLINE vfloat splat(float x) { return vfloat{} + x; }

DELTAKERN_ALWAYS_INLINE vfloat load_vec(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
DELTAKERN_ALWAYS_INLINE void store_vec(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }

// bf16 -> fp32 is exact: the bits in the high half.
DELTAKERN_ALWAYS_INLINE vfloat load_vec(const c10::BFloat16* p) {
  vbf16 raw;
  std::memcpy(&raw, p, sizeof(raw));
  return reinterpret_cast<vfloat>(__builtin_convertvector(raw, vuint) << 16);
}
// fp32 -> bf16 rounded to nearest even, NaN to the quiet NaN 0x7fc0: c10::BFloat16's rounding.
DELTAKERN_ALWAYS_INLINE void store_vec(c10::BFloat16* p, vfloat v) {
  const vuint u = reinterpret_cast<vuint>(v);
  vuint rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  rounded = v != v ? vuint{} + 0x7fc0u : rounded;
  const vbf16 out = __builtin_convertvector(rounded, vbf16);
  std::memcpy(p, &out, sizeof(out));
}

// The first count (< kLanes) elements, the other lanes 0; and their store. Every element thus
// goes through the same vector code, tails included.
template <typename T>
DELTAKERN_ALWAYS_INLINE vfloat load_part(const T* p, int64_t count) {
  if (count == kLanes) return load_vec(p);
  alignas(64) T buf[kLanes] = {};
  std::copy(p, p + count, buf);
  return load_vec(buf);
}
template <typename T>
DELTAKERN_ALWAYS_INLINE void store_part(T* p, vfloat v, int64_t count) {
  if (count == kLanes) return store_vec(p, v);
  alignas(64) T buf[kLanes];
  store_vec(buf, v);
  std::copy(buf, buf + count, p);
}

// f(c, count) over [0, n) in chunks of kLanes, the last one shorter. The callers' lambdas are
// always inlined: an outlined one would be compiled for the baseline, not for the clone.
template <typename F>
DELTAKERN_ALWAYS_INLINE void for_each_chunk(int64_t n, F&& f) {
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) f(c, kLanes);
  if (c < n) f(c, n - c);
}

// exp, erf and tanh of 16 fp32 lanes: the Math policy of activations.h for the vector kernels.
// Each is within a few ulp of the C library's over the whole float range; NaN gives NaN.
struct VecMath {
  using Scalar = float;

  // Cephes expf: n = round(x log2 e), exp(x) = 2^n exp(r) with r = x - n ln 2 split in two
  // parts, exp(r) by a degree-7 polynomial. 2^n is applied as 2^(n/2) 2^(n - n/2) so that
  // results down to the denormals (x > -104) and up to FLT_MAX come out right.
  static DELTAKERN_ALWAYS_INLINE vfloat exp(vfloat x) {
    vfloat xc = x > 89.0f ? splat(89.0f) : x;
    xc = xc < -104.0f ? splat(-104.0f) : xc;
    const vfloat t = xc * 1.44269504088896341f;
    const vint n_int = __builtin_convertvector(t + (t < 0.0f ? splat(-0.5f) : splat(0.5f)), vint);
    const vfloat n = __builtin_convertvector(n_int, vfloat);
    vfloat r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vfloat y = splat(1.9875691500e-4f);
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
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

// a[i] = act(pre[i]) for i < n.
template <Activation kAct, typename scalar_t>
DELTAKERN_ALWAYS_INLINE void activation_impl(const scalar_t* pre, scalar_t* a, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    for (int64_t i = 0; i < n; ++i) a[i] = activation<kAct>(pre[i]);
  } else {
    for_each_chunk(n, [&](int64_t c, int64_t count) __attribute__((always_inline)) {
      store_part(a + c, activation<kAct, vfloat, VecMath>(load_part(pre + c, count)), count);
    });
  }
}

DELTAKERN_CLONES void activation_span(const float* pre, float* a, int64_t n, Activation act) {
  DELTAKERN_FOR_ACTIVATION(act, activation_impl, (pre, a, n))
}
DELTAKERN_CLONES void activation_span(const c10::BFloat16* pre, c10::BFloat16* a, int64_t n, Activation act) {
  DELTAKERN_FOR_ACTIVATION(act, activation_impl, (pre, a, n))
}
void activation_span(const double* pre, double* a, int64_t n, Activation act) {
  DELTAKERN_FOR_ACTIVATION(act, activation_impl, (pre, a, n))
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
                                            int64_t rows, int64_t r, acc_t* col_sum) {
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
                                float* col_sum, Activation act) {
  float* no_dpre = nullptr;
  DELTAKERN_FOR_ACTIVATION(act, dpre_rows_impl, (pre, dz, no_dpre, a_s, s, rows, r, col_sum))
}
DELTAKERN_CLONES void dpre_rows(const c10::BFloat16* pre, float* dz, c10::BFloat16* dpre, c10::BFloat16* a_s,
                                float s, int64_t rows, int64_t r, float* col_sum, Activation act) {
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
template <typename scalar_t, typename acc_t>
DELTAKERN_ALWAYS_INLINE void colsum_rows_impl(const scalar_t* g, scalar_t* copy, int64_t rows, int64_t d,
                                              acc_t* col_sum) {
  if (copy != nullptr) std::memcpy(copy, g, sizeof(scalar_t) * rows * d);
  for (int64_t m = 0; m < rows; ++m) {
    const scalar_t* row = g + m * d;
    if constexpr (std::is_same_v<scalar_t, double>) {
      for (int64_t j = 0; j < d; ++j) col_sum[j] += row[j];
    } else {
      for_each_chunk(d, [&](int64_t c, int64_t count) __attribute__((always_inline)) {
        store_part(col_sum + c, load_part(col_sum + c, count) + load_part(row + c, count), count);
      });
    }
  }
}

DELTAKERN_CLONES void colsum_rows(const float* g, float* copy, int64_t rows, int64_t d, float* col_sum) {
  colsum_rows_impl(g, copy, rows, d, col_sum);
}
DELTAKERN_CLONES void colsum_rows(const c10::BFloat16* g, c10::BFloat16* copy, int64_t rows, int64_t d,
                                  float* col_sum) {
  colsum_rows_impl(g, copy, rows, d, col_sum);
}
void colsum_rows(const double* g, double* copy, int64_t rows, int64_t d, double* col_sum) {
  colsum_rows_impl(g, copy, rows, d, col_sum);
}

// ---------------------------------------------------------------------------------------
// Parallel drivers.

// Elements per task (and per block) of the element-wise passes.
constexpr int64_t kGrain = 1 << 14;

// Rows per block of the column-summing passes. The block sums are added into the task's sum:
// a two-level summation whose rounding error grows with M / kSumRows + kSumRows, not with M.
constexpr int64_t kSumRows = 64;

// Calls f(task, row_begin, row_end) for `tasks` contiguous shares of [0, M) in parallel:
// one task per thread, fewer for small M. The split depends only on M and the thread count, so
// results are reproducible run to run.
template <typename F>
void for_each_row_task(int64_t M, int64_t tasks, F&& f) {
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) f(t, M * t / tasks, M * (t + 1) / tasks);
  });
}

int64_t row_tasks(int64_t M, int64_t cols) {
  const int64_t min_rows = std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1));
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (M + min_rows - 1) / min_rows));
}

// scale · Σ over tasks of partial [tasks, n] (acc_t) into a new [n] tensor of dtype `options`.
template <typename acc_t>
at::Tensor sum_partials(const std::vector<acc_t>& partial, int64_t tasks, int64_t n, acc_t scale,
                        const at::TensorOptions& options) {
  at::Tensor sum = at::empty({n}, options.dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* out = sum.data_ptr<acc_t>();
  std::fill(out, out + n, acc_t(0));
  for (int64_t t = 0; t < tasks; ++t) {
    for (int64_t j = 0; j < n; ++j) out[j] += partial[t * n + j];
  }
  if (scale != acc_t(1)) {
    for (int64_t j = 0; j < n; ++j) out[j] *= scale;
  }
  return sum.to(options.dtype());
}

// fp32 and fp64: db_down (returned) and, in place, dz -> dpre and a_s = s·act(pre), over [M, r].
template <typename scalar_t>
at::Tensor dpre_pass(const at::Tensor& pre, at::Tensor& dz, at::Tensor& a_s, double scaling, Activation act) {
  static_assert(std::is_same_v<scalar_t, at::opmath_type<scalar_t>>, "bf16 takes backward_front_bf16");
  const int64_t M = pre.size(0), r = pre.size(1);
  const int64_t tasks = row_tasks(M, r), rows_per_block = kSumRows;
  std::vector<scalar_t> partial(tasks * r, scalar_t(0));
  const scalar_t* pre_data = pre.const_data_ptr<scalar_t>();
  scalar_t* dz_data = dz.data_ptr<scalar_t>();
  scalar_t* a_data = a_s.data_ptr<scalar_t>();
  const scalar_t s = static_cast<scalar_t>(scaling);
  for_each_row_task(M, tasks, [&](int64_t t, int64_t row_begin, int64_t row_end) {
    std::vector<scalar_t> block_sum(r);
    scalar_t* task_sum = partial.data() + t * r;
    for (int64_t m = row_begin; m < row_end; m += rows_per_block) {
      const int64_t rows = std::min(rows_per_block, row_end - m);
      std::fill(block_sum.begin(), block_sum.end(), scalar_t(0));
      dpre_rows(pre_data + m * r, dz_data + m * r, a_data + m * r, s, rows, r, block_sum.data(), act);
      for (int64_t j = 0; j < r; ++j) task_sum[j] += block_sum[j];
    }
  });
  return sum_partials(partial, tasks, r, scalar_t(1), pre.options());
}

// bf16: the backward up to the weight GEMMs in one pass over row blocks of dOut. Each block is
// converted to fp32 and multiplied by w_up in fp32 (dz is never rounded to bf16: rounding it
// made db_down's error several times eager PyTorch's when the sum over M cancels, as it does
// for r = 1), then the dpre pass runs on the block's fp32 dz, and the block's columns are
// summed for db_up (and copied to dh) while it is in cache. Returns (db_down, db_up).
std::tuple<at::Tensor, at::Tensor> backward_front_bf16(const at::Tensor& grad_out, const at::Tensor& w_up,
                                                       const at::Tensor& pre, double scaling, Activation act,
                                                       at::Tensor& dpre, at::Tensor& a_s, at::Tensor* dh) {
  using bf16 = c10::BFloat16;
  const int64_t M = grad_out.size(0), d = grad_out.size(1), r = pre.size(1);
  const at::Tensor w_up32 = w_up.to(at::kFloat);
  const auto fp32 = grad_out.options().dtype(at::kFloat);
  // Row blocks of about 32K elements of dOut (128 KiB in fp32): 32 rows at d = 1024.
  const int64_t tasks = row_tasks(M, d);
  const int64_t rows_per_block = std::clamp<int64_t>((int64_t{1} << 15) / std::max<int64_t>(d, 1), 8, 256);
  std::vector<float> partial_down(tasks * r, 0.0f), partial_up(tasks * d, 0.0f);
  const bf16* g_data = grad_out.const_data_ptr<bf16>();
  const bf16* pre_data = pre.const_data_ptr<bf16>();
  bf16* dpre_data = dpre.data_ptr<bf16>();
  bf16* a_data = a_s.data_ptr<bf16>();
  bf16* dh_data = dh != nullptr ? dh->data_ptr<bf16>() : nullptr;
  const float s = static_cast<float>(scaling);
  for_each_row_task(M, tasks, [&](int64_t t, int64_t row_begin, int64_t row_end) {
    // OpenMP workers do not inherit the caller's dispatch state: keep the ATen call below
    // autograd, as the calling thread is.
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor g32 = at::empty({rows_per_block, d}, fp32);
    at::Tensor dz32 = at::empty({rows_per_block, r}, fp32);
    std::vector<float> sum_down(r), sum_up(d);
    float* task_down = partial_down.data() + t * r;
    float* task_up = partial_up.data() + t * d;
    for (int64_t m = row_begin; m < row_end; m += rows_per_block) {
      const int64_t rows = std::min(rows_per_block, row_end - m);
      to_float(g_data + m * d, g32.data_ptr<float>(), rows * d);
      at::Tensor dz_rows = dz32.narrow(0, 0, rows);
      at::mm_out(dz_rows, g32.narrow(0, 0, rows), w_up32);
      std::fill(sum_down.begin(), sum_down.end(), 0.0f);
      dpre_rows(pre_data + m * r, dz_rows.data_ptr<float>(), dpre_data + m * r, a_data + m * r, s, rows, r,
                sum_down.data(), act);
      std::fill(sum_up.begin(), sum_up.end(), 0.0f);
      colsum_rows(g_data + m * d, dh_data != nullptr ? dh_data + m * d : nullptr, rows, d, sum_up.data());
      for (int64_t j = 0; j < r; ++j) task_down[j] += sum_down[j];
      for (int64_t j = 0; j < d; ++j) task_up[j] += sum_up[j];
    }
  });
  return {sum_partials(partial_down, tasks, r, 1.0f, pre.options()),
          sum_partials(partial_up, tasks, d, s, grad_out.options())};
}

// db_up = s · Σ_M g (returned), and copy <- g when copy is defined.
template <typename scalar_t>
at::Tensor colsum_pass(const at::Tensor& g, at::Tensor* copy, double scaling) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = g.size(0), d = g.size(1);
  const int64_t tasks = row_tasks(M, d), rows_per_block = kSumRows;
  std::vector<acc_t> partial(tasks * d, acc_t(0));
  const scalar_t* g_data = g.const_data_ptr<scalar_t>();
  scalar_t* copy_data = copy != nullptr ? copy->data_ptr<scalar_t>() : nullptr;
  for_each_row_task(M, tasks, [&](int64_t t, int64_t row_begin, int64_t row_end) {
    std::vector<acc_t> block_sum(d);
    acc_t* task_sum = partial.data() + t * d;
    for (int64_t m = row_begin; m < row_end; m += rows_per_block) {
      const int64_t rows = std::min(rows_per_block, row_end - m);
      std::fill(block_sum.begin(), block_sum.end(), acc_t(0));
      colsum_rows(g_data + m * d, copy_data != nullptr ? copy_data + m * d : nullptr, rows, d, block_sum.data());
      for (int64_t j = 0; j < d; ++j) task_sum[j] += block_sum[j];
    }
  });
  return sum_partials(partial, tasks, d, static_cast<acc_t>(scaling), g.options());
}

void check_cpu_dtype(const at::Tensor& h) {
  const auto dtype = h.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kDouble, kOp,
              ": CPU kernels take float32, bfloat16 or float64, got ", dtype);
  TORCH_CHECK(h.device().is_cpu(), kOp, ": expected CPU tensors, got device ", h.device());
}

void check_same(const at::Tensor& t, const at::Tensor& h, const char* name) {
  TORCH_CHECK(t.scalar_type() == h.scalar_type(), kOp, ": ", name, " must have h's dtype ",
              h.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == h.device(), kOp, ": ", name, " must be on h's device ", h.device(), ", got ",
              t.device());
  TORCH_CHECK(t.is_contiguous(), kOp, ": ", name, " must be contiguous");
}

void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name, const char* dims) {
  TORCH_CHECK(t.sizes() == expected, kOp, ": ", name, " must be ", dims, " = ", expected, ", got ", t.sizes());
}

void check_activation(int64_t activation) {
  TORCH_CHECK(is_activation_code(activation), kOp, ": activation code must be in [0, ", kNumActivations,
              ") (relu, gelu, gelu_tanh, silu, tanh), got ", activation);
}

}  // namespace

void check_adapter_fwd_args(const at::Tensor& h, const at::Tensor& w_down, const std::optional<at::Tensor>& b_down,
                            const at::Tensor& w_up, const std::optional<at::Tensor>& b_up,
                            const std::optional<at::Tensor>& residual, int64_t activation) {
  TORCH_CHECK(h.dim() == 2, kOp, ": h must be 2-D [M, d], got ", h.sizes());
  TORCH_CHECK(w_down.dim() == 2 && w_down.size(1) == h.size(1), kOp, ": w_down must be [r, d] with d = ",
              h.size(1), ", got ", w_down.sizes());
  const int64_t M = h.size(0), d = h.size(1), r = w_down.size(0);
  check_shape(w_up, {d, r}, "w_up", "[d, r]");
  check_same(h, h, "h");
  check_same(w_down, h, "w_down");
  check_same(w_up, h, "w_up");
  if (b_down.has_value()) {
    check_shape(*b_down, {r}, "b_down", "[r]");
    check_same(*b_down, h, "b_down");
  }
  if (b_up.has_value()) {
    check_shape(*b_up, {d}, "b_up", "[d]");
    check_same(*b_up, h, "b_up");
  }
  if (residual.has_value()) {
    check_shape(*residual, {M, d}, "residual", "[M, d]");
    check_same(*residual, h, "residual");
  }
  check_activation(activation);
}

void check_adapter_bwd_args(const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& w_down,
                            const at::Tensor& w_up, const at::Tensor& pre, int64_t activation) {
  TORCH_CHECK(h.dim() == 2, kOp, ": h must be 2-D [M, d], got ", h.sizes());
  TORCH_CHECK(w_down.dim() == 2 && w_down.size(1) == h.size(1), kOp, ": w_down must be [r, d] with d = ",
              h.size(1), ", got ", w_down.sizes());
  const int64_t M = h.size(0), d = h.size(1), r = w_down.size(0);
  check_shape(grad_out, {M, d}, "grad_out", "[M, d]");
  check_shape(w_up, {d, r}, "w_up", "[d, r]");
  check_shape(pre, {M, r}, "pre", "[M, r]");
  check_same(h, h, "h");
  check_same(grad_out, h, "grad_out");
  check_same(w_down, h, "w_down");
  check_same(w_up, h, "w_up");
  check_same(pre, h, "pre");
  check_activation(activation);
}

std::tuple<at::Tensor, at::Tensor> adapter_fwd_cpu(const at::Tensor& h, const at::Tensor& w_down,
                                                   const std::optional<at::Tensor>& b_down,
                                                   const at::Tensor& w_up, const std::optional<at::Tensor>& b_up,
                                                   const std::optional<at::Tensor>& residual,
                                                   int64_t activation, double scaling) {
  check_adapter_fwd_args(h, w_down, b_down, w_up, b_up, residual, activation);
  check_cpu_dtype(h);
  const Activation act = static_cast<Activation>(activation);
  const int64_t M = h.size(0), d = h.size(1);

  at::Tensor pre = b_down.has_value() ? at::addmm(*b_down, h, w_down.t()) : at::mm(h, w_down.t());
  at::Tensor a = at::empty_like(pre);
  at::Tensor out = at::empty_like(h);
  const at::Tensor& res = residual.has_value() ? *residual : h;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, h.scalar_type(), "adapter_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pre_data = pre.const_data_ptr<scalar_t>();
    scalar_t* a_data = a.data_ptr<scalar_t>();
    at::parallel_for(0, pre.numel(), kGrain, [&](int64_t begin, int64_t end) {
      activation_span(pre_data + begin, a_data + begin, end - begin, act);
    });

    std::vector<acc_t> bias_s;
    if (b_up.has_value()) {
      const scalar_t* b = b_up->const_data_ptr<scalar_t>();
      bias_s.resize(d);
      for (int64_t j = 0; j < d; ++j) bias_s[j] = static_cast<acc_t>(scaling) * static_cast<acc_t>(b[j]);
    }
    const scalar_t* res_data = res.const_data_ptr<scalar_t>();
    scalar_t* out_data = out.data_ptr<scalar_t>();
    const acc_t* bias_data = b_up.has_value() ? bias_s.data() : nullptr;
    at::parallel_for(0, M, std::max<int64_t>(1, kGrain / std::max<int64_t>(d, 1)), [&](int64_t begin, int64_t end) {
      init_rows(res_data + begin * d, bias_data, out_data + begin * d, end - begin, d);
    });
  });
  out.addmm_(a, w_up.t(), /*beta=*/1.0, /*alpha=*/scaling);
  return {out, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> adapter_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& w_down, const at::Tensor& w_up,
    const at::Tensor& pre, int64_t activation, double scaling, bool residual_is_h) {
  check_adapter_bwd_args(grad_out, h, w_down, w_up, pre, activation);
  check_cpu_dtype(h);
  const Activation act = static_cast<Activation>(activation);

  at::Tensor dpre, db_down, db_up, dh;
  at::Tensor a_s = at::empty_like(pre);
  if (residual_is_h) dh = at::empty_like(grad_out);
  at::Tensor* dh_copy = residual_is_h ? &dh : nullptr;
  if (h.scalar_type() == at::kBFloat16) {
    dpre = at::empty_like(pre);
    std::tie(db_down, db_up) = backward_front_bf16(grad_out, w_up, pre, scaling, act, dpre, a_s, dh_copy);
  } else {
    dpre = at::mm(grad_out, w_up);  // dz = dOut w_up; the pass makes it dpre in place
    AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "adapter_bwd_cpu", [&] {
      db_down = dpre_pass<scalar_t>(pre, dpre, a_s, scaling, act);
      db_up = colsum_pass<scalar_t>(grad_out, dh_copy, scaling);
    });
  }
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
