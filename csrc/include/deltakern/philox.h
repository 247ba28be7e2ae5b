// Philox4x32-10, bit-for-bit the generator behind Triton's tl.randint4x / tl.rand.
//
// Framework-free and usable from host (g++) and device (nvcc) code. The dropout
// mapping of deltakern (DESIGN.md, "Dropout randomness"): element e of the 2-D
// [M, in] view is kept when lane e % 4 of philox(seed, counter = e / 4), turned
// into a uniform float like tl.rand does, is >= p. The 64-bit counter goes into
// (c0, c1) = (low, high) 32 bits and the seed into the key (k0, k1) = (low, high),
// exactly as tl.randint4x does for an int64 offset.
#pragma once

#include <cstdint>

#include "deltakern/hd.h"

namespace deltakern {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u, kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u, kPhiloxRoundB = 0xCD9E8D57u;

struct PhiloxOut {
  uint32_t v[4];
};

DELTAKERN_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

DELTAKERN_HD PhiloxOut philox4x32_10(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter);
  uint32_t c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint32_t old_c0 = c0, old_c2 = c2;
    c0 = mulhi32(kPhiloxRoundB, old_c2) ^ c1 ^ k0;
    c2 = mulhi32(kPhiloxRoundA, old_c0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * old_c2;
    c3 = kPhiloxRoundA * old_c0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return PhiloxOut{{c0, c1, c2, c3}};
}

// tl.rand's uint32 -> [0, 1) float: reinterpret as int32, fold negatives with ~x,
// convert to float (round to nearest) and scale so that INT32_MAX maps below 1.
DELTAKERN_HD float philox_uniform(uint32_t bits) {
  int32_t x = static_cast<int32_t>(bits);
  if (x < 0) x = ~x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// Keep decision for one element given its lane's random bits.
DELTAKERN_HD bool dropout_keep(uint32_t bits, float p) {
  return philox_uniform(bits) >= p;
}

// The folded value ~x-or-x of philox_uniform, in [0, 2^31).
DELTAKERN_HD uint32_t philox_fold(uint32_t bits) {
  return bits ^ static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31);
}

// philox_uniform is non-decreasing in philox_fold(bits), so dropout_keep(bits, p) is exactly
// philox_fold(bits) >= dropout_threshold(p): the smallest folded value whose uniform is >= p,
// found by bisection. It turns the keep test into one integer compare that vectorizes.
DELTAKERN_HD uint32_t dropout_threshold(float p) {
  uint32_t lo = 0, hi = 0x80000000u;  // answer in [lo, hi]; hi means "keep nothing"
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo) / 2;
    if (static_cast<float>(static_cast<int32_t>(mid)) * 4.6566127342e-10f >= p) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// Philox4x32-10 of N counters in structure-of-arrays form, in place: on entry (c0, c1) hold each
// counter's (low, high) words and c2 = c3 = 0, on return the four output words. Arrays rather than
// one call per counter so that a compiler can vectorize the rounds (the scalar version cost 38 ns
// per counter on the CPU kernels).
template <int N>
DELTAKERN_HD void philox4x32_10_rounds(uint64_t seed, uint32_t (&c0)[N], uint32_t (&c1)[N], uint32_t (&c2)[N],
                                       uint32_t (&c3)[N]) {
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int i = 0; i < N; ++i) {
      const uint64_t prod_b = static_cast<uint64_t>(kPhiloxRoundB) * c2[i];
      const uint64_t prod_a = static_cast<uint64_t>(kPhiloxRoundA) * c0[i];
      const uint32_t next_c0 = static_cast<uint32_t>(prod_b >> 32) ^ c1[i] ^ k0;
      const uint32_t next_c2 = static_cast<uint32_t>(prod_a >> 32) ^ c3[i] ^ k1;
      c1[i] = static_cast<uint32_t>(prod_b);
      c3[i] = static_cast<uint32_t>(prod_a);
      c0[i] = next_c0;
      c2[i] = next_c2;
    }
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
}

}  // namespace deltakern
