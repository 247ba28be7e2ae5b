// CPU kernels of qlora_linear's base GEMMs over an NF4 weight Ŵ [N, K], and of nf4_dequantize;
// the rest of the op is lora_linear's decomposition (csrc/qlora_linear.h) with lora_linear's CPU
// dropout kernels.
//
// Both base GEMMs walk tiles Ŵ[n0 : n0 + tn, k0 : k0 + tk], each dequantised into a buffer right
// before the GEMM that reads it (ATen's addmm_ on views of the blocks, i.e. MKL, accumulating with
// beta = 1); the dense weight never exists and every tile is dequantised once per call:
//   forward   out[:, n0 : n0 + tn] += x[:, k0 : k0 + tk] tileᵀ
//   backward  dx[:, k0 : k0 + tk]  += dY[:, n0 : n0 + tn] tile
// in one of three ways, by the row count M of x or dY:
//   M <= kFusedMaxRows       (fp32 / bf16 with AVX2 + FMA) no GEMM call: each task decodes small
//                            panels of Ŵ into L1 and runs hand-written FMA micro-kernels on them
//                            (fused_forward / fused_backward, comment above kFusedMaxRows)
//   M >= kSharedTileMinRows  shared tiles of up to kTileElements (1 MiB in fp32: [256, 1024] for
//                            K = 1024), one after another: all threads dequantise a tile, then
//                            MKL multiplies it on all threads
//   otherwise                one parallel region; each task dequantises its own tiles of up to
//                            kTaskTileElements (512 KiB) and multiplies them single-threaded. The
//                            forward's tasks own column tiles of out (row tiles of Ŵ), the
//                            backward's column slabs of dx (column slabs of Ŵ): no two tasks
//                            write one element
// Buffers are thread-local and kept between calls (thread_buffer): at most 1 MiB per thread in
// fp32, 2 MiB in fp64, whatever the weight's size.
//
// NOTE tile sizes, MKL single-threaded at M = 2048, K = N = 1024 fp32 (same cached tile
// reused, medians of 9, loaded machine): forward x Wᵀ as row tiles of 64 / 128 / 256 / 512 rows
// 77 / 72 / 76 / 62 ms against 61 ms for the whole product; backward dY W as row tiles
// 86 / 61 / 59 / 66 ms, as column slabs 80 / 73 / 61 / 62 ms, against 60 ms. MKL repacks x for
// every narrow tile, hence wide shared tiles for large M. At M = 16 the tiles' GEMMs alone took
// 1.13 / 0.97 / 0.89 ms for tiles of 64 / 128 / 256 rows against 0.85 ms for the dense product:
// on this machine MKL's M = 16 GEMM runs at ~40 GFLOP/s, compute-bound rather than bound by
// reading the 4 MiB weight, so the smaller packed weight cannot pay for itself there.
//
// bf16 computes in fp32 (QloraBaseKernels::accumulate) where the CPU lacks AVX-512 BF16, or for
// fewer than kSharedTileMinRows rows: the tile holds the bf16-rounded values in fp32, exactly,
// and MKL's sgemm runs. torch's own bf16 GEMM on an AVX2 machine (no AVX-512 BF16) took 0.56 s
// for F.linear at M = 2048, K = N = 1024 against 37 ms in fp32. With AVX-512 BF16 the GEMMs run
// in bf16 (base_forward_bf16). fp64
// (gradcheck) runs dgemm on fp64 tiles.
//
// Dequantisation: per absmax block a 16-entry table lut[j] = code[j] * absmax[block] (the fp32
// products bitsandbytes forms), rounded to the compute dtype (rounding the table is rounding
// every value), then a lookup per element. With AVX2 the table is two vmulps and 16 codes come
// from 8 bytes by a few shuffles and two vpermps blended on the code's bit 3. 1M values into a
// reused buffer: 0.26 ms on one thread (0.9 ms before, with a scalar table and an integer
// division per block, and a fresh buffer per call whose page faults cost as much as the decode).
//
// NOTE timings, fwd + bwd ops (gradients of x, A, B; r = 16, dropout_p = 0.1, K = N = 1024,
// blocksize 64) against F.linear fwd + bwd with a frozen weight in the same dtype, interleaved
// medians of 21 (3 for bf16 at M = 2048), AMD EPYC Zen 3 with AVX2, 2 threads, shared with other
// jobs (load average 1.5 to 4, so runs vary by up to 1.5x):
//   fp32 M = 2048   75.3 / 62.5 ms (1.20x); another run 235.7 / 140.3 ms; 1 thread 165 / 138 (1.20x)
//   bf16 M = 2048   78.7 ms / 4.84 s;  bf16 M = 16   2.76 / 38.9 ms (before the fused path)
//
// NOTE small M, the fused path (kFusedMaxRows): same op and F.linear timings, 1 thread (the other
// core busy with other jobs' compiles; 2-thread medians were meaningless then, quantised to 16 and
// 32 ms by the scheduler), interleaved medians of 21, wall time:
//   M       1           8           16          32 (per-task tiles)  64 (per-task tiles)
//   ours    1.71 ms     2.99        4.01        5.64                 8.03
//   dense   0.61        1.96        2.72        3.82                 5.66
//   ratio   2.79x       1.53x       1.47x       1.48x                1.42x
// and M = 2048 unchanged, 165 / 122 ms (1.36x, 1 thread). The base GEMMs alone (r = 1, p = 0,
// direct ops, fwd + bwd, thread CPU time, medians of 31), fused against the per-task tiles against
// MKL on the dense weight: M = 1 1.14 / 1.29 / 0.49 ms, M = 8 1.99 / 2.40 / 1.62, M = 16
// 2.34 / 2.64 / 1.85, M = 32 3.70 / 3.74 / 2.82, M = 64 6.07 / 5.54 / 4.51: 0.83x to 0.89x of the
// per-task tiles up to 16 rows, even at 32, behind at 64, hence kFusedMaxRows = 16. The fused
// kernels do not reach the dense product: in isolation (L1-resident operands) dot_tile and
// axpy_tile run at 3.7 to 4.1 G vector FMAs/s against 5.1 to 5.7 for an FMA-only loop, about MKL's
// own rate at M = 32 (its small-M cost is packing, not its kernel), and the decode adds
// 0.25 to 0.35 ms per million values per thread (~0.9 cycle a value, bound on the vpermps /
// vblendvps lookups) whatever the run length: more than F.linear needs to read the fp32 weight
// at M = 1. The rest of the op's gap is outside the GEMMs: at M = 16 on 1 thread the LoRA branch
// with dropout adds ~0.2 ms to each direction and the Python / autograd wrapper ~0.6 ms.
// Measured by a scratch script: deltakern.qlora_linear with x, A, B requiring grad (r = 16,
// p = 0.1, blocksize 64) against F.linear(x, Ŵ dense, b) with x requiring grad, each step
// .backward(dY), the two interleaved in one loop; `deltakern bench --ops qlora` times the same
// comparison (frozen-linear against deltakern-cpu). The base-GEMM split used a temporary switch
// between the paths, since removed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "blocks.h"
#include "deltakern/nf4.h"
#include "lora_linear.h"
#include "qlora_linear.h"

namespace deltakern {
namespace {

// Values of Ŵ per tile: 1 MiB in fp32 (NOTE at the top of the file), with at most
// kMaxReduction columns.
constexpr int64_t kTileElements = 256 * 1024;
constexpr int64_t kMaxReduction = 1024;
// Elements of Ŵ per dequantisation task, at least.
constexpr int64_t kDequantizeGrain = 1 << 15;
// Problems with at least this many rows (of x or dY) take the shared tiles (for_each_tile), fewer
// the task tiles (base_forward_impl). Not measured finely: the machine's load swamped the
// difference between the two paths between M = 16 and M = 2048.
constexpr int64_t kSharedTileMinRows = 128;

// The raw weight of an Nf4Weight, for the loops below. blocksize is a power of two.
struct Nf4Raw {
  const uint8_t* packed;
  const float* absmax;
  const float* code;
  int block_shift;
  int64_t rows, cols;
};

Nf4Raw raw(const Nf4Weight& w) {
  return {w.packed.const_data_ptr<uint8_t>(), w.absmax.const_data_ptr<float>(), w.code.const_data_ptr<float>(),
          __builtin_ctzll(static_cast<uint64_t>(w.blocksize)), w.rows, w.cols};
}

// dst[j] = lut[code of element j] for the n elements from an even element whose byte is bytes[0].
template <typename acc_t>
void decode_span_scalar(const uint8_t* bytes, const float* lut, int64_t n, acc_t* dst) {
  for (int64_t j = 0; j < n; ++j) {
    const unsigned byte = bytes[j >> 1];
    dst[j] = lut[(j & 1) ? (byte & 0xFu) : (byte >> 4)];
  }
}

__attribute__((target("avx2"))) inline __m256 lookup16(__m256 lut_lo, __m256 lut_hi, __m256i codes) {
  // vpermps reads the low 3 bits of each code; bit 3, shifted into the sign bit, picks the half.
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut_lo, codes), _mm256_permutevar8x32_ps(lut_hi, codes),
                          _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));
}

// The 16 table entries in two halves, rounded to round_t like the scalar path's static_cast:
// bf16 round to nearest even with NaN to 0x7fc0 (c10::BFloat16), fp16 by vcvtps2ph (IEEE round
// to nearest even, as c10::Half).
template <typename round_t>
__attribute__((target("avx2,f16c"))) inline __m256 round_lanes(__m256 v) {
  if constexpr (std::is_same_v<round_t, c10::BFloat16>) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_and_si256(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb),
                                             _mm256_set1_epi32(static_cast<int>(0xffff0000u)));
    return _mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000)),
                            _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  } else if constexpr (std::is_same_v<round_t, c10::Half>) {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  } else {
    return v;
  }
}

// decode_run (below) for fp32 output with AVX2: the table of a block is two vmulps, its lookup
// 16 codes from 8 bytes by a few shuffles and two vpermps.
template <typename round_t>
__attribute__((target("avx2,f16c"))) void decode_run_avx2(const uint8_t* packed, const float* absmax,
                                                          const float* code, int block_shift, int64_t first,
                                                          int64_t len, float* dst) {
  const __m256 code_lo = _mm256_loadu_ps(code);
  const __m256 code_hi = _mm256_loadu_ps(code + 8);
  const __m128i low_nibbles = _mm_set1_epi8(0x0F);
  alignas(32) float lut[16];
  const int64_t end = first + len;
  for (int64_t i = first; i < end;) {
    const int64_t block = i >> block_shift;
    const int64_t stop = std::min(end, (block + 1) << block_shift);
    const __m256 scale = _mm256_set1_ps(absmax[block]);
    const __m256 lut_lo = round_lanes<round_t>(_mm256_mul_ps(code_lo, scale));
    const __m256 lut_hi = round_lanes<round_t>(_mm256_mul_ps(code_hi, scale));
    float* out = dst + (i - first);
    const bool ragged = (i & 1) || (stop - i) % 16 != 0;
    if (ragged) {
      _mm256_store_ps(lut, lut_lo);
      _mm256_store_ps(lut + 8, lut_hi);
    }
    if (i & 1) {  // an odd start: the low nibble of a byte whose high one is not ours
      *out++ = lut[packed[i >> 1] & 0xFu];
      ++i;
    }
    const uint8_t* bytes = packed + (i >> 1);
    const int64_t n = stop - i;
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
      const __m128i pair = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + j / 2));
      const __m128i high = _mm_and_si128(_mm_srli_epi16(pair, 4), low_nibbles);
      const __m128i low = _mm_and_si128(pair, low_nibbles);
      const __m128i codes = _mm_unpacklo_epi8(high, low);  // element order: high nibble first
      _mm256_storeu_ps(out + j, lookup16(lut_lo, lut_hi, _mm256_cvtepu8_epi32(codes)));
      _mm256_storeu_ps(out + j + 8,
                       lookup16(lut_lo, lut_hi, _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(codes, codes))));
    }
    if (j < n) decode_span_scalar(bytes + j / 2, lut, n - j, out + j);
    i = stop;
  }
}

bool has_avx2() {
  static const bool avx2 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  }();
  return avx2;
}

// dst[0, len) = the values of the flat elements [first, first + len) of w in acc_t, each rounded
// to round_t (float: none; fp64 takes the fp32 product exactly).
template <typename acc_t, typename round_t>
void decode_run(const Nf4Raw& w, int64_t first, int64_t len, acc_t* dst) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (has_avx2()) return decode_run_avx2<round_t>(w.packed, w.absmax, w.code, w.block_shift, first, len, dst);
  }
  alignas(32) float lut[16];
  const int64_t end = first + len;
  for (int64_t i = first; i < end;) {
    const int64_t block = i >> w.block_shift;
    const int64_t stop = std::min(end, (block + 1) << w.block_shift);
    const float scale = w.absmax[block];
    for (int j = 0; j < 16; ++j) lut[j] = static_cast<float>(static_cast<round_t>(w.code[j] * scale));
    acc_t* out = dst + (i - first);
    if (i & 1) {  // an odd start: the low nibble of a byte whose high one is not ours
      *out++ = lut[w.packed[i >> 1] & 0xFu];
      ++i;
    }
    decode_span_scalar(w.packed + (i >> 1), lut, stop - i, out);
    i = stop;
  }
}

// A buffer of n acc_t for the calling thread, kept between calls: a fresh 256 KiB to 1 MiB
// allocation is mmap'ed and page-faults on first touch, which cost as much as dequantising into it.
template <typename acc_t>
acc_t* thread_buffer(int64_t n) {
  thread_local std::vector<acc_t> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// f.template operator()<round_t>() with round_t the C++ type of dtype (float for fp32 and fp64,
// whose values are the fp32 products themselves).
template <typename F>
void dispatch_rounding(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kBFloat16: return f.template operator()<c10::BFloat16>();
    case at::kHalf: return f.template operator()<c10::Half>();
    default: return f.template operator()<float>();
  }
}

// tile [rows, cols] (contiguous) = Ŵ[n0 : n0 + rows, k0 : k0 + cols], rows in parallel.
template <typename acc_t>
void dequantize_tile(const Nf4Raw& w, at::ScalarType dtype, int64_t n0, int64_t rows, int64_t k0, int64_t cols,
                     acc_t* tile) {
  dispatch_rounding(dtype, [&]<typename round_t>() {
    at::parallel_for(0, rows, std::max<int64_t>(1, kDequantizeGrain / cols), [&](int64_t begin, int64_t end) {
      if (cols == w.cols) {  // whole rows: one flat run
        decode_run<acc_t, round_t>(w, (n0 + begin) * w.cols, (end - begin) * cols, tile + begin * cols);
        return;
      }
      for (int64_t r = begin; r < end; ++r) {
        decode_run<acc_t, round_t>(w, (n0 + r) * w.cols + k0, cols, tile + r * cols);
      }
    });
  });
}

// Calls f(n0, tn, k0, tk, tile) for the tiles of Ŵ, tile = Ŵ[n0 : n0 + tn, k0 : k0 + tk] as a
// contiguous [tn, tk] tensor in one reused buffer of acc_t.
template <typename acc_t, typename F>
void for_each_tile(const Nf4Weight& weight, F&& f) {
  const Nf4Raw w = raw(weight);
  const int64_t tk = std::min(w.cols, kMaxReduction);
  const int64_t tile_rows = std::min(w.rows, std::max<int64_t>(1, kTileElements / tk));
  acc_t* buffer = thread_buffer<acc_t>(tile_rows * tk);
  for_each_block(0, w.rows, tile_rows, [&](int64_t n0, int64_t tn) {
    for_each_block(0, w.cols, tk, [&](int64_t k0, int64_t cols) {
      dequantize_tile(w, weight.dtype, n0, tn, k0, cols, buffer);
      f(n0, tn, k0, cols, block_view(buffer, tn, cols, cols));
    });
  });
}

// Small problems: one parallel region, each task dequantising its own tiles of at most
// kTaskTileElements (512 KiB in fp32, one Zen 3 core's L2; tiles of 128 rows beat 64, NOTE at the
// top) and multiplying them at once, single-threaded. The forward's tasks own column tiles of out
// (row tiles of Ŵ), the backward's column slabs of dx (column slabs of Ŵ), so no two tasks write
// one element.
constexpr int64_t kTaskTileElements = 128 * 1024;

// Sides of a task's tile: `reduction` along the GEMM's reduction, `owned` along the side the
// tasks split (at least one tile per task).
struct TaskTile {
  int64_t reduction, owned;
};

TaskTile task_tile(int64_t reduction_extent, int64_t owned_extent, int64_t tasks) {
  const int64_t reduction = std::min(reduction_extent, kMaxReduction);
  const int64_t owned = std::min({std::max<int64_t>(1, kTaskTileElements / reduction), owned_extent,
                                  (owned_extent + tasks - 1) / tasks});
  return {reduction, owned};
}

// Small M (at most kFusedMaxRows rows of x or dY) with AVX2 and FMA: the base GEMMs fused with
// the decode, on hand-written micro-kernels rather than MKL (whose small-M GEMM runs at
// ~40 GFLOP/s here, NOTE at the top). Each task decodes a small panel of Ŵ into an L1-resident
// buffer and multiplies it with every row of x or dY before decoding the next one, so every
// value of Ŵ is decoded once per call:
//   forward   tasks own rows of Ŵ (columns of out). Per chunk of kFusedForwardReduction
//             columns of x, copied into a buffer (zero-padded to whole vectors), a panel is
//             kFusedForwardRows rows of Ŵ; dot_tile keeps the dot products of 4 rows of x with
//             the panel's rows as 8-lane partial sums in registers and adds their horizontal sums
//             to out
//   backward  tasks own columns of dx, in whole vectors of 8. Per chunk of
//             kFusedBackwardColumns columns, copied from dx into a buffer and back, a panel is
//             kFusedBackwardPanelRows rows of Ŵ; axpy_tile keeps dx[4 rows, 24 columns] in
//             registers and adds dY[m, n] Ŵ[n, :] over the panel's rows, dY read from a
//             transposed copy [N, M] shared by the tasks
// No two tasks write one element. The copies have row strides off powers of two: x, dY and dx
// rows 4 KiB apart (K = N = 1024) fall in one L1 set, and more than 8 of them (its ways) evicted
// each other. Buffers: under 40 KiB a thread, and the [N, M] copy of dY.
// Measured against the per-task tiles (NOTE at the top): ahead up to 16 rows, even at 32.
constexpr int64_t kFusedMaxRows = 16;
constexpr int kFusedForwardRows = 3;
constexpr int64_t kFusedForwardReduction = 256;
constexpr int64_t kFusedBackwardColumns = 96;
constexpr int64_t kFusedBackwardPanelRows = 32;
constexpr int kFusedTileRows = 4;      // rows of x or dY per micro-kernel call
constexpr int kFusedBackwardVecs = 3;  // vectors of dx columns per micro-kernel call
constexpr int64_t kFusedPad = 8;       // floats added to the buffers' row strides

using DecodeRun = void (*)(const uint8_t* packed, const float* absmax, const float* code, int block_shift,
                           int64_t first, int64_t len, float* dst);

bool has_avx2_fma() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return has_avx2() && __builtin_cpu_supports("fma");
  }();
  return ok;
}

// decode_run_avx2 rounding to dtype.
DecodeRun avx2_decoder(at::ScalarType dtype) {
  DecodeRun f = nullptr;
  dispatch_rounding(dtype, [&]<typename round_t>() { f = &decode_run_avx2<round_t>; });
  return f;
}

// n floats, 64-byte aligned, for the calling thread, kept between calls; `slot` tells apart the
// buffers one thread holds at once.
template <int slot>
float* fused_buffer(int64_t n) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < n + 16) buffer.resize(n + 16);
  const auto address = reinterpret_cast<uintptr_t>(buffer.data());
  return reinterpret_cast<float*>((address + 63) & ~uintptr_t{63});
}

// out[m * ldo + j] += Σ_{k < 8 vecs} x[m * ldx + k] w[j * ldw + k] for m < MR, j < NR.
template <int MR, int NR>
__attribute__((target("avx2,fma"), always_inline)) inline void dot_tile(const float* x, int64_t ldx, const float* w,
                                                                        int64_t ldw, int64_t vecs, float* out,
                                                                        int64_t ldo) {
  static_assert(NR >= 1 && NR <= 4 && MR >= 1 && MR * NR <= 12);
  __m256 acc[MR][NR];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) {
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) acc[m][j] = _mm256_setzero_ps();
  }
  for (int64_t v = 0; v < vecs; ++v) {
    __m256 wv[NR];
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) wv[j] = _mm256_load_ps(w + j * ldw + 8 * v);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_load_ps(x + m * ldx + 8 * v);
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) acc[m][j] = _mm256_fmadd_ps(xv, wv[j], acc[m][j]);
    }
  }
  const __m256 zero = _mm256_setzero_ps();
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) {
    // Three hadds put the eight-lane sums of acc[m][0..3] in lanes 0..3 of the two halves.
    const __m256 s01 = _mm256_hadd_ps(acc[m][0], NR > 1 ? acc[m][1] : zero);
    const __m256 s23 = _mm256_hadd_ps(NR > 2 ? acc[m][2] : zero, NR > 3 ? acc[m][3] : zero);
    const __m256 s = _mm256_hadd_ps(s01, s23);
    alignas(16) float sums[4];
    _mm_store_ps(sums, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) out[m * ldo + j] += sums[j];
  }
}

template <int NR>
__attribute__((target("avx2,fma"))) inline void dot_rows(int mr, const float* x, int64_t ldx, const float* w,
                                                         int64_t ldw, int64_t vecs, float* out, int64_t ldo) {
  switch (mr) {
    case 4: return dot_tile<4, NR>(x, ldx, w, ldw, vecs, out, ldo);
    case 3: return dot_tile<3, NR>(x, ldx, w, ldw, vecs, out, ldo);
    case 2: return dot_tile<2, NR>(x, ldx, w, ldw, vecs, out, ldo);
    default: return dot_tile<1, NR>(x, ldx, w, ldw, vecs, out, ldo);
  }
}

// out[:, n_begin : n_end] += x Ŵ[n_begin : n_end, :]ᵀ for x [M, K] and out [M, N], contiguous.
__attribute__((target("avx2,fma"))) void fused_forward_rows(const float* x, int64_t M, const Nf4Raw& w,
                                                            DecodeRun decode, int64_t n_begin, int64_t n_end,
                                                            float* out) {
  const int64_t N = w.rows, K = w.cols;
  const int64_t chunk = std::min(K, kFusedForwardReduction);
  const int64_t ldp = (chunk + 7) / 8 * 8, ldx = ldp + kFusedPad;
  float* panel = fused_buffer<0>(kFusedForwardRows * ldp);
  float* xs = fused_buffer<1>(M * ldx);
  for (int64_t k0 = 0; k0 < K; k0 += chunk) {
    const int64_t tk = std::min(chunk, K - k0);
    const int64_t vecs = (tk + 7) / 8;
    for (int64_t m = 0; m < M; ++m) {  // zeros past tk in both operands: whole vectors
      std::copy(x + m * K + k0, x + m * K + k0 + tk, xs + m * ldx);
      std::fill(xs + m * ldx + tk, xs + m * ldx + 8 * vecs, 0.f);
    }
    for (int64_t n = n_begin; n < n_end; n += kFusedForwardRows) {
      const int nr = static_cast<int>(std::min<int64_t>(kFusedForwardRows, n_end - n));
      for (int j = 0; j < nr; ++j) {
        float* row = panel + j * ldp;
        decode(w.packed, w.absmax, w.code, w.block_shift, (n + j) * K + k0, tk, row);
        std::fill(row + tk, row + 8 * vecs, 0.f);
      }
      for (int64_t m = 0; m < M; m += kFusedTileRows) {
        const int mr = static_cast<int>(std::min<int64_t>(kFusedTileRows, M - m));
        const float* xm = xs + m * ldx;
        float* om = out + m * N + n;
        switch (nr) {
          case 3: dot_rows<3>(mr, xm, ldx, panel, ldp, vecs, om, N); break;
          case 2: dot_rows<2>(mr, xm, ldx, panel, ldp, vecs, om, N); break;
          default: dot_rows<1>(mr, xm, ldx, panel, ldp, vecs, om, N); break;
        }
      }
    }
  }
}

// d[m * ldd + c] += Σ_{n < rows} g[n * ldg + m] p[n * ldp + c] for m < MR and the 8 NV columns c.
template <int MR, int NV>
__attribute__((target("avx2,fma"), always_inline)) inline void axpy_tile(const float* g, int64_t ldg, const float* p,
                                                                         int64_t ldp, int64_t rows, float* d,
                                                                         int64_t ldd) {
  static_assert(NV >= 1 && MR >= 1 && MR * NV <= 12);
  __m256 acc[MR][NV];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_load_ps(d + m * ldd + 8 * v);
  }
  for (int64_t n = 0; n < rows; ++n) {
    __m256 pv[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      pv[v] = _mm256_load_ps(p + n * ldp + 8 * v);
      // Keeps the row in a register: GCC would otherwise fold the load into every row's FMA,
      // MR loads of it instead of one.
      __asm__("" : "+x"(pv[v]));
    }
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const __m256 gm = _mm256_broadcast_ss(g + n * ldg + m);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_fmadd_ps(gm, pv[v], acc[m][v]);
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) _mm256_store_ps(d + m * ldd + 8 * v, acc[m][v]);
  }
}

template <int NV>
__attribute__((target("avx2,fma"))) inline void axpy_rows(int mr, const float* g, int64_t ldg, const float* p,
                                                          int64_t ldp, int64_t rows, float* d, int64_t ldd) {
  switch (mr) {
    case 4: return axpy_tile<4, NV>(g, ldg, p, ldp, rows, d, ldd);
    case 3: return axpy_tile<3, NV>(g, ldg, p, ldp, rows, d, ldd);
    case 2: return axpy_tile<2, NV>(g, ldg, p, ldp, rows, d, ldd);
    default: return axpy_tile<1, NV>(g, ldg, p, ldp, rows, d, ldd);
  }
}

// dx[:, c_begin : c_end] += dY Ŵ[:, c_begin : c_end] for dx [M, K] contiguous and gt = dYᵀ [N, M].
__attribute__((target("avx2,fma"))) void fused_backward_columns(const float* gt, int64_t M, const Nf4Raw& w,
                                                                DecodeRun decode, int64_t c_begin, int64_t c_end,
                                                                float* dx) {
  const int64_t N = w.rows, K = w.cols;
  constexpr int64_t ldp = kFusedBackwardColumns, ldd = kFusedBackwardColumns + kFusedPad;
  float* panel = fused_buffer<0>(kFusedBackwardPanelRows * ldp);
  float* ds = fused_buffer<1>(M * ldd);
  for (int64_t c0 = c_begin; c0 < c_end; c0 += kFusedBackwardColumns) {
    // Lanes past tc, in the panel and in ds, hold whatever was there: they never reach dx.
    const int64_t tc = std::min(kFusedBackwardColumns, c_end - c0);
    const int64_t vecs = (tc + 7) / 8;
    for (int64_t m = 0; m < M; ++m) std::copy(dx + m * K + c0, dx + m * K + c0 + tc, ds + m * ldd);
    for (int64_t n0 = 0; n0 < N; n0 += kFusedBackwardPanelRows) {
      const int64_t tn = std::min(kFusedBackwardPanelRows, N - n0);
      for (int64_t r = 0; r < tn; ++r) {
        decode(w.packed, w.absmax, w.code, w.block_shift, (n0 + r) * K + c0, tc, panel + r * ldp);
      }
      for (int64_t m = 0; m < M; m += kFusedTileRows) {
        const int mr = static_cast<int>(std::min<int64_t>(kFusedTileRows, M - m));
        for (int64_t v = 0; v < vecs; v += kFusedBackwardVecs) {
          const float* g = gt + n0 * M + m;
          float* d = ds + m * ldd + 8 * v;
          switch (std::min<int64_t>(kFusedBackwardVecs, vecs - v)) {
            case 3: axpy_rows<3>(mr, g, M, panel + 8 * v, ldp, tn, d, ldd); break;
            case 2: axpy_rows<2>(mr, g, M, panel + 8 * v, ldp, tn, d, ldd); break;
            default: axpy_rows<1>(mr, g, M, panel + 8 * v, ldp, tn, d, ldd); break;
          }
        }
      }
    }
    for (int64_t m = 0; m < M; ++m) std::copy(ds + m * ldd, ds + m * ldd + tc, dx + m * K + c0);
  }
}

// Whether the fused path takes this call: fp32 accumulation, few rows, AVX2 + FMA, contiguous
// operands.
template <typename acc_t>
bool takes_fused_path(int64_t M, const at::Tensor& a, const at::Tensor& b) {
  return std::is_same_v<acc_t, float> && M <= kFusedMaxRows && has_avx2_fma() && a.is_contiguous() &&
         b.is_contiguous();
}

// out [M, N] += x Ŵᵀ by fused_forward_rows, tasks over groups of kFusedForwardRows rows of Ŵ.
void fused_forward(const at::Tensor& x, const Nf4Weight& weight, at::Tensor& out) {
  const Nf4Raw w = raw(weight);
  const DecodeRun decode = avx2_decoder(weight.dtype);
  const int64_t M = x.size(0), N = w.rows;
  const int64_t groups = (N + kFusedForwardRows - 1) / kFusedForwardRows;
  const float* xp = x.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  for_each_share(groups, std::min<int64_t>(at::get_num_threads(), groups), [&](int64_t, int64_t first, int64_t last) {
    fused_forward_rows(xp, M, w, decode, first * kFusedForwardRows, std::min(N, last * kFusedForwardRows), op);
  });
}

// dx [M, K] += grad_out Ŵ by fused_backward_columns, tasks over vectors of 8 columns of dx.
void fused_backward(const at::Tensor& grad_out, const Nf4Weight& weight, at::Tensor& dx) {
  const Nf4Raw w = raw(weight);
  const DecodeRun decode = avx2_decoder(weight.dtype);
  const int64_t M = grad_out.size(0), N = w.rows, K = w.cols;
  const int64_t vecs = (K + 7) / 8;
  // dYᵀ, so that a row of Ŵ meets the M values it is scaled by in one line.
  float* gt = fused_buffer<2>(N * M);
  transpose_into(grad_out.const_data_ptr<float>(), M, N, N, gt);
  float* dp = dx.data_ptr<float>();
  for_each_share(vecs, std::min<int64_t>(at::get_num_threads(), vecs), [&](int64_t, int64_t first, int64_t last) {
    fused_backward_columns(gt, M, w, decode, 8 * first, std::min(K, 8 * last), dp);
  });
}

template <typename acc_t>
void base_forward_impl(const at::Tensor& x, const Nf4Weight& weight, at::Tensor& out) {
  const int64_t M = x.size(0), N = weight.rows, K = weight.cols;
  if (M == 0 || N == 0 || K == 0) return;
  if (takes_fused_path<acc_t>(M, x, out)) return fused_forward(x, weight, out);
  if (M >= kSharedTileMinRows) {
    for_each_tile<acc_t>(weight, [&](int64_t n0, int64_t tn, int64_t k0, int64_t tk, const at::Tensor& tile) {
      out.narrow(1, n0, tn).addmm_(x.narrow(1, k0, tk), tile.t());
    });
    return;
  }
  const Nf4Raw w = raw(weight);
  const int64_t threads = at::get_num_threads();
  const TaskTile shape = task_tile(K, N, threads);
  const int64_t tiles = (N + shape.owned - 1) / shape.owned;
  for_each_share(tiles, std::min(threads, tiles), [&](int64_t, int64_t first, int64_t last) {
    acc_t* buffer = thread_buffer<acc_t>(shape.owned * shape.reduction);
    for (int64_t t = first; t < last; ++t) {
      const int64_t n0 = t * shape.owned, tn = std::min(shape.owned, N - n0);
      for_each_block(0, K, shape.reduction, [&](int64_t k0, int64_t tk) {
        dequantize_tile(w, weight.dtype, n0, tn, k0, tk, buffer);
        out.narrow(1, n0, tn).addmm_(x.narrow(1, k0, tk), block_view(buffer, tn, tk, tk).t());
      });
    }
  });
}

template <typename acc_t>
void base_backward_impl(const at::Tensor& grad_out, const Nf4Weight& weight, at::Tensor& dx) {
  const int64_t M = grad_out.size(0), N = weight.rows, K = weight.cols;
  if (M == 0 || N == 0 || K == 0) return;
  if (takes_fused_path<acc_t>(M, grad_out, dx)) return fused_backward(grad_out, weight, dx);
  if (M >= kSharedTileMinRows) {
    for_each_tile<acc_t>(weight, [&](int64_t n0, int64_t tn, int64_t k0, int64_t tk, const at::Tensor& tile) {
      dx.narrow(1, k0, tk).addmm_(grad_out.narrow(1, n0, tn), tile);
    });
    return;
  }
  const Nf4Raw w = raw(weight);
  const int64_t threads = at::get_num_threads();
  const TaskTile shape = task_tile(N, K, threads);
  const int64_t slabs = (K + shape.owned - 1) / shape.owned;
  for_each_share(slabs, std::min(threads, slabs), [&](int64_t, int64_t first, int64_t last) {
    acc_t* buffer = thread_buffer<acc_t>(shape.owned * shape.reduction);
    for (int64_t s = first; s < last; ++s) {
      const int64_t k0 = s * shape.owned, tk = std::min(shape.owned, K - k0);
      for_each_block(0, N, shape.reduction, [&](int64_t n0, int64_t tn) {
        dequantize_tile(w, weight.dtype, n0, tn, k0, tk, buffer);
        dx.narrow(1, k0, tk).addmm_(grad_out.narrow(1, n0, tn), block_view(buffer, tn, tk, tk));
      });
    }
  });
}

// bf16 in bf16, on CPUs with AVX-512 BF16 and from kSharedTileMinRows rows (accumulate_dtype):
// there oneDNN's bf16 GEMM runs at about twice the fp32 rate (the e2e model's frozen step took
// 256 ms in bf16 against 431 in fp32), and the fp32 route left the op slower than bitsandbytes'
// dequantise-and-matmul (60.7 against 49.4 ms for the step at M=2048, 1024², r=16, p=0.1). Each
// GEMM reduces over its whole reduction dimension in one call, so the output is rounded to bf16
// once, as by the dense bf16 GEMM: the forward's tiles are whole rows of Ŵ, the backward's whole
// columns. A tile is decoded into an fp32 staging buffer (the values rounded to bf16 there, so
// that the narrowing to bf16 is exact), then narrowed.
bool has_avx512_bf16() {
  static const bool bf16 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  return bf16;
}

// tile [rows, cols] (contiguous, bf16) = Ŵ[n0 : n0 + rows, k0 : k0 + cols] rounded to bf16.
void dequantize_tile_bf16(const Nf4Raw& w, int64_t n0, int64_t rows, int64_t k0, int64_t cols, float* staging,
                          c10::BFloat16* tile) {
  dequantize_tile(w, at::kBFloat16, n0, rows, k0, cols, staging);
  at::parallel_for(0, rows * cols, kDequantizeGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      uint32_t bits;
      std::memcpy(&bits, staging + i, sizeof(bits));
      tile[i] = c10::BFloat16(static_cast<uint16_t>(bits >> 16), c10::BFloat16::from_bits());
    }
  });
}

void base_forward_bf16(const at::Tensor& x, const Nf4Weight& weight, at::Tensor& out) {
  const Nf4Raw w = raw(weight);
  const int64_t N = w.rows, K = w.cols;
  if (x.size(0) == 0 || N == 0 || K == 0) return;
  const int64_t tile_rows = std::clamp<int64_t>(kTileElements / K, 1, N);
  float* staging = thread_buffer<float>(tile_rows * K);
  c10::BFloat16* tile = thread_buffer<c10::BFloat16>(tile_rows * K);
  for_each_block(0, N, tile_rows, [&](int64_t n0, int64_t tn) {
    dequantize_tile_bf16(w, n0, tn, 0, K, staging, tile);
    out.narrow(1, n0, tn).addmm_(x, block_view(tile, tn, K, K).t());
  });
}

void base_backward_bf16(const at::Tensor& grad_out, const Nf4Weight& weight, at::Tensor& dx) {
  const Nf4Raw w = raw(weight);
  const int64_t N = w.rows, K = w.cols;
  if (grad_out.size(0) == 0 || N == 0 || K == 0) return;
  const int64_t slab_cols = std::clamp<int64_t>(kTileElements / N, 1, K);
  float* staging = thread_buffer<float>(N * slab_cols);
  c10::BFloat16* tile = thread_buffer<c10::BFloat16>(N * slab_cols);
  for_each_block(0, K, slab_cols, [&](int64_t k0, int64_t tk) {
    dequantize_tile_bf16(w, 0, N, k0, tk, staging, tile);
    dx.narrow(1, k0, tk).addmm_(grad_out, block_view(tile, N, tk, tk));
  });
}

// The GEMMs run on fp32 tiles for fp32 and bf16 (bf16 tiles where has_avx512_bf16, from
// kSharedTileMinRows rows), fp64 tiles for fp64.
at::ScalarType accumulate_dtype(at::ScalarType dtype, int64_t rows) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kDouble, kQloraOp,
              ": x must be float32, bfloat16 or float64 on CPU, got ", dtype);
  if (dtype == at::kBFloat16 && rows >= kSharedTileMinRows && has_avx512_bf16()) return at::kBFloat16;
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), kQloraOp, ": ", name, " must be a CPU tensor, got ", t.device());
}

void base_forward(const at::Tensor& x, const Nf4Weight& w, at::Tensor& out) {
  if (x.scalar_type() == at::kDouble) {
    base_forward_impl<double>(x, w, out);
  } else if (x.scalar_type() == at::kBFloat16) {
    base_forward_bf16(x, w, out);
  } else {
    base_forward_impl<float>(x, w, out);
  }
}

void base_backward(const at::Tensor& grad_out, const Nf4Weight& w, at::Tensor& dx) {
  if (grad_out.scalar_type() == at::kDouble) {
    base_backward_impl<double>(grad_out, w, dx);
  } else if (grad_out.scalar_type() == at::kBFloat16) {
    base_backward_bf16(grad_out, w, dx);
  } else {
    base_backward_impl<float>(grad_out, w, dx);
  }
}

constexpr QloraBaseKernels kBase{&base_forward, &base_backward, &accumulate_dtype};

}  // namespace

std::tuple<at::Tensor, at::Tensor> qlora_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& packed,
                                                        const at::Tensor& absmax, const at::Tensor& code,
                                                        int64_t blocksize, int64_t out_features,
                                                        const std::optional<at::Tensor>& bias,
                                                        const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                        double scaling, double dropout_p, const at::Tensor& seed) {
  check_cpu(x, "x");
  return qlora_linear_fwd_gemms(x, packed, absmax, code, blocksize, out_features, bias, lora_A, lora_B, scaling,
                                dropout_p, seed, kBase, lora_dropout_kernels_cpu());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qlora_linear_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
    const at::Tensor& code, int64_t blocksize, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& xa, double scaling, double dropout_p, const at::Tensor& seed) {
  check_cpu(x, "x");
  return qlora_linear_bwd_gemms(grad_out, x, packed, absmax, code, blocksize, lora_A, lora_B, xa, scaling,
                                dropout_p, seed, kBase, lora_dropout_kernels_cpu());
}

at::Tensor nf4_dequantize_cpu(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                              int64_t blocksize, int64_t rows, int64_t cols, at::ScalarType dtype) {
  check_cpu(packed, "packed");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              kQloraOp, ": nf4_dequantize's dtype must be float32, float64, bfloat16 or float16, got ", dtype);
  const Nf4Weight weight = check_nf4_weight(packed, absmax, code, blocksize, rows, cols, dtype, packed.device());
  const Nf4Raw w = raw(weight);
  at::Tensor out = at::empty({rows, cols}, packed.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "nf4_dequantize_cpu", [&] {
    scalar_t* data = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows * cols, kDequantizeGrain, [&](int64_t begin, int64_t end) {
      if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
        decode_run<scalar_t, float>(w, begin, end - begin, data + begin);
      } else {
        // The table is rounded to scalar_t, so the conversion of its values is exact.
        std::vector<float> chunk(end - begin);
        decode_run<float, scalar_t>(w, begin, end - begin, chunk.data());
        std::copy(chunk.begin(), chunk.end(), data + begin);
      }
    });
  });
  return out;
}

}  // namespace deltakern
