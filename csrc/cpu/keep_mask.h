// The CPU port of the dropout keep mask (DESIGN.md, "Dropout randomness"), shared by the CPU
// kernels that drop x: lora_linear's dropout parts (csrc/cpu/lora_linear.cpp; keep_block is
// defined in csrc/cpu/keep_block.cpp) and dora_linear's (csrc/cpu/dora_linear.cpp, which also draws runs of a few
// counters from several rows at once). Element e of the flattened [M, K]
// index space is kept when lane e % 4 of philox4x32_10(seed, e / 4) passes the threshold of p.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "deltakern/philox.h"

namespace deltakern {

// Philox counters per vectorized block: 64 counters = 256 elements.
constexpr int kKeepBlockCounters = 64;
constexpr int64_t kKeepBlockElements = 4 * kKeepBlockCounters;

// The keep bits of kRuns runs of kRunCounters consecutive counter groups that need not follow
// each other (run j starts at group first[j]; say, one run per row of a column chunk):
// keep[4 * (j * kRunCounters + i) + l] is the bit of element 4 * (first[j] + i) + l, 1 for a kept
// element and 0 for a dropped one; threshold is dropout_threshold(p). The rounds run in one loop
// over all the runs' counters: NOTE GCC fully unrolls a block of 16 counters or fewer and then
// leaves it scalar, 20 ns per counter against 8.7 ns in a vectorized loop of 64 (AVX2, one core).
// Always inlined, so that each caller compiles it inside its own target_clones function, where
// the Philox rounds vectorize (an outlined copy is compiled for the baseline target and runs
// scalar).
template <int kRuns, int kRunCounters>
inline __attribute__((always_inline)) void keep_counter_runs(uint64_t seed, const uint64_t* first, uint32_t threshold,
                                                             uint8_t* keep) {
  constexpr int kCounters = kRuns * kRunCounters;
  uint32_t c0[kCounters], c1[kCounters], c2[kCounters], c3[kCounters];
  for (int i = 0; i < kCounters; ++i) {
    const uint64_t counter = first[i / kRunCounters] + static_cast<uint64_t>(i % kRunCounters);
    c0[i] = static_cast<uint32_t>(counter);
    c1[i] = static_cast<uint32_t>(counter >> 32);
    c2[i] = 0;
    c3[i] = 0;
  }
  philox4x32_10_rounds(seed, c0, c1, c2, c3);
  for (int i = 0; i < kCounters; ++i) {
    keep[4 * i + 0] = philox_fold(c0[i]) >= threshold;
    keep[4 * i + 1] = philox_fold(c1[i]) >= threshold;
    keep[4 * i + 2] = philox_fold(c2[i]) >= threshold;
    keep[4 * i + 3] = philox_fold(c3[i]) >= threshold;
  }
}

// The keep bits of the elements 4 * first_counter + i (i < 4 * kCounters): one run.
template <int kCounters>
inline __attribute__((always_inline)) void keep_counters(uint64_t seed, uint64_t first_counter, uint32_t threshold,
                                                         uint8_t* keep) {
  keep_counter_runs<1, kCounters>(seed, &first_counter, threshold, keep);
}

// The bytes of keep_counters<kKeepBlockCounters>, in intrinsics for the CPU it runs on
// (csrc/cpu/keep_block.cpp): the fastest of keep_block_variants().
void keep_block(uint64_t seed, uint64_t first_counter, uint32_t threshold, uint8_t* keep);

// The variants of keep_block this CPU runs, fastest first, among "avx512", "avx2" and "portable".
std::vector<std::string> keep_block_variants();
using KeepBlockFn = void (*)(uint64_t seed, uint64_t first_counter, uint32_t threshold, uint8_t* keep);
// One variant, for the tests; throws std::invalid_argument if this CPU cannot run it.
KeepBlockFn keep_block_variant(const std::string& variant);

// Calls f(offset, count, keep) over the elements [begin, end) of the flattened [M, K] index
// space in consecutive runs: keep[j] is the keep bit of element begin + offset + j.
template <typename F>
inline void for_each_keep_run(uint64_t seed, float dropout_p, int64_t begin, int64_t end, F&& f) {
  const uint32_t threshold = dropout_threshold(dropout_p);
  alignas(64) uint8_t keep[kKeepBlockElements];
  for (int64_t block = begin & ~int64_t{3}; block < end; block += kKeepBlockElements) {
    keep_block(seed, static_cast<uint64_t>(block >> 2), threshold, keep);
    const int64_t lo = std::max(block, begin);
    const int64_t hi = std::min(block + kKeepBlockElements, end);
    f(lo - begin, hi - lo, keep + (lo - block));
  }
}

// out[j] = in[j] * keep[j] * keep_scale: multiplying (not selecting) propagates NaN and inf as
// the reference x * mask / (1 - dropout_p) does.
template <typename in_t, typename opmath_t, typename out_t>
inline void scale_kept(const in_t* in, const uint8_t* keep, int64_t n, opmath_t keep_scale, out_t* out) {
  for (int64_t j = 0; j < n; ++j) {
    out[j] = static_cast<out_t>(static_cast<opmath_t>(in[j]) * (keep[j] * keep_scale));
  }
}

}  // namespace deltakern
