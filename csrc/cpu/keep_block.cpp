// keep_block of keep_mask.h: the Philox4x32-10 keep bits of 64 consecutive counters (256
// elements), in SIMD intrinsics for AVX-512 and AVX2 and in portable code otherwise, the variant
// picked once per process from the CPU's features. Every variant writes the bytes of
// keep_counters<kKeepBlockCounters>, which the tests compare with the reference Philox.
//
// Why intrinsics: the rounds' 32x32 -> 64-bit products are what costs. GCC vectorizes the portable
// loop (philox4x32_10_rounds), but through memory and lane shuffles: 6.3 ns per counter on one
// core of this project's Zen 4 CPU, for both its AVX-512 and AVX2 clones. Written here with the
// even/odd-lane multiplies kept in registers and two counter groups interleaved for
// instruction-level parallelism: 1.9 ns (AVX-512) and 2.3 ns (AVX2) per counter. The dropout
// masks are the largest cost of LoRA dropout on the CPU (each is drawn in the forward and again
// in the backward instead of being stored).
#include <immintrin.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "keep_mask.h"

// GCC 12's AVX-512 headers start some intrinsics from _mm512_undefined_epi32(), which -Wall
// reports as uninitialized when they inline here.
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace deltakern {
namespace {

// Counter groups of one register interleaved in the rounds: 2 beat 1 by 15-20% and 4 gained
// nothing more (AVX-512 and AVX2, Zen 4).
constexpr int kGroups = 2;

// Philox rounds on kGroups registers of counters, in place, for a SIMD type V given its ops.
#define DELTAKERN_PHILOX_ROUNDS(V, SET1, MUL_EPU32, SRLI64, MULLO, BLEND_ODD, XOR3)                      \
  do {                                                                                                 \
    const V round_a = SET1(kPhiloxRoundA), round_b = SET1(kPhiloxRoundB);                              \
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);                 \
    for (int round = 0; round < 10; ++round) {                                                         \
      const V key0 = SET1(k0), key1 = SET1(k1);                                                        \
      for (int g = 0; g < kGroups; ++g) {                                                              \
        /* high words of the products: even lanes' from the even multiply, odd lanes' from the      \
           multiply of the odd lanes shifted down */                                                  \
        const V hi_b = BLEND_ODD(SRLI64(MUL_EPU32(round_b, c2[g]), 32), MUL_EPU32(round_b, SRLI64(c2[g], 32))); \
        const V hi_a = BLEND_ODD(SRLI64(MUL_EPU32(round_a, c0[g]), 32), MUL_EPU32(round_a, SRLI64(c0[g], 32))); \
        const V next_c0 = XOR3(hi_b, c1[g], key0);                                                     \
        const V next_c2 = XOR3(hi_a, c3[g], key1);                                                     \
        c1[g] = MULLO(round_b, c2[g]);                                                                 \
        c3[g] = MULLO(round_a, c0[g]);                                                                 \
        c0[g] = next_c0;                                                                               \
        c2[g] = next_c2;                                                                               \
      }                                                                                                \
      k0 += kPhiloxKeyA;                                                                               \
      k1 += kPhiloxKeyB;                                                                               \
    }                                                                                                  \
  } while (0)

// Bit j: philox_fold(lane j of w) >= threshold.
__attribute__((target("avx512f"), always_inline)) inline uint16_t keep_bits_avx512(__m512i w, __m512i thresholds) {
  return _mm512_cmpge_epu32_mask(_mm512_xor_si512(w, _mm512_srai_epi32(w, 31)), thresholds);
}

#define DELTAKERN_AVX512_BLEND_ODD(a, b) _mm512_mask_blend_epi32(0xAAAA, (a), (b))
#define DELTAKERN_AVX512_XOR3(a, b, c) _mm512_ternarylogic_epi32((a), (b), (c), 0x96)

__attribute__((target("avx512f,avx512bw,bmi2"))) void keep_block_avx512(uint64_t seed, uint64_t first_counter,
                                                                          uint32_t threshold, uint8_t* keep) {
  constexpr int kLanes = 16;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i thresholds = _mm512_set1_epi32(static_cast<int32_t>(threshold));
  for (int first = 0; first < kKeepBlockCounters; first += kGroups * kLanes) {
    __m512i c0[kGroups], c1[kGroups], c2[kGroups], c3[kGroups];
    for (int g = 0; g < kGroups; ++g) {
      const uint64_t counter = first_counter + first + g * kLanes;
      const __m512i low = _mm512_set1_epi32(static_cast<int32_t>(counter));
      const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(counter >> 32));
      c0[g] = _mm512_add_epi32(low, lane);
      // a lane whose low word wrapped carries into the high word
      c1[g] = _mm512_mask_add_epi32(high, _mm512_cmplt_epu32_mask(c0[g], low), high, _mm512_set1_epi32(1));
      c2[g] = c3[g] = _mm512_setzero_si512();
    }
    DELTAKERN_PHILOX_ROUNDS(__m512i, _mm512_set1_epi32, _mm512_mul_epu32, _mm512_srli_epi64, _mm512_mullo_epi32,
                            DELTAKERN_AVX512_BLEND_ODD, DELTAKERN_AVX512_XOR3);
    for (int g = 0; g < kGroups; ++g) {
      // element 4 i + l (counter i, word l) is bit i of
      // word l's mask: spread each 16-bit mask to every fourth bit of 64, one bit per output byte.
      const uint64_t bits = _pdep_u64(keep_bits_avx512(c0[g], thresholds), 0x1111111111111111ull) |
                            _pdep_u64(keep_bits_avx512(c1[g], thresholds), 0x2222222222222222ull) |
                            _pdep_u64(keep_bits_avx512(c2[g], thresholds), 0x4444444444444444ull) |
                            _pdep_u64(keep_bits_avx512(c3[g], thresholds), 0x8888888888888888ull);
      _mm512_storeu_si512(keep + 4 * (first + g * kLanes), _mm512_maskz_mov_epi8(bits, _mm512_set1_epi8(1)));
    }
  }
}

// Lane j: 1 if philox_fold(lane j of w) > below, else 0.
__attribute__((target("avx2"), always_inline)) inline __m256i keep_words_avx2(__m256i w, __m256i below) {
  return _mm256_and_si256(_mm256_cmpgt_epi32(_mm256_xor_si256(w, _mm256_srai_epi32(w, 31)), below),
                          _mm256_set1_epi32(1));
}

#define DELTAKERN_AVX2_BLEND_ODD(a, b) _mm256_blend_epi32((a), (b), 0xAA)
#define DELTAKERN_AVX2_XOR3(a, b, c) _mm256_xor_si256(_mm256_xor_si256((a), (b)), (c))

// No BMI2 here: pdep is microcoded (hundreds of cycles) on AMD CPUs before Zen 3.
__attribute__((target("avx2"))) void keep_block_avx2(uint64_t seed, uint64_t first_counter, uint32_t threshold,
                                                     uint8_t* keep) {
  constexpr int kLanes = 8;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i sign = _mm256_set1_epi32(INT32_MIN);
  // philox_fold(w) is in [0, 2^31), so `>= threshold` is the signed `> threshold - 1` (threshold
  // 0 keeps all, 2^31 none).
  const __m256i below = _mm256_set1_epi32(static_cast<int32_t>(threshold - 1u));
  // The bytes of a 128-bit half come out word-major (4 l + i) and go out counter-major (4 i + l).
  const __m256i transpose = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                             0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  for (int first = 0; first < kKeepBlockCounters; first += kGroups * kLanes) {
    __m256i c0[kGroups], c1[kGroups], c2[kGroups], c3[kGroups];
    for (int g = 0; g < kGroups; ++g) {
      const uint64_t counter = first_counter + first + g * kLanes;
      const __m256i low = _mm256_set1_epi32(static_cast<int32_t>(counter));
      const __m256i high = _mm256_set1_epi32(static_cast<int32_t>(counter >> 32));
      c0[g] = _mm256_add_epi32(low, lane);
      // unsigned c0 < low (the low word wrapped) as a signed compare with the sign bits flipped;
      // true is -1, so subtracting it carries one into the high word
      const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(low, sign), _mm256_xor_si256(c0[g], sign));
      c1[g] = _mm256_sub_epi32(high, wrapped);
      c2[g] = c3[g] = _mm256_setzero_si256();
    }
    DELTAKERN_PHILOX_ROUNDS(__m256i, _mm256_set1_epi32, _mm256_mul_epu32, _mm256_srli_epi64, _mm256_mullo_epi32,
                            DELTAKERN_AVX2_BLEND_ODD, DELTAKERN_AVX2_XOR3);
    for (int g = 0; g < kGroups; ++g) {
      const __m256i words01 = _mm256_packs_epi32(keep_words_avx2(c0[g], below), keep_words_avx2(c1[g], below));
      const __m256i words23 = _mm256_packs_epi32(keep_words_avx2(c2[g], below), keep_words_avx2(c3[g], below));
      const __m256i bytes = _mm256_shuffle_epi8(_mm256_packs_epi16(words01, words23), transpose);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(keep + 4 * (first + g * kLanes)), bytes);
    }
  }
}

void keep_block_portable(uint64_t seed, uint64_t first_counter, uint32_t threshold, uint8_t* keep) {
  keep_counters<kKeepBlockCounters>(seed, first_counter, threshold, keep);
}

bool cpu_runs(const std::string& variant) {
  __builtin_cpu_init();
  if (variant == "avx512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("bmi2");
  }
  if (variant == "avx2") {
    return __builtin_cpu_supports("avx2");
  }
  return variant == "portable";
}

}  // namespace

std::vector<std::string> keep_block_variants() {
  std::vector<std::string> variants;
  for (const char* variant : {"avx512", "avx2", "portable"}) {
    if (cpu_runs(variant)) {
      variants.emplace_back(variant);
    }
  }
  return variants;
}

KeepBlockFn keep_block_variant(const std::string& variant) {
  if (!cpu_runs(variant)) {
    throw std::invalid_argument("deltakern.keep_block: variant '" + variant +
                                "' is unknown or this CPU cannot run it");
  }
  if (variant == "avx512") {
    return &keep_block_avx512;
  }
  return variant == "avx2" ? &keep_block_avx2 : &keep_block_portable;
}

void keep_block(uint64_t seed, uint64_t first_counter, uint32_t threshold, uint8_t* keep) {
  static const KeepBlockFn fastest = keep_block_variant(keep_block_variants().front());
  fastest(seed, first_counter, threshold, keep);
}

}  // namespace deltakern
