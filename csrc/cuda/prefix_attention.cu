// CUDA kernels of prefix_attention: a tiled flash-style forward and a FlashAttention-2 style
// backward (delta = rowsum(dO * O), a dQ pass per query tile, a dK/dV pass per key tile).
// Raw pointers and a stream only; no torch header, so nvcc compiles this file in seconds. The
// glue lives in prefix_attention_cuda.cpp.
//
// Keys of a query row are the P prefix keys, read in place from the [Hkv, P, D] (batch-shared)
// or [B, Hkv, P, D] prefix tensor, followed by the Lk input keys; the prefix is never expanded
// over the batch nor concatenated with k, and nothing of size Lq x Lk exists in global memory.
// The masking rule (bottom-right causal on the input keys, padding mask, prefix always visible)
// and the online softmax come from deltakern/attention.h, shared with the CPU kernel.
//
// Work split (FP32 SIMT, no tensor cores; fp32 accumulation for every dtype, explicit
// conversion intrinsics because torch builds with __CUDA_NO_HALF_OPERATORS__ /
// __CUDA_NO_BFLOAT16_CONVERSIONS__). A block is kWarps warps; each warp owns kRows "rows" and
// meets a "lane tile" of 32 entries, one per lane:
//   forward, dQ  rows = queries, lane tile = keys  (one block = 32 queries of one (b, h))
//   dK/dV        rows = keys,    lane tile = queries (one block = 32 keys of one (b, hkv))
// Per lane tile: each lane computes the dot products of its entry with the warp's kRows rows
// (shared memory: rows read as broadcasts, the lane's entry from a padded row, so neither
// conflicts), the warp exchanges the resulting weights through a small shared buffer, and each
// lane accumulates kD / 32 consecutive columns of its rows' outputs over the 32 entries. Row
// statistics (max, sum) are warp reductions. Head dims are bucketed (kD = 64 or 128); columns
// D .. kD-1 are zero-filled in shared memory and never stored.
//
// The per-block bodies are __host__ __device__ templates over a context (thread index,
// barriers, warp reductions, atomics): the kernels pass DeviceCtx, and a host program can
// include this file and drive them with threads standing in for the lanes, checking the index
// and masking logic without a GPU. tests/csrc/prefix_attention_cuda_host.cu does so (128 OS
// threads per block), and tests/csrc/test_prefix_attention_cuda_host.py checks its results
// against the fp64 reference. All global index math is 64-bit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "convert.cuh"
#include "deltakern/attention.h"
#include "deltakern/prefix_attention_params.h"
#include "prefix_attention.cuh"

// Full unrolling of the constant-trip loops over a warp's rows and a lane's columns keeps the
// per-row arrays (scores, statistics, accumulators) in registers; nvcc does not always unroll
// the loops whose bodies hold a warp shuffle or a branch by itself, and then spills them to
// local memory. Empty for the host compiler (host emulation).
#if defined(__CUDA_ARCH__)
#define DK_UNROLL _Pragma("unroll")
#else
#define DK_UNROLL
#endif

namespace deltakern {
namespace pa {  // prefix attention; file-local (anonymous) below
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kRows = 8;                      // rows per warp
constexpr int kBlockRows = kWarps * kRows;    // rows per block: queries (fwd, dQ) or keys (dK/dV)
constexpr int kLaneTile = kWarpSize;          // entries per lane tile: keys (fwd, dQ) or queries
static_assert(kBlockRows == kLaneTile, "tiles are loaded by one helper: 32 rows of kD columns");

// Shared-memory geometry of a head-dim bucket. Every staged tile is 32 rows of kD floats with a
// row stride of kD + 4: a lane reading its own row with 16-byte loads then hits distinct banks
// (stride = 4 mod 32 words), and rows stay 16-byte aligned.
template <int kD>
struct Geom {
  static_assert(kD % kWarpSize == 0 && kD / kWarpSize <= 4, "kD must be 32, 64, 96 or 128");
  static constexpr int kStride = kD + 4;
  static constexpr int kTileFloats = kLaneTile * kStride;
  static constexpr int kVec = kD / kWarpSize;             // output columns per lane
  static constexpr int kWeightFloats = kWarps * kRows * kLaneTile;  // one exchange buffer
};

// Dynamic shared memory of each kernel, in bytes.
template <int kD>
constexpr size_t fwd_smem_floats() {  // Q, K, V tiles + P exchange
  return 3 * Geom<kD>::kTileFloats + Geom<kD>::kWeightFloats;
}
template <int kD>
constexpr size_t dq_smem_floats() {  // Q, dO, K, V tiles + dS exchange
  return 4 * Geom<kD>::kTileFloats + Geom<kD>::kWeightFloats;
}
template <int kD>
constexpr size_t dkdv_smem_floats() {  // K, V, Q, dO tiles + P and dS exchanges
  return 4 * Geom<kD>::kTileFloats + 2 * Geom<kD>::kWeightFloats;
}

// ---------------------------------------------------------------------------------------
// Execution context of the block bodies on the GPU.
struct DeviceCtx {
  int tid;
  DELTAKERN_HD void sync_block() const {
#if defined(__CUDA_ARCH__)
    __syncthreads();
#endif
  }
  DELTAKERN_HD void sync_warp() const {
#if defined(__CUDA_ARCH__)
    __syncwarp();
#endif
  }
  DELTAKERN_HD float warp_max(float v) const {
#if defined(__CUDA_ARCH__)
    DK_UNROLL
    for (int off = kWarpSize / 2; off > 0; off /= 2) {
      const float o = __shfl_xor_sync(0xffffffffu, v, off);
      v = o > v ? o : v;
    }
#endif
    return v;
  }
  DELTAKERN_HD float warp_sum(float v) const {
#if defined(__CUDA_ARCH__)
    DK_UNROLL
    for (int off = kWarpSize / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
#endif
    return v;
  }
  DELTAKERN_HD void atomic_add(float* p, float v) const {
#if defined(__CUDA_ARCH__)
    atomicAdd(p, v);
#else
    *p += v;
#endif
  }
};

// ---------------------------------------------------------------------------------------
// Shared-memory tile helpers.

// n consecutive floats from 16-byte (n = 4) or 8-byte (n = 2) aligned shared memory.
template <int N>
DELTAKERN_HD void load_vec(const float* p, float (&out)[N]) {
  if constexpr (N == 4) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    out[0] = v.x;
    out[1] = v.y;
    out[2] = v.z;
    out[3] = v.w;
  } else if constexpr (N == 2) {
    const float2 v = *reinterpret_cast<const float2*>(p);
    out[0] = v.x;
    out[1] = v.y;
  } else {
    DK_UNROLL
    for (int c = 0; c < N; ++c) out[c] = p[c];
  }
}

// Stages rows 0 .. 31 of src (row stride D elements) into dst (row stride kStride) as fp32:
// rows at or past n_valid and columns at or past D become 0, so every float the dot products
// and accumulations read is defined (a 0 weight times an uninitialised NaN would be NaN).
// Thread tid of kThreads takes elements tid, tid + kThreads, ... (coalesced along D).
template <typename T, int kD>
DELTAKERN_HD void load_tile(const T* src, int64_t n_valid, int64_t D, float* dst, int tid) {
  for (int e = tid; e < kLaneTile * kD; e += kThreads) {
    const int r = e / kD;
    const int d = e % kD;
    dst[r * Geom<kD>::kStride + d] = (r < n_valid && d < D) ? to_float(src[r * D + d]) : 0.f;
  }
}

// s[r] = dot(rows[r], entry) over kD columns, for the warp's kRows rows (rows[r] at
// rows + r * kStride, read as broadcasts) and the lane's entry (its own padded row).
template <int kD>
DELTAKERN_HD void dot_rows(const float* rows, const float* entry, float (&s)[kRows]) {
  DK_UNROLL
  for (int r = 0; r < kRows; ++r) s[r] = 0.f;
  for (int d = 0; d < kD; d += 4) {
    float e[4];
    load_vec<4>(entry + d, e);
    DK_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float q[4];
      load_vec<4>(rows + r * Geom<kD>::kStride + d, q);
      s[r] += q[0] * e[0] + q[1] * e[1] + q[2] * e[2] + q[3] * e[3];
    }
  }
}

// acc[r][c] += sum over entries j < 32 of w[r][j] * tile[j][lane * kVec + c]: the lane's kVec
// columns of the warp's rows. w is the warp's [kRows][32] exchange buffer (broadcast reads).
template <int kD>
DELTAKERN_HD void accumulate_rows(const float* w, const float* tile, int lane,
                                  float (&acc)[kRows][Geom<kD>::kVec]) {
  constexpr int kVec = Geom<kD>::kVec;
  for (int j = 0; j < kLaneTile; j += 4) {
    float wj[kRows][4];
    DK_UNROLL
    for (int r = 0; r < kRows; ++r) load_vec<4>(w + r * kLaneTile + j, wj[r]);
    DK_UNROLL
    for (int jj = 0; jj < 4; ++jj) {
      float x[kVec];
      load_vec<kVec>(tile + (j + jj) * Geom<kD>::kStride + lane * kVec, x);
      DK_UNROLL
      for (int r = 0; r < kRows; ++r) {
        DK_UNROLL
        for (int c = 0; c < kVec; ++c) acc[r][c] += wj[r][jj] * x[c];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Key tiles: the ceil(P / 32) prefix tiles come first, then the input-key tiles. A tile never
// straddles the two segments.
struct KeyTile {
  bool prefix;
  int64_t j0;      // first key of the tile within its segment
  int64_t n_keys;  // keys of the tile (1 .. 32)
};

DELTAKERN_HD KeyTile key_tile(int64_t t, int64_t n_prefix_tiles, int64_t P, int64_t Lk) {
  KeyTile kt;
  kt.prefix = t < n_prefix_tiles;
  kt.j0 = (kt.prefix ? t : t - n_prefix_tiles) * kLaneTile;
  kt.n_keys = min64(kLaneTile, (kt.prefix ? P : Lk) - kt.j0);
  return kt;
}

// Offset (elements) of row 0 of kv head hk's prefix for batch element b.
DELTAKERN_HD int64_t prefix_offset(const PrefixAttentionProblem& in, int64_t b, int64_t hk) {
  const int64_t bb = in.prefix_shared ? 0 : b;
  return (bb * in.Hkv + hk) * in.P * in.D;
}

// Offset (elements) of row 0 of kv head hk's input keys for batch element b.
DELTAKERN_HD int64_t kv_offset(const PrefixAttentionProblem& in, int64_t b, int64_t hk) {
  return (b * in.Hkv + hk) * in.Lk * in.D;
}

// Whether key j of tile kt (within its segment) is visible to query i of batch element b.
// Prefix keys always are; input keys follow the padding mask and attention.h's causal rule.
DELTAKERN_HD bool key_visible(const PrefixAttentionProblem& in, const KeyTile& kt, int64_t b,
                              int64_t i, int64_t j) {
  if (j - kt.j0 >= kt.n_keys || j - kt.j0 < 0) return false;
  if (kt.prefix) return true;
  if (in.key_padding_mask != nullptr && in.key_padding_mask[b * in.Lk + j] == 0) return false;
  return input_key_visible(i, j, in.Lq, in.Lk, in.causal);
}

// Number of input-key tiles the queries [q0, q_last] may see: keys at or past
// causal_key_end(q_last) are masked for every one of them (the end grows with i).
DELTAKERN_HD int64_t input_tiles_seen(const PrefixAttentionProblem& in, int64_t q_last) {
  return ceil_div(causal_key_end(q_last, in.Lq, in.Lk, in.causal), kLaneTile);
}

// First query that may see input key j: query i sees it (padding aside) iff
// j < causal_key_end(i), i.e. i >= j - (Lk - Lq). Queries before it are skipped by dK/dV.
DELTAKERN_HD int64_t first_query_seeing(const PrefixAttentionProblem& in, int64_t j) {
  if (!in.causal) return 0;
  const int64_t i = j - (in.Lk - in.Lq);
  return i < 0 ? 0 : (i > in.Lq ? in.Lq : i);
}

// ---------------------------------------------------------------------------------------
// Forward: block `tile` = (b, h, query tile qt), qt fastest.
template <typename T, int kD, class Ctx>
DELTAKERN_HD void forward_block(const PrefixAttentionFwdParams& prm, int64_t tile, float* smem,
                                const Ctx& ctx) {
  using G = Geom<kD>;
  const PrefixAttentionProblem& in = prm.in;
  const int64_t D = in.D;
  const int64_t n_qt = ceil_div(in.Lq, kBlockRows);
  const int64_t qt = tile % n_qt;
  const int64_t h = (tile / n_qt) % in.Hq;
  const int64_t b = tile / n_qt / in.Hq;
  const int64_t hk = h / (in.Hq / in.Hkv);
  const int64_t q0 = qt * kBlockRows;
  const int64_t q_rows = min64(kBlockRows, in.Lq - q0);
  const int warp = ctx.tid / kWarpSize;
  const int lane = ctx.tid % kWarpSize;
  const int64_t row0 = q0 + warp * kRows;  // the warp's first query

  float* Qs = smem;
  float* Ks = Qs + G::kTileFloats;
  float* Vs = Ks + G::kTileFloats;
  float* Pw = Vs + G::kTileFloats + warp * kRows * kLaneTile;  // the warp's exchange buffer

  const T* q = static_cast<const T*>(in.q) + ((b * in.Hq + h) * in.Lq + q0) * D;
  ctx.sync_block();  // a previous tile's readers of smem are done
  load_tile<T, kD>(q, q_rows, D, Qs, ctx.tid);

  SoftmaxRow<float> row[kRows];  // per lane: the row max (warp-uniform) and a partial sum
  float acc[kRows][G::kVec] = {};

  const int64_t n_pt = ceil_div(in.P, kLaneTile);
  const int64_t n_tiles = n_pt + input_tiles_seen(in, q0 + q_rows - 1);
  for (int64_t t = 0; t < n_tiles; ++t) {
    const KeyTile kt = key_tile(t, n_pt, in.P, in.Lk);
    const int64_t off = (kt.prefix ? prefix_offset(in, b, hk) : kv_offset(in, b, hk)) + kt.j0 * D;
    const T* kp = static_cast<const T*>(kt.prefix ? in.prefix_k : in.k) + off;
    const T* vp = static_cast<const T*>(kt.prefix ? in.prefix_v : in.v) + off;
    ctx.sync_block();  // the previous key tile's readers are done
    load_tile<T, kD>(kp, kt.n_keys, D, Ks, ctx.tid);
    load_tile<T, kD>(vp, kt.n_keys, D, Vs, ctx.tid);
    ctx.sync_block();

    float s[kRows];
    dot_rows<kD>(Qs + warp * kRows * G::kStride, Ks + lane * G::kStride, s);
    const int64_t j = kt.j0 + lane;  // the lane's key
    DK_UNROLL
    for (int r = 0; r < kRows; ++r) {
      s[r] = key_visible(in, kt, b, row0 + r, j) ? s[r] * in.scale : neg_inf<float>();
      const float factor = softmax_rescale(row[r], ctx.warp_max(s[r]));
      const float p = softmax_weight(row[r], s[r]);
      row[r].sum += p;
      Pw[r * kLaneTile + lane] = p;
      DK_UNROLL
      for (int c = 0; c < G::kVec; ++c) acc[r][c] *= factor;
    }
    ctx.sync_warp();
    accumulate_rows<kD>(Pw, Vs, lane, acc);
  }

  T* out = static_cast<T*>(prm.out);
  DK_UNROLL
  for (int r = 0; r < kRows; ++r) {
    // The max is warp-uniform and every lane's partial sum was rescaled by the same factors,
    // so the row's sum is the sum of the partial sums.
    row[r].sum = ctx.warp_sum(row[r].sum);
    const int64_t i = row0 + r;
    if (i >= in.Lq) continue;
    const float inv = softmax_inv_sum(row[r]);
    const int64_t o = ((b * in.Hq + h) * in.Lq + i) * D;
    DK_UNROLL
    for (int c = 0; c < G::kVec; ++c) {
      const int64_t d = lane * G::kVec + c;
      if (d < D) out[o + d] = from_float<T>(acc[r][c] * inv);
    }
    if (lane == 0) prm.lse[(b * in.Hq + h) * in.Lq + i] = softmax_lse(row[r]);
  }
}

// ---------------------------------------------------------------------------------------
// Backward 1: delta[row] = sum_d dO[row, d] * O[row, d]; block `tile` = rows tile * kWarps + w.
template <typename T, class Ctx>
DELTAKERN_HD void delta_block(const PrefixAttentionBwdParams& prm, int64_t tile, const Ctx& ctx) {
  const int64_t rows = prm.in.B * prm.in.Hq * prm.in.Lq;
  const int64_t D = prm.in.D;
  const int64_t r = tile * kWarps + ctx.tid / kWarpSize;
  if (r >= rows) return;  // warp-uniform; no block barrier follows
  const T* dO = static_cast<const T*>(prm.grad_out) + r * D;
  const T* O = static_cast<const T*>(prm.out) + r * D;
  float s = 0.f;
  for (int64_t d = ctx.tid % kWarpSize; d < D; d += kWarpSize) s += to_float(dO[d]) * to_float(O[d]);
  s = ctx.warp_sum(s);
  if (ctx.tid % kWarpSize == 0) prm.delta[r] = s;
}

// Backward 2: dQ; block `tile` = (b, h, query tile qt) as in the forward. For each visible key
// j: p = exp(s - lse), ds = p * (dO . v_j - delta), dq += scale * ds * k_j.
template <typename T, int kD, class Ctx>
DELTAKERN_HD void dq_block(const PrefixAttentionBwdParams& prm, int64_t tile, float* smem,
                           const Ctx& ctx) {
  using G = Geom<kD>;
  const PrefixAttentionProblem& in = prm.in;
  const int64_t D = in.D;
  const int64_t n_qt = ceil_div(in.Lq, kBlockRows);
  const int64_t qt = tile % n_qt;
  const int64_t h = (tile / n_qt) % in.Hq;
  const int64_t b = tile / n_qt / in.Hq;
  const int64_t hk = h / (in.Hq / in.Hkv);
  const int64_t q0 = qt * kBlockRows;
  const int64_t q_rows = min64(kBlockRows, in.Lq - q0);
  const int warp = ctx.tid / kWarpSize;
  const int lane = ctx.tid % kWarpSize;
  const int64_t row0 = q0 + warp * kRows;

  float* Qs = smem;
  float* dOs = Qs + G::kTileFloats;
  float* Ks = dOs + G::kTileFloats;
  float* Vs = Ks + G::kTileFloats;
  float* Ww = Vs + G::kTileFloats + warp * kRows * kLaneTile;

  const int64_t qo = ((b * in.Hq + h) * in.Lq + q0) * D;
  ctx.sync_block();
  load_tile<T, kD>(static_cast<const T*>(in.q) + qo, q_rows, D, Qs, ctx.tid);
  load_tile<T, kD>(static_cast<const T*>(prm.grad_out) + qo, q_rows, D, dOs, ctx.tid);

  float lse[kRows], delta[kRows];
  DK_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int64_t i = row0 + r;
    const bool ok = i < in.Lq;
    lse[r] = ok ? prm.lse[(b * in.Hq + h) * in.Lq + i] : neg_inf<float>();
    delta[r] = ok ? prm.delta[(b * in.Hq + h) * in.Lq + i] : 0.f;
  }
  float acc[kRows][G::kVec] = {};

  const int64_t n_pt = ceil_div(in.P, kLaneTile);
  const int64_t n_tiles = n_pt + input_tiles_seen(in, q0 + q_rows - 1);
  for (int64_t t = 0; t < n_tiles; ++t) {
    const KeyTile kt = key_tile(t, n_pt, in.P, in.Lk);
    const int64_t off = (kt.prefix ? prefix_offset(in, b, hk) : kv_offset(in, b, hk)) + kt.j0 * D;
    ctx.sync_block();
    load_tile<T, kD>(static_cast<const T*>(kt.prefix ? in.prefix_k : in.k) + off, kt.n_keys, D,
                     Ks, ctx.tid);
    load_tile<T, kD>(static_cast<const T*>(kt.prefix ? in.prefix_v : in.v) + off, kt.n_keys, D,
                     Vs, ctx.tid);
    ctx.sync_block();

    float s[kRows], dp[kRows];
    dot_rows<kD>(Qs + warp * kRows * G::kStride, Ks + lane * G::kStride, s);
    dot_rows<kD>(dOs + warp * kRows * G::kStride, Vs + lane * G::kStride, dp);
    const int64_t j = kt.j0 + lane;
    DK_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const float sr = key_visible(in, kt, b, row0 + r, j) ? s[r] * in.scale : neg_inf<float>();
      const float p = softmax_prob(sr, lse[r]);
      Ww[r * kLaneTile + lane] = p * (dp[r] - delta[r]);
    }
    ctx.sync_warp();
    accumulate_rows<kD>(Ww, Ks, lane, acc);
  }

  T* dq = static_cast<T*>(prm.dq);
  DK_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int64_t i = row0 + r;
    if (i >= in.Lq) continue;
    const int64_t o = ((b * in.Hq + h) * in.Lq + i) * D;
    DK_UNROLL
    for (int c = 0; c < G::kVec; ++c) {
      const int64_t d = lane * G::kVec + c;
      if (d < D) dq[o + d] = from_float<T>(acc[r][c] * in.scale);
    }
  }
}

// Backward 3: dK, dV; block `tile` = (b, hkv, key tile kt), kt fastest, over the prefix tiles
// and then the input tiles. The block loops over the Hq / Hkv query heads of its kv head and
// their query tiles (from the first that can see the tile under causal masking):
//   dv_j += p * dO_i,  dk_j += scale * p * (dO_i . v_j - delta_i) * q_i.
// Input tiles are owned by one block: every element of their dk, dv rows is stored (0 for a
// key nobody sees). Prefix tiles add into the fp32 accumulators with atomics: the B blocks of
// a shared prefix tile meet there (no [B, Hkv, P, D] temporary); a per-batch prefix just has
// no collisions.
template <typename T, int kD, class Ctx>
DELTAKERN_HD void dkdv_block(const PrefixAttentionBwdParams& prm, int64_t tile, float* smem,
                             const Ctx& ctx) {
  using G = Geom<kD>;
  const PrefixAttentionProblem& in = prm.in;
  const int64_t D = in.D;
  const int64_t n_pt = ceil_div(in.P, kLaneTile);
  const int64_t n_kt = n_pt + ceil_div(in.Lk, kLaneTile);
  const KeyTile kt = key_tile(tile % n_kt, n_pt, in.P, in.Lk);
  const int64_t hk = (tile / n_kt) % in.Hkv;
  const int64_t b = tile / n_kt / in.Hkv;
  const int warp = ctx.tid / kWarpSize;
  const int lane = ctx.tid % kWarpSize;
  const int64_t key0 = kt.j0 + warp * kRows;  // the warp's first key (within its segment)

  float* Ks = smem;
  float* Vs = Ks + G::kTileFloats;
  float* Qs = Vs + G::kTileFloats;
  float* dOs = Qs + G::kTileFloats;
  float* Pw = dOs + G::kTileFloats + warp * kRows * kLaneTile;
  float* DSw = dOs + G::kTileFloats + G::kWeightFloats + warp * kRows * kLaneTile;

  const int64_t off = (kt.prefix ? prefix_offset(in, b, hk) : kv_offset(in, b, hk)) + kt.j0 * D;
  ctx.sync_block();
  load_tile<T, kD>(static_cast<const T*>(kt.prefix ? in.prefix_k : in.k) + off, kt.n_keys, D, Ks,
                   ctx.tid);
  load_tile<T, kD>(static_cast<const T*>(kt.prefix ? in.prefix_v : in.v) + off, kt.n_keys, D, Vs,
                   ctx.tid);

  float dk[kRows][G::kVec] = {};
  float dv[kRows][G::kVec] = {};

  const int64_t group = in.Hq / in.Hkv;
  const int64_t i_first = kt.prefix ? 0 : first_query_seeing(in, kt.j0);
  const int64_t qt_first = i_first / kLaneTile;
  for (int64_t g = 0; g < group; ++g) {
    const int64_t h = hk * group + g;
    const int64_t bh = b * in.Hq + h;
    for (int64_t q0 = qt_first * kLaneTile; q0 < in.Lq; q0 += kLaneTile) {
      const int64_t qo = (bh * in.Lq + q0) * D;
      const int64_t n_q = min64(kLaneTile, in.Lq - q0);
      ctx.sync_block();  // the previous query tile's readers are done
      load_tile<T, kD>(static_cast<const T*>(in.q) + qo, n_q, D, Qs, ctx.tid);
      load_tile<T, kD>(static_cast<const T*>(prm.grad_out) + qo, n_q, D, dOs, ctx.tid);
      ctx.sync_block();

      const int64_t i = q0 + lane;  // the lane's query
      const bool q_ok = lane < n_q;
      // A query past Lq gets lse -inf: probability 0 for every key.
      const float lse = q_ok ? prm.lse[bh * in.Lq + i] : neg_inf<float>();
      const float delta = q_ok ? prm.delta[bh * in.Lq + i] : 0.f;

      float s[kRows], dp[kRows];
      dot_rows<kD>(Ks + warp * kRows * G::kStride, Qs + lane * G::kStride, s);
      dot_rows<kD>(Vs + warp * kRows * G::kStride, dOs + lane * G::kStride, dp);
      DK_UNROLL
      for (int r = 0; r < kRows; ++r) {
        const float sr = key_visible(in, kt, b, i, key0 + r) ? s[r] * in.scale : neg_inf<float>();
        const float p = softmax_prob(sr, lse);
        Pw[r * kLaneTile + lane] = p;
        DSw[r * kLaneTile + lane] = p * (dp[r] - delta);
      }
      ctx.sync_warp();
      accumulate_rows<kD>(Pw, dOs, lane, dv);
      accumulate_rows<kD>(DSw, Qs, lane, dk);
    }
  }

  DK_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int64_t j = key0 + r;
    if (j - kt.j0 >= kt.n_keys) continue;
    DK_UNROLL
    for (int c = 0; c < G::kVec; ++c) {
      const int64_t d = lane * G::kVec + c;
      if (d >= D) continue;
      const int64_t e = off + (warp * kRows + r) * D + d;
      if (kt.prefix) {
        ctx.atomic_add(prm.dprefix_k_acc + e, dk[r][c] * in.scale);
        ctx.atomic_add(prm.dprefix_v_acc + e, dv[r][c]);
      } else {
        static_cast<T*>(prm.dk)[e] = from_float<T>(dk[r][c] * in.scale);
        static_cast<T*>(prm.dv)[e] = from_float<T>(dv[r][c]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Kernels: grid-stride over the tiles (block-uniform bounds, so the barriers inside the block
// bodies are reached by the whole block).
//
// NOTE (ptxas -v, nvcc 13.0, sm_80/sm_90): with plain __launch_bounds__(128) ptxas capped the
// dQ kernel (fp16/bf16, kD = 128) at 168 registers and the dK/dV kernel (fp32, kD = 64) at 128,
// spilling 28-40 bytes; the backward kernels therefore declare minBlocksPerSM = 1 (up to 255
// registers; they use 166-220, no spill). The forward keeps the default heuristic (86-135
// registers, no spill). Dynamic shared memory per block (kD = 64 / 128): forward 30.2 / 54.8 KB,
// dQ 38.9 / 71.7 KB, dK/dV 43.0 / 75.8 KB (opted in above 48 KB; fits sm_80/86/89/90, not the
// 64 KB of sm_75). Not tuned on a GPU: there is none on the development machines.

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads)
    prefix_attention_fwd_kernel(const PrefixAttentionFwdParams prm, int64_t n_tiles) {
  extern __shared__ float4 smem4[];
  const DeviceCtx ctx{static_cast<int>(threadIdx.x)};
  for (int64_t t = blockIdx.x; t < n_tiles; t += gridDim.x) {
    forward_block<T, kD>(prm, t, reinterpret_cast<float*>(smem4), ctx);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    prefix_attention_delta_kernel(const PrefixAttentionBwdParams prm, int64_t n_tiles) {
  const DeviceCtx ctx{static_cast<int>(threadIdx.x)};
  for (int64_t t = blockIdx.x; t < n_tiles; t += gridDim.x) delta_block<T>(prm, t, ctx);
}

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads, 1)
    prefix_attention_dq_kernel(const PrefixAttentionBwdParams prm, int64_t n_tiles) {
  extern __shared__ float4 smem4[];
  const DeviceCtx ctx{static_cast<int>(threadIdx.x)};
  for (int64_t t = blockIdx.x; t < n_tiles; t += gridDim.x) {
    dq_block<T, kD>(prm, t, reinterpret_cast<float*>(smem4), ctx);
  }
}

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads, 1)
    prefix_attention_dkdv_kernel(const PrefixAttentionBwdParams prm, int64_t n_tiles) {
  extern __shared__ float4 smem4[];
  const DeviceCtx ctx{static_cast<int>(threadIdx.x)};
  for (int64_t t = blockIdx.x; t < n_tiles; t += gridDim.x) {
    dkdv_block<T, kD>(prm, t, reinterpret_cast<float*>(smem4), ctx);
  }
}

// ---------------------------------------------------------------------------------------
// Launchers.

// Grid size cap; the kernels grid-stride over the rest.
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

// Tile counts of the three tiled kernels (also used by host emulations).
DELTAKERN_HD int64_t query_tiles(const PrefixAttentionProblem& in) {
  return in.B * in.Hq * ceil_div(in.Lq, kBlockRows);
}
DELTAKERN_HD int64_t key_tiles(const PrefixAttentionProblem& in) {
  return in.B * in.Hkv * (ceil_div(in.P, kLaneTile) + ceil_div(in.Lk, kLaneTile));
}
DELTAKERN_HD int64_t delta_tiles(const PrefixAttentionProblem& in) {
  return ceil_div(in.B * in.Hq * in.Lq, kWarps);
}

template <typename Kernel, typename Params>
cudaError_t launch(Kernel kernel, const Params& prm, int64_t n_tiles, size_t smem_bytes,
                   cudaStream_t stream) {
  if (n_tiles <= 0) return cudaSuccess;
  if (smem_bytes > 48 * 1024) {  // above the default limit: opt in (sm_80: 163 KB, sm_90: 227 KB)
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
    if (err != cudaSuccess) return err;
  }
  const unsigned blocks = static_cast<unsigned>(std::min(n_tiles, kMaxBlocks));
  kernel<<<blocks, kThreads, smem_bytes, stream>>>(prm, n_tiles);
  return cudaGetLastError();
}

template <typename T, int kD>
cudaError_t fwd_typed(const PrefixAttentionFwdParams& prm, cudaStream_t stream) {
  return launch(prefix_attention_fwd_kernel<T, kD>, prm, query_tiles(prm.in),
                fwd_smem_floats<kD>() * sizeof(float), stream);
}

template <typename T, int kD>
cudaError_t bwd_typed(const PrefixAttentionBwdParams& prm, cudaStream_t stream) {
  cudaError_t err = launch(prefix_attention_delta_kernel<T>, prm, delta_tiles(prm.in), 0, stream);
  if (err != cudaSuccess) return err;
  err = launch(prefix_attention_dq_kernel<T, kD>, prm, query_tiles(prm.in),
               dq_smem_floats<kD>() * sizeof(float), stream);
  if (err != cudaSuccess) return err;
  return launch(prefix_attention_dkdv_kernel<T, kD>, prm, key_tiles(prm.in),
                dkdv_smem_floats<kD>() * sizeof(float), stream);
}

bool valid_problem(const PrefixAttentionProblem& in) {
  return in.B >= 0 && in.Hq >= 0 && in.Hkv > 0 && in.Hq % in.Hkv == 0 && in.Lq >= 0 &&
         in.Lk >= 0 && in.P >= 0 && in.D >= 0 && in.D <= kPrefixAttentionMaxHeadDim;
}

}  // namespace
}  // namespace pa

cudaError_t launch_prefix_attention_fwd(const PrefixAttentionFwdParams& params,
                                        cudaStream_t stream) {
  using namespace pa;
  if (!valid_problem(params.in)) return cudaErrorInvalidValue;
  if (query_tiles(params.in) == 0) return cudaSuccess;
  const bool small = params.in.D <= 64;
  switch (params.in.dtype) {
    case DType::kFloat32:
      return small ? fwd_typed<float, 64>(params, stream) : fwd_typed<float, 128>(params, stream);
    case DType::kFloat16:
      return small ? fwd_typed<__half, 64>(params, stream) : fwd_typed<__half, 128>(params, stream);
    case DType::kBFloat16:
      return small ? fwd_typed<__nv_bfloat16, 64>(params, stream)
                   : fwd_typed<__nv_bfloat16, 128>(params, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_prefix_attention_bwd(const PrefixAttentionBwdParams& params,
                                        cudaStream_t stream) {
  using namespace pa;
  if (!valid_problem(params.in)) return cudaErrorInvalidValue;
  if (params.in.D == 0) return cudaSuccess;  // every gradient is empty
  const bool small = params.in.D <= 64;
  switch (params.in.dtype) {
    case DType::kFloat32:
      return small ? bwd_typed<float, 64>(params, stream) : bwd_typed<float, 128>(params, stream);
    case DType::kFloat16:
      return small ? bwd_typed<__half, 64>(params, stream) : bwd_typed<__half, 128>(params, stream);
    case DType::kBFloat16:
      return small ? bwd_typed<__nv_bfloat16, 64>(params, stream)
                   : bwd_typed<__nv_bfloat16, 128>(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace deltakern
