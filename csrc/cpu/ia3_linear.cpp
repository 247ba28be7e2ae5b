// CPU forward and backward of ia3_linear, the (IA)³ projection
//   output scale   z = x Wᵀ + b,  out = z ⊙ s                 dx = (dY ⊙ s) W,  ds = Σ_m dY ⊙ z
//   input scale    out = (x ⊙ s) Wᵀ + b                       g = dY W,  dx = g ⊙ s,  ds = Σ_m g ⊙ x
// as one GEMM each way; the scale never takes a pass of its own over [M, N] or [M, K]: it goes
// into the GEMM's epilogue, into the GEMM's copy of W, or into a block of the left operand's
// rows in a task buffer while the block is in cache. The output C [M, cols] of the GEMM is cut
// into tiles of kBlockRows x kColChunk, numbered row-major and split into one contiguous run per
// thread (for_each_tile); each tile is one block GEMM (single-threaded, inside the parallel
// region) followed by its epilogue on the tile in cache:
//   forward    C = x (Wᵀ ⊙ s) or x Wᵀ        out = C + b, or z = C + b and out = z ⊙ s
//   backward   C = dY W or dY (s ⊙ W)        dx = C ⊙ s and ds += Σ_rows C ⊙ x, or dx = C
// and the output scale's backward adds ds += Σ_rows dY ⊙ z in a pass over each row block of dY
// before the block's tiles (row_prologue).
//
// The block GEMMs (gemm_tile): fp32 (from kPackMinRowsForward / kPackMinRowsBackward rows on)
// and bf16 run oneDNN's brgemm microkernel (brgemm of blocks.h) on a copy of W packed
// once per call into column panels (pack_transposed: the forward's Wᵀ; pack_rows: the
// backward's W; bf16 in oneDNN's VNNI layout), fp32 with the scale folded into the copy. bf16
// accumulates in fp32 in a tile buffer and rounds each output once (z and out from the same
// fp32 value). fp64 (gradcheck) and small fp32 problems take ATen's GEMM (MKL) on views of W,
// scaling a copy of W when the other operand is the larger one (M > N forward, M > K backward),
// else x's or dY's rows block by block.
//
// NOTE brgemm against MKL on this machine (AMD EPYC, Zen 5, AVX-512; MKL takes its AVX2 path on
// AMD), the GEMM [2048 x 1024] x [1024 x 1024] fp32 alone in these tiles, median of 9: brgemm on
// packed panels 9.1 ms on 2 threads (pack included), on Wᵀ made contiguous 10.9 ms, MKL per tile
// 20.2 ms, MKL on the whole product (eager) 18.4-19.4 ms; one thread 17.8 / 19.5 / 39.4 /
// 37.3 ms. bf16's brgemm is on par with oneDNN's bf16 GEMM (table below). Folding the fp32
// input scale into the packed Wᵀ or scaling blocks of x's rows instead took the same time
// (17.76 / 17.75 ms forward, one thread); folding the output scale into the packed W rather than
// scaling blocks of dY's rows saved 1-2 % of the backward (9.37 / 9.47 ms on 2 threads, 18.1 /
// 18.5 ms on one).
//
// NOTE bf16 scales x's rows (forward, input scale) and dY's rows (backward, output scale) rather
// than W: the scaled operand is rounded to bf16 either way, and rounding the one eager PyTorch
// rounds keeps the error where eager's is. Folded into W, dx at M = 1, K = 1, N = 300 came out at
// 14 times eager's error against fp64, 1.4 times the bound of tests/tolerances.py (2 x eager's
// error + one bf16 ulp); with rows scaled, the worst of ~700 random bf16 cases (M in 0..300, K in
// 0..300, N in 1..300) reached 0.5 of that bound for dx and out. Scaling rows costs 0-4 % (M =
// 2048, K = N = 1024, one thread: forward 9.78 / 9.61 ms, backward 10.0 / 9.6 ms).
//
// NOTE timings at M = 2048, K = N = 1024, interleaved medians of 21, against the eager sequence
// PEFT runs (F.linear then * s, or x * s then F.linear; backward by autograd); "step" is forward
// + backward through deltakern.ia3_linear with autograd, gradients of x and s:
// ours / eager in ms           2 threads: fwd, step            1 thread: fwd, step
//   fp32 output scale          9.6 / 20.0, 20.0 / 41.2         18.3 / 39.8, 38.4 / 81.5
//   fp32 input scale           9.2 / 20.5, 20.7 / 43.1         17.7 / 38.6, 36.9 / 78.4
//   bf16 output scale          4.8 / 5.0, 10.3-11.2 / 10.4-11.9  9.2 / 9.4, 24.0 / 26.1
//   bf16 input scale           4.7 / 4.9, 10.1 / 10.0          9.1 / 9.4, 19.6 / 20.8
// (the backward op alone: fp32 9.3-9.7 ms, bf16 4.9 ms on 2 threads). fp32's 0.47-0.48x is the
// GEMM's (above); eager's separate scale pass is ~0.1 ms of it. Small M (2 threads, fp32 / bf16
// forward against eager): M = 1 0.06 / 0.06 and 0.09 / 0.05 ms, M = 16 0.19 / 0.26 and 0.11 /
// 0.08 ms, M = 256 1.2 / 2.5 and 0.63 / 0.59 ms: bf16's packing of Wᵀ (0.06 ms) is what small
// problems pay over oneDNN.
//
// The sums over M for ds run in fp64 per task (PartialSums of blocks.h, whose NOTE gives the
// reason), added up in task order at the end: reproducible run to run at a given thread count.
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
#include "ia3_linear.h"
#include "vec16.h"

namespace deltakern {
namespace {

constexpr const char* kOp = "deltakern.ia3_linear";

using namespace vec16;

// Tile rows, tile columns and reduction chunk of the block GEMMs.
constexpr int64_t kBlockRows = 128;
constexpr int64_t kColChunk = 256;
constexpr int64_t kRedChunk = 256;
// fp32 problems with fewer rows than these take MKL on views of W instead of brgemm on a packed
// copy. NOTE measured at K = N = 1024, output scale, medians of 41 (pack cost ~ N K, the GEMM's
// saving ~ M N K, so the crossover is a row count): forward (packing transposes W) brgemm / MKL
// 0.20 / 0.21 ms at M = 16, 0.29 / 0.37 ms at 32, 0.17 / 0.14 ms at 8 on 2 threads; backward
// (packing copies W's rows) 0.13 / 0.16 ms at M = 4, 0.09 / 0.08 ms at 2.
constexpr int64_t kPackMinRowsForward = 16;
constexpr int64_t kPackMinRowsBackward = 4;
// Multiply-adds per task, at least: small problems take fewer threads.
constexpr int64_t kTaskWork = int64_t{1} << 20;

// ---------------------------------------------------------------------------------------
// Element-wise passes on tiles. The *_impl templates hold the loops; DELTAKERN_CLONES overloads
// instantiate them for fp32 and bf16 (16-lane fp32 vectors) and fp64 (scalars).

// The forward's epilogue on a tile [rows, n] of the GEMM result c: v = c + bias, then z = v and
// out = v ⊙ s (output scale; z and s given), or out = v (input scale). bias may be null; c may
// alias z or out.
template <typename scalar_t, typename acc_t>
DELTAKERN_ALWAYS_INLINE void forward_tile_impl(const acc_t* c, int64_t ldc, const scalar_t* bias, const scalar_t* s,
                                               scalar_t* z, int64_t ldz, scalar_t* out, int64_t ldo, int64_t rows,
                                               int64_t n) {
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t* c_row = c + i * ldc;
    scalar_t* out_row = out + i * ldo;
    scalar_t* z_row = z != nullptr ? z + i * ldz : nullptr;
    if constexpr (std::is_same_v<scalar_t, double>) {
      for (int64_t j = 0; j < n; ++j) {
        const double v = c_row[j] + (bias != nullptr ? bias[j] : 0.0);
        if (z_row != nullptr) z_row[j] = v;
        out_row[j] = s != nullptr ? v * s[j] : v;
      }
    } else {
      for_each_chunk(n, [&](int64_t j, int64_t count) __attribute__((always_inline)) {
        vfloat v = load_part(c_row + j, count);
        if (bias != nullptr) v += load_part(bias + j, count);
        if (z_row != nullptr) store_part(z_row + j, v, count);
        store_part(out_row + j, s != nullptr ? v * load_part(s + j, count) : v, count);
      });
    }
  }
}

DELTAKERN_CLONES void forward_tile(const float* c, int64_t ldc, const float* bias, const float* s, float* z,
                                   int64_t ldz, float* out, int64_t ldo, int64_t rows, int64_t n) {
  forward_tile_impl(c, ldc, bias, s, z, ldz, out, ldo, rows, n);
}
DELTAKERN_CLONES void forward_tile(const float* c, int64_t ldc, const c10::BFloat16* bias, const c10::BFloat16* s,
                                   c10::BFloat16* z, int64_t ldz, c10::BFloat16* out, int64_t ldo, int64_t rows,
                                   int64_t n) {
  forward_tile_impl(c, ldc, bias, s, z, ldz, out, ldo, rows, n);
}
void forward_tile(const double* c, int64_t ldc, const double* bias, const double* s, double* z, int64_t ldz,
                  double* out, int64_t ldo, int64_t rows, int64_t n) {
  forward_tile_impl(c, ldc, bias, s, z, ldz, out, ldo, rows, n);
}

// The input scale's backward epilogue on a tile [rows, n] of g = dY W: ds_sum += Σ_rows g ⊙ x,
// dx = g ⊙ s. g may alias dx.
template <typename scalar_t, typename acc_t>
DELTAKERN_ALWAYS_INLINE void input_grad_tile_impl(const acc_t* g, int64_t ldg, const scalar_t* x, int64_t ldx,
                                                  const scalar_t* s, scalar_t* dx, int64_t lddx, double* ds_sum,
                                                  int64_t rows, int64_t n) {
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t* g_row = g + i * ldg;
    const scalar_t* x_row = x + i * ldx;
    scalar_t* dx_row = dx + i * lddx;
    if constexpr (std::is_same_v<scalar_t, double>) {
      for (int64_t j = 0; j < n; ++j) {
        ds_sum[j] += g_row[j] * x_row[j];
        dx_row[j] = g_row[j] * s[j];
      }
    } else {
      for_each_chunk(n, [&](int64_t j, int64_t count) __attribute__((always_inline)) {
        const vfloat gv = load_part(g_row + j, count);
        add_to_fp64(ds_sum + j, gv * load_part(x_row + j, count), count);
        store_part(dx_row + j, gv * load_part(s + j, count), count);
      });
    }
  }
}

DELTAKERN_CLONES void input_grad_tile(const float* g, int64_t ldg, const float* x, int64_t ldx, const float* s,
                                      float* dx, int64_t lddx, double* ds_sum, int64_t rows, int64_t n) {
  input_grad_tile_impl(g, ldg, x, ldx, s, dx, lddx, ds_sum, rows, n);
}
DELTAKERN_CLONES void input_grad_tile(const float* g, int64_t ldg, const c10::BFloat16* x, int64_t ldx,
                                      const c10::BFloat16* s, c10::BFloat16* dx, int64_t lddx, double* ds_sum,
                                      int64_t rows, int64_t n) {
  input_grad_tile_impl(g, ldg, x, ldx, s, dx, lddx, ds_sum, rows, n);
}
void input_grad_tile(const double* g, int64_t ldg, const double* x, int64_t ldx, const double* s, double* dx,
                     int64_t lddx, double* ds_sum, int64_t rows, int64_t n) {
  input_grad_tile_impl(g, ldg, x, ldx, s, dx, lddx, ds_sum, rows, n);
}

// A pass over a block of rows [rows, n] (row stride lda) of a GEMM's left operand a before its
// tiles: ds_sum += Σ_rows a ⊙ z when ds_sum is given (z has a's row stride), and scaled = a ⊙ s
// ([rows, n] contiguous) when scaled is given.
template <typename scalar_t>
DELTAKERN_ALWAYS_INLINE void row_prologue_impl(const scalar_t* a, int64_t lda, const scalar_t* z, const scalar_t* s,
                                               scalar_t* scaled, double* ds_sum, int64_t rows, int64_t n) {
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* a_row = a + i * lda;
    const scalar_t* z_row = ds_sum != nullptr ? z + i * lda : nullptr;
    scalar_t* scaled_row = scaled != nullptr ? scaled + i * n : nullptr;
    if constexpr (std::is_same_v<scalar_t, double>) {
      for (int64_t j = 0; j < n; ++j) {
        if (ds_sum != nullptr) ds_sum[j] += a_row[j] * z_row[j];
        if (scaled_row != nullptr) scaled_row[j] = a_row[j] * s[j];
      }
    } else {
      for_each_chunk(n, [&](int64_t j, int64_t count) __attribute__((always_inline)) {
        const vfloat av = load_part(a_row + j, count);
        if (ds_sum != nullptr) add_to_fp64(ds_sum + j, av * load_part(z_row + j, count), count);
        if (scaled_row != nullptr) store_part(scaled_row + j, av * load_part(s + j, count), count);
      });
    }
  }
}

DELTAKERN_CLONES void row_prologue(const float* a, int64_t lda, const float* z, const float* s, float* scaled,
                                   double* ds_sum, int64_t rows, int64_t n) {
  row_prologue_impl(a, lda, z, s, scaled, ds_sum, rows, n);
}
DELTAKERN_CLONES void row_prologue(const c10::BFloat16* a, int64_t lda, const c10::BFloat16* z,
                                   const c10::BFloat16* s, c10::BFloat16* scaled, double* ds_sum, int64_t rows,
                                   int64_t n) {
  row_prologue_impl(a, lda, z, s, scaled, ds_sum, rows, n);
}
void row_prologue(const double* a, int64_t lda, const double* z, const double* s, double* scaled, double* ds_sum,
                  int64_t rows, int64_t n) {
  row_prologue_impl(a, lda, z, s, scaled, ds_sum, rows, n);
}

// ---------------------------------------------------------------------------------------
// Block GEMMs C[rows, nc] = A[rows, red] B[red, c0 : c0 + nc] on row-major blocks.

// The right operand B [red, cols] of the block GEMMs.
template <typename scalar_t>
struct RightOperand {
  enum Kind {
    kPanels,  // packed into `storage` by pack_transposed or pack_rows (brgemm)
    kAten,    // `storage` is B itself, any strides (ATen's GEMM)
  };
  Kind kind;
  int64_t red;
  at::Tensor storage;
};

// The right operand B [red, cols] of a brgemm, packed in column panels of kColChunk: panel j
// holds the columns [j kColChunk, j kColChunk + nc_j) as a row-major [red, nc_j] block at offset
// j kColChunk red_p; bf16 in the VNNI layout oneDNN's bf16 brgemm takes ([red_p / 2, nc_j, 2]:
// the rows of a pair interleaved, red_p = red rounded up to even, the padding row zero).
template <typename scalar_t>
int64_t padded_red(int64_t red) {
  return std::is_same_v<scalar_t, c10::BFloat16> ? (red + 1) / 2 * 2 : red;
}

// Columns of B per pack task: one 64-byte line of a panel row.
constexpr int64_t kPackCols = 16;

using vword = uint32_t __attribute__((vector_size(64)));

// dst[q * ldd + c] = word q of row c, times scale[q] as fp32 when scale is given, for the
// rows c < n (n <= 16) at src + c * lds bytes and the 32-bit words q < words. Full 16 x 16
// blocks are transposed in registers: four rounds of interleaving rows i and i + 8.
DELTAKERN_CLONES void transpose_words(const unsigned char* src, int64_t lds, int64_t n, int64_t words, uint32_t* dst,
                                      int64_t ldd, const float* scale) {
  int64_t q0 = 0;
  if (n == kPackCols) {
    for (; q0 + 16 <= words; q0 += 16) {
      vword rows[16];
      for (int c = 0; c < 16; ++c) std::memcpy(&rows[c], src + c * lds + q0 * 4, sizeof(vword));
      for (int round = 0; round < 4; ++round) {
        vword next[16];
        for (int i = 0; i < 8; ++i) {
          next[2 * i] = __builtin_shufflevector(rows[i], rows[i + 8], 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6,
                                                22, 7, 23);
          next[2 * i + 1] = __builtin_shufflevector(rows[i], rows[i + 8], 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13,
                                                    29, 14, 30, 15, 31);
        }
        for (int i = 0; i < 16; ++i) rows[i] = next[i];
      }
      for (int q = 0; q < 16; ++q) {
        if (scale != nullptr) {
          vfloat v = reinterpret_cast<vfloat>(rows[q]) * scale[q0 + q];
          rows[q] = reinterpret_cast<vword>(v);
        }
        std::memcpy(dst + (q0 + q) * ldd, &rows[q], sizeof(vword));
      }
    }
  }
  for (int64_t q = q0; q < words; ++q) {
    for (int64_t c = 0; c < n; ++c) {
      uint32_t word;
      std::memcpy(&word, src + c * lds + q * 4, sizeof(word));
      if (scale != nullptr) {
        float value;
        std::memcpy(&value, &word, sizeof(value));
        value *= scale[q];
        std::memcpy(&word, &value, sizeof(word));
      }
      dst[q * ldd + c] = word;
    }
  }
}

// Calls f(c_first, n, panel, nc) for the groups of kPackCols columns of B [red_p, cols] in
// parallel: the group's columns are [c_first, c_first + n) and start at `panel` (32-bit words)
// in their panel of width nc.
template <typename F>
void for_each_column_group(uint32_t* out, int64_t red_p, int64_t cols, int64_t elements_per_word, F&& f) {
  at::parallel_for(0, (cols + kPackCols - 1) / kPackCols, 1, [&](int64_t begin, int64_t end) {
    for (int64_t group = begin; group < end; ++group) {
      const int64_t c_first = group * kPackCols;
      const int64_t c0 = c_first / kColChunk * kColChunk;
      f(c_first, std::min(kPackCols, cols - c_first), out + (c0 * red_p) / elements_per_word + (c_first - c0),
        std::min(kColChunk, cols - c0));
    }
  });
}

// fp32 B = Wᵀ ⊙ scale[:, None] (scale over W's columns, or none) for W [cols, red] with row
// stride ldw: the forward's operand. Each task transposes kPackCols rows of W.
at::Tensor pack_transposed(const float* w, int64_t ldw, int64_t red, int64_t cols, const float* scale) {
  at::Tensor packed = at::empty({red * cols}, at::TensorOptions().dtype(at::kFloat));
  auto* out = reinterpret_cast<uint32_t*>(packed.data_ptr<float>());
  for_each_column_group(out, red, cols, 1, [&](int64_t c_first, int64_t n, uint32_t* panel, int64_t nc) {
    transpose_words(reinterpret_cast<const unsigned char*>(w + c_first * ldw), ldw * 4, n, red, panel, nc, scale);
  });
  return packed;
}

// bf16 B = Wᵀ in VNNI panels for W [cols, red] with row stride ldw: the forward's operand. A
// VNNI word (two bf16 of one column of B) is two neighbours in a row of W, so this is the fp32
// transposition on 32-bit words, plus the zero-padded last word when red is odd.
at::Tensor pack_transposed(const c10::BFloat16* w, int64_t ldw, int64_t red, int64_t cols) {
  const int64_t red_p = padded_red<c10::BFloat16>(red);
  at::Tensor packed = at::empty({red_p * cols}, at::TensorOptions().dtype(at::kBFloat16));
  auto* out = reinterpret_cast<uint32_t*>(packed.data_ptr<c10::BFloat16>());
  for_each_column_group(out, red_p, cols, 2, [&](int64_t c_first, int64_t n, uint32_t* panel, int64_t nc) {
    const c10::BFloat16* src = w + c_first * ldw;
    transpose_words(reinterpret_cast<const unsigned char*>(src), ldw * 2, n, red / 2, panel, nc, nullptr);
    if (red % 2 == 1) {
      for (int64_t c = 0; c < n; ++c) {
        const c10::BFloat16 pair[2] = {src[c * ldw + red - 1], c10::BFloat16(0.0f)};
        std::memcpy(panel + red / 2 * nc + c, pair, sizeof(uint32_t));
      }
    }
  });
  return packed;
}

// fp32 B = scale[:, None] ⊙ W (or W) for W [red, cols] with row stride ldw: the backward's
// operand, its rows copied into the panels. NOTE packing W (0.1 ms) rather than reading it in
// place (row stride K) made the fp32 backward at M=2048, K=N=1024 0.5-0.9 ms faster on 2 threads
// (input scale 10.6 -> 9.7 ms, output 10.3 -> 9.7 ms) and 1.6-2.4 ms on one (interleaved
// medians of 41).
at::Tensor pack_rows(const float* w, int64_t ldw, int64_t red, int64_t cols, const float* scale) {
  at::Tensor packed = at::empty({red * cols}, at::TensorOptions().dtype(at::kFloat));
  float* out = packed.data_ptr<float>();
  const int64_t panels = (cols + kColChunk - 1) / kColChunk;
  at::parallel_for(0, panels * red, 64, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c0 = task / red * kColChunk, r = task % red;
      const int64_t nc = std::min(kColChunk, cols - c0);
      const float sr = scale != nullptr ? scale[r] : 1.0f;
      const float* src = w + r * ldw + c0;
      float* dst = out + c0 * red + r * nc;
      for (int64_t c = 0; c < nc; ++c) dst[c] = src[c] * sr;
    }
  });
  return packed;
}

// bf16 B = W in VNNI panels for W [red, cols] with row stride ldw: the backward's operand. Each
// task interleaves one row pair of one panel.
at::Tensor pack_rows(const c10::BFloat16* w, int64_t ldw, int64_t red, int64_t cols) {
  const int64_t red_p = padded_red<c10::BFloat16>(red);
  at::Tensor packed = at::empty({red_p * cols}, at::TensorOptions().dtype(at::kBFloat16));
  auto* out = reinterpret_cast<uint16_t*>(packed.data_ptr<c10::BFloat16>());
  const auto* src = reinterpret_cast<const uint16_t*>(w);
  const int64_t pairs = red_p / 2, panels = (cols + kColChunk - 1) / kColChunk;
  at::parallel_for(0, panels * pairs, 16, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c0 = task / pairs * kColChunk, r = task % pairs * 2;
      const int64_t nc = std::min(kColChunk, cols - c0);
      const uint16_t* row0 = src + r * ldw + c0;
      uint16_t* dst = out + c0 * red_p + r * nc;
      if (r + 1 < red) {
        const uint16_t* row1 = row0 + ldw;
        for (int64_t c = 0; c < nc; ++c) {
          dst[2 * c] = row0[c];
          dst[2 * c + 1] = row1[c];
        }
      } else {
        for (int64_t c = 0; c < nc; ++c) {
          dst[2 * c] = row0[c];
          dst[2 * c + 1] = 0;  // bf16 +0
        }
      }
    }
  });
  return packed;
}

// C[rows, nc] (row stride ldc) = A[rows, red] (row stride lda) B[:, c0 : c0 + nc]. brgemm sums
// in chunks of kRedChunk, each accumulated onto C: NOTE fp32 [2048 x 1024] x [1024 x 1024],
// maximum error relative to the largest |C| against fp64: one brgemm call over the whole
// reduction 1.5e-6, chunks of 256 4.2e-7 and 9.1 ms (chunks of 128: 2.9e-7, 9.1-9.4 ms), MKL
// 3.9e-7; the 256 x 256 panel chunk (256 KiB) stays in L2.
template <typename scalar_t, typename acc_t>
void gemm_tile(const RightOperand<scalar_t>& b, int64_t rows, int64_t c0, int64_t nc, const scalar_t* a,
               int64_t lda, acc_t* c, int64_t ldc) {
  if (b.red == 0) {
    for (int64_t i = 0; i < rows; ++i) std::fill(c + i * ldc, c + i * ldc + nc, acc_t(0));
    return;
  }
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (b.kind == RightOperand<scalar_t>::kAten) {
      at::Tensor c_view = block_view(c, rows, nc, ldc);
      at::mm_out(c_view, block_view(a, rows, b.red, lda), b.storage.narrow(1, c0, nc));
      return;
    }
  }
  if constexpr (!std::is_same_v<scalar_t, double>) {
    // The panel of columns c0.. starts at c0 red_p; its rows are nc wide (VNNI's row pair r0 / 2
    // at r0 nc too).
    const scalar_t* panel = b.storage.template const_data_ptr<scalar_t>() + c0 * padded_red<scalar_t>(b.red);
    for (int64_t r0 = 0; r0 < b.red; r0 += kRedChunk) {
      brgemm(rows, nc, std::min(kRedChunk, b.red - r0), a + r0, lda, panel + r0 * nc, nc, c, ldc, r0 > 0);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Parallel driver.

// Tasks for an output [M, cols] with a reduction of red: one per thread, fewer for small
// problems or few tiles.
int64_t num_tasks(int64_t M, int64_t cols, int64_t red) {
  const int64_t tiles = (M + kBlockRows - 1) / kBlockRows * std::max<int64_t>(1, (cols + kColChunk - 1) / kColChunk);
  const int64_t work = M * std::max<int64_t>(cols, 1) * (red + 1);
  return std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), tiles, work / kTaskWork}));
}

// Runs the tiles of an output [M, cols] (row blocks of kBlockRows x column chunks of kColChunk,
// numbered row-major) in `tasks` contiguous runs in parallel. Per task and row block it meets,
// first on_block(task, m, rows, owner) where owner says whether the task has the row block's
// first tile (exactly one task does, so per-row-block work that must happen once goes there),
// then on_tile(task, m, rows, c0, nc) for its tiles of that block. With cols = 0 every row block
// still gets its on_block. The split depends only on the shape and the thread count, so results
// are reproducible run to run.
template <typename OnBlock, typename OnTile>
void for_each_tile(int64_t M, int64_t cols, int64_t tasks, OnBlock&& on_block, OnTile&& on_tile) {
  const int64_t chunks = std::max<int64_t>(1, (cols + kColChunk - 1) / kColChunk);
  const int64_t tiles = (M + kBlockRows - 1) / kBlockRows * chunks;
  for_each_share(tiles, tasks, [&](int64_t task, int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      const int64_t block = t / chunks, chunk = t % chunks;
      const int64_t m = block * kBlockRows, rows = std::min(kBlockRows, M - m);
      if (t == first || chunk == 0) on_block(task, m, rows, chunk == 0);
      const int64_t c0 = chunk * kColChunk, nc = std::min(kColChunk, cols - c0);
      if (nc > 0) on_tile(task, m, rows, c0, nc);
    }
  });
}

// Uninitialized scratch of n elements (task buffers).
template <typename T>
at::Tensor scratch(int64_t n) {
  return at::empty({n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// ---------------------------------------------------------------------------------------
// Forward and backward.

template <typename scalar_t>
void forward(const at::Tensor& x, const at::Tensor& weight, const scalar_t* bias, const at::Tensor& scale,
             bool scale_input, at::Tensor& out, at::Tensor& z) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kInPlace = std::is_same_v<scalar_t, acc_t>;  // the GEMM writes the output tensor
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const scalar_t* s = scale.const_data_ptr<scalar_t>();
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  scalar_t* out_data = out.data_ptr<scalar_t>();
  scalar_t* z_data = scale_input ? nullptr : z.data_ptr<scalar_t>();
  // B = Wᵀ [K, N]. An input scale goes into B when B is packed (fp32, at no cost) or, on MKL's
  // path, into a scaled copy of W when x is the larger operand (M > N); else into each block of
  // x's rows, in a task buffer. bf16 always scales x's rows (NOTE at the top of the file).
  RightOperand<scalar_t> b{RightOperand<scalar_t>::kAten, K, at::Tensor()};
  bool scale_rows = false;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    b.kind = RightOperand<scalar_t>::kPanels;
    b.storage = pack_transposed(weight.const_data_ptr<scalar_t>(), K, K, N);
    scale_rows = scale_input;
  } else {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (M >= kPackMinRowsForward) {
        b.kind = RightOperand<scalar_t>::kPanels;
        b.storage = pack_transposed(weight.const_data_ptr<scalar_t>(), K, K, N, scale_input ? s : nullptr);
      }
    }
    if (b.kind == RightOperand<scalar_t>::kAten) {
      if (scale_input && M > N) {
        b.storage = (weight * scale).t();
      } else {
        b.storage = weight.t();
        scale_rows = scale_input;
      }
    }
  }
  const int64_t tasks = num_tasks(M, N, K);
  const int64_t block_rows = std::min(kBlockRows, M);
  at::Tensor x_scaled_buffer = scratch<scalar_t>(scale_rows ? tasks * block_rows * K : 0);
  scalar_t* x_scaled = x_scaled_buffer.data_ptr<scalar_t>();
  at::Tensor c_buffer = scratch<acc_t>(kInPlace ? 0 : tasks * block_rows * kColChunk);
  acc_t* c_tiles = c_buffer.data_ptr<acc_t>();
  for_each_tile(
      M, N, tasks,
      [&](int64_t task, int64_t m, int64_t rows, bool) {
        if (scale_rows) row_prologue(x_data + m * K, K, nullptr, s, x_scaled + task * block_rows * K, nullptr, rows, K);
      },
      [&](int64_t task, int64_t m, int64_t rows, int64_t c0, int64_t nc) {
        const scalar_t* a = scale_rows ? x_scaled + task * block_rows * K : x_data + m * K;
        acc_t* c = c_tiles + task * block_rows * kColChunk;
        int64_t ldc = kColChunk;
        if constexpr (kInPlace) {
          c = (scale_input ? out_data : z_data) + m * N + c0;
          ldc = N;
        }
        gemm_tile(b, rows, c0, nc, a, K, c, ldc);
        const scalar_t* bias_tile = bias != nullptr ? bias + c0 : nullptr;
        if (!scale_input) {
          forward_tile(c, ldc, bias_tile, s + c0, z_data + m * N + c0, N, out_data + m * N + c0, N, rows, nc);
        } else if (!kInPlace || bias != nullptr) {
          forward_tile(c, ldc, bias_tile, nullptr, nullptr, 0, out_data + m * N + c0, N, rows, nc);
        }
      });
}

// Returns ds; writes dx.
template <typename scalar_t>
at::Tensor backward(const at::Tensor& grad_out, const at::Tensor& unscaled, const at::Tensor& weight,
                    const at::Tensor& scale, bool scale_input, at::Tensor& dx) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kInPlace = std::is_same_v<scalar_t, acc_t>;
  const int64_t M = grad_out.size(0), N = weight.size(0), K = weight.size(1);
  const scalar_t* s = scale.const_data_ptr<scalar_t>();
  const scalar_t* dy = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* u = unscaled.const_data_ptr<scalar_t>();
  scalar_t* dx_data = dx.data_ptr<scalar_t>();
  // B = W [N, K]. An output scale goes into B when B is packed (fp32, at no cost) or, on MKL's
  // path, into a scaled copy of W when dY is the larger operand (M > K); else into each block of
  // dY's rows, in a task buffer written by the pass over the block that sums dY ⊙ z anyway. bf16
  // always scales dY's rows (NOTE at the top of the file).
  RightOperand<scalar_t> b{RightOperand<scalar_t>::kAten, N, at::Tensor()};
  bool scale_rows = !scale_input;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    b.kind = RightOperand<scalar_t>::kPanels;
    b.storage = pack_rows(weight.const_data_ptr<scalar_t>(), K, N, K);
  } else {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (M >= kPackMinRowsBackward) {
        b.kind = RightOperand<scalar_t>::kPanels;
        b.storage = pack_rows(weight.const_data_ptr<scalar_t>(), K, N, K, scale_input ? nullptr : s);
        scale_rows = false;
      }
    }
    if (b.kind == RightOperand<scalar_t>::kAten) {
      if (!scale_input && M > K) {
        b.storage = weight * scale.unsqueeze(1);
        scale_rows = false;
      } else {
        b.storage = weight;
      }
    }
  }
  const int64_t tasks = num_tasks(M, K, N);
  const int64_t len = scale_input ? K : N;
  PartialSums partial(tasks, len);
  const int64_t block_rows = std::min(kBlockRows, M);
  at::Tensor dy_scaled_buffer = scratch<scalar_t>(scale_rows ? tasks * block_rows * N : 0);
  scalar_t* dy_scaled = dy_scaled_buffer.data_ptr<scalar_t>();
  at::Tensor c_buffer = scratch<acc_t>(kInPlace ? 0 : tasks * block_rows * kColChunk);
  acc_t* c_tiles = c_buffer.data_ptr<acc_t>();
  for_each_tile(
      M, K, tasks,
      [&](int64_t task, int64_t m, int64_t rows, bool owner) {
        if (!scale_input && (scale_rows || owner)) {
          row_prologue(dy + m * N, N, u + m * N, s, scale_rows ? dy_scaled + task * block_rows * N : nullptr,
                       owner ? partial.of(task) : nullptr, rows, N);
        }
      },
      [&](int64_t task, int64_t m, int64_t rows, int64_t c0, int64_t nc) {
        const scalar_t* a = scale_rows ? dy_scaled + task * block_rows * N : dy + m * N;
        scalar_t* dst = dx_data + m * K + c0;
        acc_t* c = c_tiles + task * block_rows * kColChunk;
        int64_t ldc = kColChunk;
        if constexpr (kInPlace) {
          c = dst;
          ldc = K;
        }
        gemm_tile(b, rows, c0, nc, a, N, c, ldc);
        if (scale_input) {
          input_grad_tile(c, ldc, u + m * K + c0, K, s + c0, dst, K, partial.of(task) + c0, rows, nc);
        } else if (!kInPlace) {
          forward_tile(c, ldc, nullptr, nullptr, nullptr, 0, dst, K, rows, nc);
        }
      });
  return partial.sum(scale.options());
}

// Whether oneDNN's bf16 brgemm runs here: it needs AVX-512 (avx512_core), a torch built with
// oneDNN's microkernel API and oneDNN enabled (torch.backends.mkldnn), and otherwise raises.
// Probed once with a 1 x 1 product.
bool bf16_brgemm_usable() {
  if (!at::globalContext().userEnabledMkldnn()) return false;
  static const bool usable = [] {
    const c10::BFloat16 a[2] = {1.0f, 1.0f}, b[2] = {1.0f, 1.0f};
    float c = 0.0f;
    try {
      brgemm(1, 1, 2, a, 2, b, 1, &c, 1, false);
    } catch (const c10::Error&) {
      return false;
    }
    return c == 2.0f;
  }();
  return usable;
}

void check_cpu_dtype(const at::Tensor& x, const char* name) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kDouble, kOp,
              ": CPU kernels take float32, bfloat16 or float64, got ", name, " of ", dtype);
  TORCH_CHECK(x.device().is_cpu(), kOp, ": expected CPU tensors, got ", name, " on ", x.device());
  TORCH_CHECK(x.is_contiguous(), kOp, ": ", name, " must be contiguous");
}

// t has shape `expected` (named `dims`), first's dtype and device, and is contiguous.
void check_operand(const at::Tensor& t, const at::Tensor& first, const char* name, at::IntArrayRef expected,
                   const char* dims) {
  TORCH_CHECK(t.sizes() == expected, kOp, ": ", name, " must be ", dims, " = ", expected, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == first.scalar_type(), kOp, ": ", name, " must have dtype ", first.scalar_type(),
              " like the other inputs, got ", t.scalar_type());
  TORCH_CHECK(t.device() == first.device(), kOp, ": ", name, " must be on ", first.device(), ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), kOp, ": ", name, " must be contiguous");
}

void check_scale(const at::Tensor& scale, const at::Tensor& first, bool scale_input, int64_t K, int64_t N) {
  if (scale_input) {
    check_operand(scale, first, "scale", {K}, "[K] (an input scale)");
  } else {
    check_operand(scale, first, "scale", {N}, "[N] (an output scale)");
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ia3_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& bias,
                                                      const at::Tensor& scale, bool scale_input) {
  TORCH_CHECK(x.dim() == 2, kOp, ": x must be 2-D [M, K], got ", x.sizes());
  check_cpu_dtype(x, "x");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), kOp, ": weight must be [N, K] with K = ", x.size(1),
              ", got ", weight.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  check_operand(weight, x, "weight", {N, K}, "[N, K]");
  if (bias.has_value()) check_operand(*bias, x, "bias", {N}, "[N]");
  check_scale(scale, x, scale_input, K, N);
  if (x.scalar_type() == at::kBFloat16 && !bf16_brgemm_usable()) {
    // The fp32 kernels on fp32 copies, each output rounded once.
    const auto f32 = [](const at::Tensor& t) { return t.to(at::kFloat); };
    const auto [out, z] = ia3_linear_fwd_cpu(f32(x), f32(weight), bias.has_value() ? std::optional(f32(*bias)) : std::nullopt,
                                             f32(scale), scale_input);
    return {out.to(at::kBFloat16), z.to(at::kBFloat16)};
  }
  at::Tensor out = at::empty({M, N}, x.options());
  at::Tensor z = at::empty({scale_input ? 0 : M, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "ia3_linear_fwd_cpu", [&] {
    forward<scalar_t>(x, weight, bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr, scale, scale_input,
                      out, z);
  });
  return {out, z};
}

std::tuple<at::Tensor, at::Tensor> ia3_linear_bwd_cpu(const at::Tensor& grad_out,
                                                      const at::Tensor& unscaled,
                                                      const at::Tensor& weight,
                                                      const at::Tensor& scale, bool scale_input) {
  TORCH_CHECK(grad_out.dim() == 2, kOp, ": grad_out must be 2-D [M, N], got ", grad_out.sizes());
  check_cpu_dtype(grad_out, "grad_out");
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == grad_out.size(1), kOp, ": weight must be [N, K] with N = ",
              grad_out.size(1), ", got ", weight.sizes());
  const int64_t M = grad_out.size(0), N = weight.size(0), K = weight.size(1);
  check_operand(weight, grad_out, "weight", {N, K}, "[N, K]");
  if (scale_input) {
    check_operand(unscaled, grad_out, "unscaled", {M, K}, "x [M, K] (an input scale)");
  } else {
    check_operand(unscaled, grad_out, "unscaled", {M, N}, "z [M, N] (an output scale)");
  }
  check_scale(scale, grad_out, scale_input, K, N);
  if (grad_out.scalar_type() == at::kBFloat16 && !bf16_brgemm_usable()) {
    const auto f32 = [](const at::Tensor& t) { return t.to(at::kFloat); };  // as in the forward
    const auto [dx, ds] = ia3_linear_bwd_cpu(f32(grad_out), f32(unscaled), f32(weight), f32(scale), scale_input);
    return {dx.to(at::kBFloat16), ds.to(at::kBFloat16)};
  }
  at::Tensor dx = at::empty({M, K}, grad_out.options());
  at::Tensor ds;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad_out.scalar_type(), "ia3_linear_bwd_cpu", [&] {
    ds = backward<scalar_t>(grad_out, unscaled, weight, scale, scale_input, dx);
  });
  return {dx, ds};
}

}  // namespace deltakern
