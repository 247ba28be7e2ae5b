// CPU kernels of dora_linear (csrc/dora_linear.h).
//
// Without dropout, and for dropout_p above kSparseMaxP, the op is the device-neutral recipe
// (csrc/dora_linear.cpp: lora_linear's decomposition, MKL GEMMs) with the element-wise kernels
// here: y = c ⊙ z + b after the forward GEMMs, gc = c ⊙ g with d_scale = Σ_rows g ⊙ z before the
// backward's.
//
// With dropout, PEFT's DoRA multiplies W twice each way: x Wᵀ and x̃ Wᵀ forward, g W and
// ((c − 1) ⊙ g) W backward (x̃ = drop(x) = mask ⊙ x / (1 − p)). Here each direction runs one
// base GEMM and touches W again only at the dropped elements, a fraction p of x:
//   forward   P = x Wᵀ (MKL); S = x_d Wᵀ with x_d = (1 − mask) ⊙ x, a sparse product over the
//             dropped elements only; since x̃ Wᵀ = (P − S) / (1 − p):
//               z = (P − S) / (1 − p) + s·xa Bᵀ,   y = P + b + (c − 1) ⊙ z + s·xa Bᵀ
//   backward  with h = (1 + (c − 1) / (1 − p)) ⊙ g, dx = g W + mask ⊙ (((c − 1) ⊙ g) W + dxa A)
//             / (1 − p) is mask ⊙ (h W + dxa A / (1 − p)) + (1 − mask) ⊙ g W: one GEMM h W (MKL),
//             then the dropped elements of dx replaced by their own dot products g_i · W[:, k].
// The sparse parts cost p·M·K·N multiply-adds, against M·K·N for the GEMM each replaces; the
// element-wise terms (the low-rank ones, d_scale, dA, the mask) ride along in the same passes.
// The sparse work grows with p and the two GEMMs' does not: the sparse recipe is the faster one up
// to p = 0.35 or so (NOTE at kSparseMaxP).
//
// Layout of the sparse passes (all deterministic: every output element and every dA column is
// written by one task, d_scale's partial sums are added in task order):
//   forward   row blocks of x (at most kDroppedBudget dropped elements each); per block, tasks
//             over rows draw the mask once (Philox), write x̃ rows into a 32-row task buffer for
//             xa = x̃ Aᵀ (MKL per buffer, as lora_linear's shrink) and list each row's dropped
//             (k, x) pairs; then tasks over blocks of kColBlock output columns transpose their
//             W rows into a [K, kColBlock] fp32 buffer and finish every row of the block in
//             registers: S from the row's list, s·xa Bᵀ, the epilogue, z and y.
//   backward  one pass over rows gives h and d_scale; MKL gives dx = h W + dxa A / (1 − p) (right
//             at the kept elements) and dxaᵀ x; then tasks over chunks of kColChunk columns of
//             dx transpose W[:, chunk] into a [kColChunk, N] fp32 buffer and walk all rows: the
//             chunk's mask (Philox), the dropped elements' dx = g_i · W[:, k], and their part of
//             dxaᵀ x, which dA = dxaᵀ x̃ leaves out.
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

#include "blocks.h"
#include "dora_linear.h"
#include "keep_mask.h"
#include "lora_linear.h"
#include "vec16.h"

namespace deltakern {
namespace {

using namespace vec16;

// The sparse kernels keep 8 to 16 vectors of accumulators in registers across a loop. NOTE GCC 12
// compiles vec16's 64-byte vectors there into stack round trips in the AVX2 clone (a splat took 16
// scalar stores, every accumulator update a store and a reload: the forward's sparse pass took
// ~4x the GEMM it replaces), so they use 8-lane (one AVX2 register) vectors, compiled for
// x86-64-v3 (AVX2 with FMA) and the baseline.
#define DORA_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
using v8f = float __attribute__((vector_size(32)));
using v8u = uint32_t __attribute__((vector_size(32)));
using v8h = uint16_t __attribute__((vector_size(16)));
using v8b = uint8_t __attribute__((vector_size(8)));
constexpr int64_t kLanes8 = 8;

DELTAKERN_ALWAYS_INLINE v8f splat8(float x) { return v8f{} + x; }
DELTAKERN_ALWAYS_INLINE v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
// bf16 -> fp32 is exact: the bits in the high half.
DELTAKERN_ALWAYS_INLINE v8f load8(const c10::BFloat16* p) {
  v8h raw;
  std::memcpy(&raw, p, sizeof(raw));
  return reinterpret_cast<v8f>(__builtin_convertvector(raw, v8u) << 16);
}
DELTAKERN_ALWAYS_INLINE void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }
// fp32 -> bf16 rounded to nearest even, NaN to 0x7fc0, as vec16's store_vec and c10::BFloat16.
DELTAKERN_ALWAYS_INLINE void store8(c10::BFloat16* p, v8f v) {
  const v8u u = reinterpret_cast<v8u>(v);
  v8u rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  rounded = v != v ? v8u{} + 0x7fc0u : rounded;
  const v8h out = __builtin_convertvector(rounded, v8h);
  std::memcpy(p, &out, sizeof(out));
}
// The first count (<= 8) elements, the other lanes 0; and their store.
template <typename T>
DELTAKERN_ALWAYS_INLINE v8f load8_part(const T* p, int64_t count) {
  if (count == kLanes8) return load8(p);
  alignas(32) T buf[kLanes8] = {};
  std::copy(p, p + count, buf);
  return load8(buf);
}
template <typename T>
DELTAKERN_ALWAYS_INLINE void store8_part(T* p, v8f v, int64_t count) {
  if (count == kLanes8) return store8(p, v);
  alignas(32) T buf[kLanes8];
  store8(buf, v);
  std::copy(buf, buf + count, p);
}

// Dropout probabilities up to this take the sparse recipe, larger ones the two-GEMM recipe. NOTE
// op forward + backward at M = 2048, K = N = 1024, r = 16, fp32, sparse / two-GEMM, interleaved
// medians on 2 threads: p = 0.1 85 / 130 ms, 0.3 110 / 130, 0.35 133 / 136, 0.4 139 / 140,
// 0.45 147 / 143, 0.5 139 / 130, 0.7 162 / 128, 0.9 193 / 130 ms (one thread: p = 0.3 215 / 236,
// 0.4 242 / 229 ms).
constexpr double kSparseMaxP = 0.35;
// Output columns per forward task: eight 8-lane accumulators. Its [K, kColBlock] fp32 slice of Wᵀ
// (256 KiB at K = 1024) stays in L2 while the task walks the rows.
constexpr int64_t kColBlock = 64;
// dx columns per backward task, a multiple of 4: its [kColChunk, N] fp32 slice of W's columns
// (256 KiB at N = 1024) stays in L2 while the task walks the rows.
constexpr int64_t kColChunk = 64;
// Rows ahead whose segments the column passes prefetch: they walk a column block or chunk down
// the rows, a stride (K or N elements) the hardware prefetcher does not follow; of g's rows, read
// from their start, the first kPrefetchLines lines (the hardware prefetcher follows the rest).
constexpr int64_t kPrefetchRows = 4;
constexpr int64_t kPrefetchLines = 8;
template <typename T>
constexpr int64_t kLineElements = 64 / static_cast<int64_t>(sizeof(T));
// Dropped elements ahead whose rows of Wᵀ the forward's sparse product prefetches.
constexpr int64_t kPrefetchEntries = 8;
// Rows of x̃ per xa GEMM call in the forward (lora_linear's shrink buffer).
constexpr int64_t kShrinkRows = 32;
// Expected dropped elements per forward row block: bounds the lists to a few MiB.
constexpr int64_t kDroppedBudget = int64_t{1} << 18;
// Elements per task of the element-wise passes.
constexpr int64_t kGrain = int64_t{1} << 15;

// ---------------------------------------------------------------------------------------
// Element-wise passes. The *_impl templates hold the loops; DELTAKERN_CLONES overloads compile
// them for fp32 and bf16 (16-lane fp32 vectors), fp64 runs them as scalars.

// y = f ⊙ z + b over one row of n (b may be null; y may be z).
template <typename T, typename A>
DELTAKERN_ALWAYS_INLINE void scale_row_impl(const T* z, const A* f, const T* b, T* y, int64_t n) {
  if constexpr (std::is_same_v<T, double>) {
    for (int64_t j = 0; j < n; ++j) y[j] = f[j] * z[j] + (b != nullptr ? b[j] : 0.0);
  } else {
    for_each_chunk(n, [&](int64_t j, int64_t count) __attribute__((always_inline)) {
      vfloat v = load_part(z + j, count) * load_part(f + j, count);
      if (b != nullptr) v += load_part(b + j, count);
      store_part(y + j, v, count);
    });
  }
}

DELTAKERN_CLONES void scale_row(const float* z, const float* f, const float* b, float* y, int64_t n) {
  scale_row_impl(z, f, b, y, n);
}
DELTAKERN_CLONES void scale_row(const c10::BFloat16* z, const float* f, const c10::BFloat16* b, c10::BFloat16* y,
                                int64_t n) {
  scale_row_impl(z, f, b, y, n);
}
void scale_row(const double* z, const double* f, const double* b, double* y, int64_t n) {
  scale_row_impl(z, f, b, y, n);
}

// gs = f ⊙ g over one row of n, and ds_sum += g ⊙ z when z is given.
template <typename T, typename A>
DELTAKERN_ALWAYS_INLINE void grad_row_impl(const T* g, const T* z, const A* f, T* gs, double* ds_sum, int64_t n) {
  if constexpr (std::is_same_v<T, double>) {
    for (int64_t j = 0; j < n; ++j) {
      gs[j] = f[j] * g[j];
      if (z != nullptr) ds_sum[j] += g[j] * z[j];
    }
  } else {
    for_each_chunk(n, [&](int64_t j, int64_t count) __attribute__((always_inline)) {
      const vfloat gv = load_part(g + j, count);
      store_part(gs + j, gv * load_part(f + j, count), count);
      if (z != nullptr) add_to_fp64(ds_sum + j, gv * load_part(z + j, count), count);
    });
  }
}

DELTAKERN_CLONES void grad_row(const float* g, const float* z, const float* f, float* gs, double* ds_sum, int64_t n) {
  grad_row_impl(g, z, f, gs, ds_sum, n);
}
DELTAKERN_CLONES void grad_row(const c10::BFloat16* g, const c10::BFloat16* z, const float* f, c10::BFloat16* gs,
                               double* ds_sum, int64_t n) {
  grad_row_impl(g, z, f, gs, ds_sum, n);
}
void grad_row(const double* g, const double* z, const double* f, double* gs, double* ds_sum, int64_t n) {
  grad_row_impl(g, z, f, gs, ds_sum, n);
}

// Rows per task of an element-wise pass over rows of n elements.
int64_t row_grain(int64_t n) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(n, 1)); }

// Tasks of a pass over M rows with partial sums: one per thread, at most one per row.
int64_t sum_tasks(int64_t M) { return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), M)); }

// y [M, N] = f ⊙ z + bias with the column factors f [N] (scale's dtype).
void scale_columns_by(const at::Tensor& z, const at::Tensor& f, const std::optional<at::Tensor>& bias, at::Tensor& y) {
  const int64_t M = z.size(0), N = z.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, z.scalar_type(), "dora_scale_columns_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* z_data = z.const_data_ptr<scalar_t>();
    const acc_t* f_data = f.const_data_ptr<acc_t>();
    const scalar_t* b = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* y_data = y.data_ptr<scalar_t>();
    at::parallel_for(0, M, row_grain(N), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) scale_row(z_data + i * N, f_data, b, y_data + i * N, N);
    });
  });
}

// gs [M, N] = f ⊙ g with the column factors f [N]; returns Σ_rows g ⊙ z ([N], f's dtype) when z
// is defined, else an undefined tensor. The sums are fp64 per task (PartialSums, blocks.h).
at::Tensor scale_grad_by(const at::Tensor& g, const at::Tensor& z, const at::Tensor& f, at::Tensor& gs) {
  const int64_t M = g.size(0), N = g.size(1);
  const int64_t tasks = sum_tasks(M);
  PartialSums partial(tasks, z.defined() ? N : 0);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, g.scalar_type(), "dora_scale_grad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g_data = g.const_data_ptr<scalar_t>();
    const scalar_t* z_data = z.defined() ? z.const_data_ptr<scalar_t>() : nullptr;
    const acc_t* f_data = f.const_data_ptr<acc_t>();
    scalar_t* gs_data = gs.data_ptr<scalar_t>();
    for_each_share(M, tasks, [&](int64_t task, int64_t begin, int64_t end) {
      double* sums = z_data != nullptr ? partial.of(task) : nullptr;
      for (int64_t i = begin; i < end; ++i) {
        grad_row(g_data + i * N, z_data != nullptr ? z_data + i * N : nullptr, f_data, gs_data + i * N, sums, N);
      }
    });
  });
  return z.defined() ? partial.sum(f.options()) : at::Tensor();
}

// ---------------------------------------------------------------------------------------
// DoraKernels of the two-GEMM recipe.

void scale_columns(const at::Tensor& z, const at::Tensor& scale, double shift, const std::optional<at::Tensor>& bias,
                   at::Tensor& y) {
  scale_columns_by(z, (scale - shift).contiguous(), bias, y);
}

at::Tensor scale_grad(const at::Tensor& grad_out, const at::Tensor& z, const at::Tensor& scale, double shift,
                      at::Tensor& g_scaled) {
  return scale_grad_by(grad_out, z, (scale - shift).contiguous(), g_scaled);
}

void drop_rows(const at::Tensor& x, int64_t row0, double dropout_p, int64_t seed, at::Tensor& out) {
  const int64_t rows = out.size(0), K = x.size(1);
  const float p32 = static_cast<float>(dropout_p);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "dora_drop_rows_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t keep_scale = static_cast<acc_t>(1.0 / (1.0 - dropout_p));
    const scalar_t* x_data = x.const_data_ptr<scalar_t>() + row0 * K;
    scalar_t* out_data = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(K), [&](int64_t begin, int64_t end) {
      for_each_keep_run(seed, p32, (row0 + begin) * K, (row0 + end) * K,
                        [&](int64_t offset, int64_t n, const uint8_t* keep) {
                          scale_kept(x_data + begin * K + offset, keep, n, keep_scale,
                                     out_data + begin * K + offset);
                        });
    });
  });
}

void mask_accumulate(const at::Tensor& x, at::Tensor& t, at::Tensor& dx, double dropout_p, int64_t seed) {
  const float p32 = static_cast<float>(dropout_p);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "dora_mask_accumulate_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t keep_scale = static_cast<acc_t>(1.0 / (1.0 - dropout_p));
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    scalar_t* t_data = t.data_ptr<scalar_t>();
    scalar_t* dx_data = dx.data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for_each_keep_run(seed, p32, begin, end, [&](int64_t offset, int64_t n, const uint8_t* keep) {
        for (int64_t j = 0; j < n; ++j) {
          const int64_t e = begin + offset + j;
          const acc_t f = keep[j] * keep_scale;
          dx_data[e] = static_cast<scalar_t>(static_cast<acc_t>(dx_data[e]) + f * static_cast<acc_t>(t_data[e]));
          t_data[e] = static_cast<scalar_t>(f * static_cast<acc_t>(x_data[e]));
        }
      });
    });
  });
}

// The two-GEMM recipe drops x in blocks of 64 Ki elements (256 KiB in fp32, in L2 between the
// dropping pass and the GEMM that reads it).
const DoraKernels kKernels{&scale_columns, &scale_grad, &drop_rows, &mask_accumulate,
                          /*drop_block_elements=*/int64_t{1} << 16, &lora_dropout_kernels_cpu()};

// ---------------------------------------------------------------------------------------
// The sparse recipe: forward.

// A dropped element of x: its column and value.
template <typename acc_t>
struct Dropped {
  int32_t k;
  acc_t x;
};

// Appends the dropped elements among x[0, n) (keep[j] == 0) to list, as columns k0 + j.
template <typename T, typename acc_t>
inline void append_dropped(const T* x, const uint8_t* keep, int64_t n, int64_t k0, std::vector<Dropped<acc_t>>& list) {
  constexpr uint64_t kAllKept = 0x0101010101010101ull;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    uint64_t word;
    std::memcpy(&word, keep + j, sizeof(word));
    if (word == kAllKept) continue;
    for (int64_t t = j; t < j + 8; ++t) {
      if (keep[t] == 0) list.push_back({static_cast<int32_t>(k0 + t), static_cast<acc_t>(x[t])});
    }
  }
  for (; j < n; ++j) {
    if (keep[j] == 0) list.push_back({static_cast<int32_t>(k0 + j), static_cast<acc_t>(x[j])});
  }
}

// One row's kColBlock output columns of the sparse forward (nc <= kColBlock of them real):
//   S = Σ_dropped x_k · wt[k, :]      (wt [K, kColBlock]: Wᵀ's rows, zero past nc)
//   V = Σ_r xa_r · bt[r, :]           (bt [R, kColBlock]: Bᵀ's rows)
//   z = ks·(P − S) + s·V,  y = P + b + (c − 1) ⊙ z + s·V   with P = y on entry (x Wᵀ)
// c and b are kColBlock wide (b zero without a bias). z may be null.
template <typename T, typename A>
DELTAKERN_ALWAYS_INLINE void forward_row_impl(const Dropped<A>* dropped, int64_t count, const T* xa, int64_t R,
                                              const A* wt, const A* bt, const A* c, const A* b, A s, A ks, T* y,
                                              T* z, int64_t nc) {
  if constexpr (std::is_same_v<T, double>) {
    double S[kColBlock] = {}, V[kColBlock] = {};
    for (int64_t e = 0; e < count; ++e) {
      const double* w = wt + dropped[e].k * kColBlock;
      for (int64_t j = 0; j < kColBlock; ++j) S[j] += dropped[e].x * w[j];
    }
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t j = 0; j < kColBlock; ++j) V[j] += xa[r] * bt[r * kColBlock + j];
    }
    for (int64_t j = 0; j < nc; ++j) {
      const double P = y[j], sv = s * V[j];
      const double zz = ks * (P - S[j]) + sv;
      y[j] = P + b[j] + (c[j] - 1.0) * zz + sv;
      if (z != nullptr) z[j] = zz;
    }
  } else {
    // V first, parked in L1, so that S's eight accumulators have the registers to themselves.
    constexpr int kVecs = kColBlock / kLanes8;
    alignas(32) float sv[kColBlock];
    {
      v8f V[kVecs] = {};
      for (int64_t r = 0; r < R; ++r) {
        const v8f xr = splat8(static_cast<float>(xa[r]));
        for (int q = 0; q < kVecs; ++q) V[q] += xr * load8(bt + r * kColBlock + q * kLanes8);
      }
      for (int q = 0; q < kVecs; ++q) store8(sv + q * kLanes8, s * V[q]);
    }
    v8f S[kVecs] = {};
    for (int64_t e = 0; e < count; ++e) {
      if (e + kPrefetchEntries < count) {  // wt's rows are random: fetch ahead the list's next ones
        const float* ahead = wt + dropped[e + kPrefetchEntries].k * kColBlock;
        for (int64_t j = 0; j < kColBlock; j += kLineElements<float>) __builtin_prefetch(ahead + j);
      }
      const float* w = wt + dropped[e].k * kColBlock;
      const v8f xv = splat8(dropped[e].x);
      for (int q = 0; q < kVecs; ++q) S[q] += xv * load8(w + q * kLanes8);
    }
    for (int q = 0; q < kVecs; ++q) {
      const int64_t j = q * kLanes8, n = std::min<int64_t>(kLanes8, nc - j);
      if (n <= 0) break;
      const v8f P = load8_part(y + j, n), svq = load8(sv + j);
      const v8f zz = ks * (P - S[q]) + svq;
      store8_part(y + j, P + load8(b + j) + (load8(c + j) - 1.0f) * zz + svq, n);
      if (z != nullptr) store8_part(z + j, zz, n);
    }
  }
}

DORA_CLONES void forward_row(const Dropped<float>* dropped, int64_t count, const float* xa, int64_t R, const float* wt,
                             const float* bt, const float* c, const float* b, float s, float ks, float* y, float* z,
                             int64_t nc) {
  forward_row_impl(dropped, count, xa, R, wt, bt, c, b, s, ks, y, z, nc);
}
DORA_CLONES void forward_row(const Dropped<float>* dropped, int64_t count, const c10::BFloat16* xa, int64_t R,
                             const float* wt, const float* bt, const float* c, const float* b, float s, float ks,
                             c10::BFloat16* y, c10::BFloat16* z, int64_t nc) {
  forward_row_impl(dropped, count, xa, R, wt, bt, c, b, s, ks, y, z, nc);
}
void forward_row(const Dropped<double>* dropped, int64_t count, const double* xa, int64_t R, const double* wt,
                 const double* bt, const double* c, const double* b, double s, double ks, double* y, double* z,
                 int64_t nc) {
  forward_row_impl(dropped, count, xa, R, wt, bt, c, b, s, ks, y, z, nc);
}

// Element (i, j) of a 2-D tensor of any strides (a transposed Conv1D weight reads as [N, K]).
template <typename T>
struct Strided {
  const T* data;
  int64_t s0, s1;
  T at(int64_t i, int64_t j) const { return data[i * s0 + j * s1]; }
};

template <typename T>
Strided<T> strided(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1)};
}

// The sparse forward on contiguous x [M, K]; y, xa and z (or an undefined z) preallocated.
template <typename scalar_t>
void sparse_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scale, double scaling,
                    double dropout_p, int64_t seed, at::Tensor& y, at::Tensor& xa, at::Tensor& z) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), R = lora_A.size(0);
  const float p32 = static_cast<float>(dropout_p);
  const acc_t ks = static_cast<acc_t>(1.0 / (1.0 - dropout_p));
  const acc_t s = static_cast<acc_t>(scaling);
  const auto acc_options = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const Strided<scalar_t> w = strided<scalar_t>(weight);
  const Strided<scalar_t> b_lora = strided<scalar_t>(lora_B);
  const acc_t* c_data = scale.const_data_ptr<acc_t>();
  const scalar_t* bias_data = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* y_data = y.data_ptr<scalar_t>();
  scalar_t* z_data = z.defined() ? z.data_ptr<scalar_t>() : nullptr;
  const scalar_t* xa_data = xa.const_data_ptr<scalar_t>();
  const at::Tensor lora_A_t = lora_A.t();
  const int64_t col_blocks = (N + kColBlock - 1) / kColBlock;
  // Rows per block: about kDroppedBudget dropped elements in the lists.
  const int64_t expected_per_row = std::max<int64_t>(1, static_cast<int64_t>(dropout_p * static_cast<double>(K)));
  const int64_t block_rows = std::clamp<int64_t>(kDroppedBudget / expected_per_row, 1, std::max<int64_t>(M, 1));
  const int64_t tasks = sum_tasks(block_rows);
  std::vector<std::vector<Dropped<acc_t>>> lists(tasks);
  std::vector<int64_t> row_task(block_rows), row_begin(block_rows), row_count(block_rows);

  at::mm_out(y, x, weight.t());  // P = x Wᵀ
  for (int64_t row0 = 0; row0 < M; row0 += block_rows) {
    const int64_t rows = std::min(block_rows, M - row0);
    // The mask of the block's rows, drawn once: x̃ for xa, the dropped lists for S.
    for_each_share(rows, tasks, [&](int64_t task, int64_t begin, int64_t end) {
      std::vector<Dropped<acc_t>>& list = lists[task];
      list.clear();
      list.reserve(static_cast<size_t>(1.25 * dropout_p * static_cast<double>((end - begin) * K)) + 16);
      at::Tensor buffer = at::empty({std::min(kShrinkRows, std::max<int64_t>(end - begin, 1)), K}, x.options());
      scalar_t* x_dropped = buffer.data_ptr<scalar_t>();
      for_each_block(begin, end, kShrinkRows, [&](int64_t first, int64_t count) {
        for (int64_t i = first; i < first + count; ++i) {
          const int64_t row = row0 + i;
          const scalar_t* in = x_data + row * K;
          scalar_t* out = x_dropped + (i - first) * K;
          row_task[i] = task;
          row_begin[i] = static_cast<int64_t>(list.size());
          for_each_keep_run(seed, p32, row * K, (row + 1) * K, [&](int64_t offset, int64_t n, const uint8_t* keep) {
            scale_kept(in + offset, keep, n, ks, out + offset);
            append_dropped(in + offset, keep, n, offset, list);
          });
          row_count[i] = static_cast<int64_t>(list.size()) - row_begin[i];
        }
        at::Tensor xa_rows = xa.narrow(0, row0 + first, count);
        at::mm_out(xa_rows, buffer.narrow(0, 0, count), lora_A_t);
      });
    });
    // Column blocks: Wᵀ's rows into wt, then every row of the block.
    at::parallel_for(0, col_blocks, 1, [&](int64_t begin, int64_t end) {
      at::Tensor buffers = at::empty({(K + R + 2) * kColBlock}, acc_options);
      acc_t* wt = buffers.data_ptr<acc_t>();
      acc_t* bt = wt + K * kColBlock;
      acc_t* c = bt + R * kColBlock;
      acc_t* b = c + kColBlock;
      for (int64_t block = begin; block < end; ++block) {
        const int64_t n0 = block * kColBlock, nc = std::min(kColBlock, N - n0);
        for (int64_t k = 0; k < K; ++k) {
          for (int64_t j = 0; j < kColBlock; ++j) {
            wt[k * kColBlock + j] = j < nc ? static_cast<acc_t>(w.at(n0 + j, k)) : acc_t(0);
          }
        }
        for (int64_t r = 0; r < R; ++r) {
          for (int64_t j = 0; j < kColBlock; ++j) {
            bt[r * kColBlock + j] = j < nc ? static_cast<acc_t>(b_lora.at(n0 + j, r)) : acc_t(0);
          }
        }
        for (int64_t j = 0; j < kColBlock; ++j) {
          c[j] = j < nc ? c_data[n0 + j] : acc_t(0);
          b[j] = j < nc && bias_data != nullptr ? static_cast<acc_t>(bias_data[n0 + j]) : acc_t(0);
        }
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t row = row0 + i;
          if (i + kPrefetchRows < rows) {  // the next rows' segments of y and z
            const int64_t ahead = (row + kPrefetchRows) * N + n0;
            for (int64_t j = 0; j < nc; j += kLineElements<scalar_t>) {
              __builtin_prefetch(y_data + ahead + j, 1);
              if (z_data != nullptr) __builtin_prefetch(z_data + ahead + j, 1);
            }
          }
          forward_row(lists[row_task[i]].data() + row_begin[i], row_count[i], xa_data + row * R, R, wt, bt, c, b, s,
                      ks, y_data + row * N + n0, z_data != nullptr ? z_data + row * N + n0 : nullptr, nc);
        }
      }
    });
  }
}

// ---------------------------------------------------------------------------------------
// The sparse recipe: backward.

// The keep bytes of kMaskRows rows' chunks in one Philox loop: row j's chunk starts at element
// begin[j] and its bytes at keep + j * kRowKeepBytes + begin[j] % 4 (a chunk of kColChunk
// elements spans kColChunk / 4 + 1 counter groups when it does not start on a group).
constexpr int kMaskRows = 4;
constexpr int kRunCounters = static_cast<int>(kColChunk / 4) + 1;
constexpr int64_t kRowKeepBytes = 4 * kRunCounters;

DORA_CLONES void keep_chunks(uint64_t seed, const uint64_t* first_groups, uint32_t threshold, uint8_t* keep) {
  keep_counter_runs<kMaskRows, kRunCounters>(seed, first_groups, threshold, keep);
}

// The dropped elements of one row's chunk of kColChunk columns of the sparse backward (kc of
// them real; keep[k] for k < kc; x and dx are the row's segments): for each dropped k,
//   dx[k] = g · wtc[k, :]        (wtc [kColChunk, Np]: W's chunk transposed, zero past N; the
//                                 kept elements already hold h W + dxa A / (1 − p))
//   dac[k, :] += x[k] · dxa      (dac [kColChunk, R]: the dropped part of the chunk's dxaᵀ x)
template <typename T, typename A>
DELTAKERN_ALWAYS_INLINE void backward_row_impl(const uint8_t* keep, const T* x, const T* g, int64_t N, int64_t Np,
                                               const T* dxa, int64_t R, const A* wtc, T* dx, A* dac, int64_t kc) {
  int dropped[kColChunk];
  int n_dropped = 0;
  for (int64_t k = 0; k < kc; ++k) {  // branch-free: a random 1 - p of the branches would be taken
    dropped[n_dropped] = static_cast<int>(k);
    n_dropped += keep[k] == 0;
  }
  for (int d = 0; d < n_dropped; ++d) {
    const A xk = static_cast<A>(x[dropped[d]]);
    A* row = dac + dropped[d] * R;
    for (int64_t r = 0; r < R; ++r) row[r] += xk * static_cast<A>(dxa[r]);
  }
  if constexpr (std::is_same_v<T, double>) {
    for (int d = 0; d < n_dropped; ++d) {
      const double* w = wtc + dropped[d] * Np;
      double acc = 0.0;
      for (int64_t n = 0; n < N; ++n) acc += g[n] * w[n];
      dx[dropped[d]] = acc;
    }
  } else {
    // Four dots at a time, so each load of g serves four, with two partial sums each: eight
    // independent FMA chains hide the FMA latency (with one per dot the loop waited on it).
    for (int d0 = 0; d0 < n_dropped; d0 += 4) {
      const int count = std::min(4, n_dropped - d0);
      const float* w[4];
      for (int t = 0; t < 4; ++t) w[t] = wtc + dropped[d0 + std::min(t, count - 1)] * Np;
      v8f acc[4] = {}, acc2[4] = {};
      int64_t n = 0;
      for (; n + 2 * kLanes8 <= N; n += 2 * kLanes8) {
        const v8f gv = load8(g + n), gv2 = load8(g + n + kLanes8);
        for (int t = 0; t < 4; ++t) {
          acc[t] += gv * load8(w[t] + n);
          acc2[t] += gv2 * load8(w[t] + n + kLanes8);
        }
      }
      for (; n < N; n += kLanes8) {
        const v8f gv = load8_part(g + n, std::min<int64_t>(kLanes8, N - n));
        for (int t = 0; t < 4; ++t) acc[t] += gv * load8(w[t] + n);
      }
      for (int t = 0; t < count; ++t) {
        const v8f total = acc[t] + acc2[t];
        float sum = 0.0f;
        for (int l = 0; l < kLanes8; ++l) sum += total[l];
        dx[dropped[d0 + t]] = static_cast<T>(sum);
      }
    }
  }
}

DORA_CLONES void backward_row(const uint8_t* keep, const float* x, const float* g, int64_t N, int64_t Np,
                              const float* dxa, int64_t R, const float* wtc, float* dx, float* dac, int64_t kc) {
  backward_row_impl(keep, x, g, N, Np, dxa, R, wtc, dx, dac, kc);
}
DORA_CLONES void backward_row(const uint8_t* keep, const c10::BFloat16* x, const c10::BFloat16* g, int64_t N,
                              int64_t Np, const c10::BFloat16* dxa, int64_t R, const float* wtc, c10::BFloat16* dx,
                              float* dac, int64_t kc) {
  backward_row_impl(keep, x, g, N, Np, dxa, R, wtc, dx, dac, kc);
}
void backward_row(const uint8_t* keep, const double* x, const double* g, int64_t N, int64_t Np, const double* dxa,
                  int64_t R, const double* wtc, double* dx, double* dac, int64_t kc) {
  backward_row_impl(keep, x, g, N, Np, dxa, R, wtc, dx, dac, kc);
}

// The chunks of the sparse backward: on entry dx [M, K] holds h W + dxa A / (1 − p) and
// d_lora_A [R, K] holds dxaᵀ x; on return the dropped elements of dx are g W's and d_lora_A is
// (dxaᵀ x − the dropped elements' part) / (1 − p) = dxaᵀ x̃.
template <typename scalar_t>
void sparse_backward_chunks(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& dxa, double dropout_p, int64_t seed, at::Tensor& dx,
                            at::Tensor& d_lora_A) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), R = dxa.size(1);
  const int64_t Np = (N + kLanes8 - 1) / kLanes8 * kLanes8;
  const acc_t ks = static_cast<acc_t>(1.0 / (1.0 - dropout_p));
  const uint32_t threshold = dropout_threshold(static_cast<float>(dropout_p));
  const auto acc_options = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const Strided<scalar_t> w = strided<scalar_t>(weight);
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const scalar_t* g_data = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* dxa_data = dxa.const_data_ptr<scalar_t>();
  scalar_t* dx_data = dx.data_ptr<scalar_t>();
  scalar_t* da_data = d_lora_A.data_ptr<scalar_t>();
  const int64_t chunks = (K + kColChunk - 1) / kColChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor buffers = at::empty({kColChunk * (Np + R)}, acc_options);
    acc_t* wtc = buffers.data_ptr<acc_t>();
    acc_t* dac = wtc + kColChunk * Np;
    alignas(64) uint8_t keep[kMaskRows * kRowKeepBytes];
    uint64_t first_groups[kMaskRows];
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t k0 = chunk * kColChunk, kc = std::min(kColChunk, K - k0);
      // Eight rows of W at a time: the reads are runs along W's rows, the writes runs of eight
      // (one at a time, the scattered stores stalled the transposition).
      for (int64_t n0 = 0; n0 < Np; n0 += kLanes8) {
        for (int64_t k = 0; k < kc; ++k) {
          for (int64_t t = 0; t < kLanes8; ++t) {
            wtc[k * Np + n0 + t] = n0 + t < N ? static_cast<acc_t>(w.at(n0 + t, k0 + k)) : acc_t(0);
          }
        }
      }
      std::fill(dac, dac + kColChunk * R, acc_t(0));
      for (int64_t i = 0; i < M; ++i) {
        if (i + kPrefetchRows < M) {  // the next rows' segments of x and dx, and the start of g's row
          const int64_t ahead = (i + kPrefetchRows) * K + k0;
          for (int64_t k = 0; k < kc; k += kLineElements<scalar_t>) {
            __builtin_prefetch(x_data + ahead + k);
            __builtin_prefetch(dx_data + ahead + k, 1);
          }
          const int64_t g_lines = std::min(N, kPrefetchLines * kLineElements<scalar_t>);
          for (int64_t n = 0; n < g_lines; n += kLineElements<scalar_t>) {
            __builtin_prefetch(g_data + (i + kPrefetchRows) * N + n);
          }
        }
        const int64_t j = i % kMaskRows;
        if (j == 0) {
          for (int64_t t = 0; t < kMaskRows; ++t) {
            first_groups[t] = static_cast<uint64_t>((std::min(i + t, M - 1) * K + k0) / 4);
          }
          keep_chunks(seed, first_groups, threshold, keep);
        }
        const int64_t e0 = i * K + k0;  // the row's first element in the chunk
        backward_row(keep + j * kRowKeepBytes + e0 % 4, x_data + e0, g_data + i * N, N, Np, dxa_data + i * R, R, wtc,
                     dx_data + e0, dac, kc);
      }
      for (int64_t r = 0; r < R; ++r) {
        for (int64_t k = 0; k < kc; ++k) {
          scalar_t& da = da_data[r * K + k0 + k];
          da = static_cast<scalar_t>(ks * (static_cast<acc_t>(da) - dac[k * R + r]));
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& scale, const at::Tensor& xa, const at::Tensor& z, double scaling,
    double dropout_p, int64_t seed) {
  // h = (1 + (c − 1) / (1 − p)) ⊙ g and d_scale in one pass; dx = h W + dxa A / (1 − p), right
  // at the kept elements, and d_lora_A = dxaᵀ x, both MKL; the chunks then fix the dropped
  // elements of both.
  const double ks = 1.0 / (1.0 - dropout_p);
  at::Tensor h = at::empty_like(grad_out);
  at::Tensor d_scale = scale_grad_by(grad_out, z, (scale * ks + (1.0 - ks)).contiguous(), h);
  auto [dxa, d_lora_B] = dora_lowrank_grads(grad_out, lora_B, scale, xa, scaling);
  at::Tensor dx = at::mm(h, weight);
  dx.addmm_(dxa, lora_A, /*beta=*/1.0, /*alpha=*/ks);
  at::Tensor d_lora_A = at::mm(dxa.t(), x);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "dora_sparse_backward_cpu", [&] {
    sparse_backward_chunks<scalar_t>(grad_out, x, weight, dxa, dropout_p, seed, dx, d_lora_A);
  });
  return {dx, d_lora_A, d_lora_B, z.defined() ? d_scale : at::empty({0}, scale.options())};
}

void check_cpu(const at::Tensor& x) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(x.device().is_cpu(), kDoraOp, ": expected CPU tensors, got x on ", x.device());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kDouble, kDoraOp,
              ": CPU kernels take float32, bfloat16 or float64, got x of ", dtype);
}

bool sparse(double dropout_p) { return dropout_p > 0.0 && dropout_p <= kSparseMaxP; }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> dora_linear_fwd_cpu(
    const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& scale_in, double scaling, double dropout_p, const at::Tensor& seed,
    bool save_z) {
  const int64_t seed_value = check_dora_fwd_args(x_in, weight, bias, lora_A, lora_B, scale_in, dropout_p, seed);
  check_cpu(x_in);
  const at::Tensor scale = scale_in.contiguous();
  const std::optional<at::Tensor> b = bias.has_value() ? std::optional(bias->contiguous()) : std::nullopt;
  if (!sparse(dropout_p)) {
    return dora_linear_fwd_gemms(x_in, weight, b, lora_A, lora_B, scale, scaling, dropout_p, seed, save_z, kKernels);
  }
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), N = weight.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor xa = at::empty({M, lora_A.size(0)}, x.options());
  at::Tensor z = save_z ? at::empty({M, N}, x.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "dora_sparse_forward_cpu", [&] {
    sparse_forward<scalar_t>(x, weight, b, lora_A, lora_B, scale, scaling, dropout_p, seed_value, y, xa, z);
  });
  return {y, xa, save_z ? z : at::empty({0}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& scale_in, const at::Tensor& xa, const at::Tensor& z, double scaling,
    double dropout_p, const at::Tensor& seed) {
  const int64_t seed_value = check_dora_bwd_args(grad_out, x, weight, lora_A, lora_B, scale_in, xa, z, dropout_p, seed);
  check_cpu(x);
  const at::Tensor scale = scale_in.contiguous();
  if (!sparse(dropout_p)) {
    return dora_linear_bwd_gemms(grad_out, x, weight, lora_A, lora_B, scale, xa, z, scaling, dropout_p, seed,
                                 kKernels);
  }
  return sparse_backward(grad_out.contiguous(), x.contiguous(), weight, lora_A, lora_B, scale, xa.contiguous(),
                         z.dim() == 2 ? z.contiguous() : at::Tensor(), scaling, dropout_p, seed_value);
}

}  // namespace deltakern
