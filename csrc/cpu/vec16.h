// 16 fp32 lanes in GCC/Clang vector extensions for the CPU kernels' element-wise passes: one
// AVX-512 register, two AVX2 ones, four SSE2 ones, whichever target the function that inlines
// them is compiled for (the kernels compile their passes as DELTAKERN_CLONES: target_clones for
// AVX-512, AVX2 and the baseline, picked at load time). Every helper is always inlined: an
// outlined copy would be compiled for the baseline target and take its vectors through memory,
// and the psABI note on passing 64-byte vectors without AVX-512 then never applies.
#pragma once
#pragma GCC diagnostic ignored "-Wpsabi"

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#define DELTAKERN_ALWAYS_INLINE inline __attribute__((always_inline))

// A function compiled for AVX-512, AVX2 and the baseline, the one the CPU has picked at load time
// (the extension itself is built for the baseline x86-64).
#define DELTAKERN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

namespace deltakern {
namespace vec16 {

using vfloat = float __attribute__((vector_size(64)));
using vint = int32_t __attribute__((vector_size(64)));
using vuint = uint32_t __attribute__((vector_size(64)));
using vbf16 = uint16_t __attribute__((vector_size(32)));
using vdouble = double __attribute__((vector_size(128)));
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

// The first count (<= kLanes) elements, the other lanes `fill`; and their store. Every element
// thus goes through the same vector code, tails included.
template <typename T>
DELTAKERN_ALWAYS_INLINE vfloat load_part(const T* p, int64_t count, T fill = T(0)) {
  if (count == kLanes) return load_vec(p);
  alignas(64) T buf[kLanes];
  std::fill(buf, buf + kLanes, fill);
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

// The core of Cephes expf, for vector exps that differ only in their range handling (what they
// clamp x to, how they apply 2^n): n = round(x log2 e) and exp(r) for r = x - n ln 2 (ln 2 split
// in two parts, Cody-Waite) by a degree-7 polynomial. Returns exp(r) and sets n; the caller
// clamps x before and applies 2^n after.
DELTAKERN_ALWAYS_INLINE vfloat exp_reduced(vfloat x, vint& n_int) {
  const vfloat t = x * 1.44269504088896341f;
  n_int = __builtin_convertvector(t + (t < 0.0f ? splat(-0.5f) : splat(0.5f)), vint);
  const vfloat n = __builtin_convertvector(n_int, vfloat);
  vfloat r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vfloat y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  return y * r * r + r + 1.0f;
}

// f(c, count) over [0, n) in chunks of kLanes, the last one shorter. The callers' lambdas are
// always inlined too, for the reason above.
template <typename F>
DELTAKERN_ALWAYS_INLINE void for_each_chunk(int64_t n, F&& f) {
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) f(c, kLanes);
  if (c < n) f(c, n - c);
}

// sum[j] += v[j] in fp64 for the first count lanes: the column sums of the element-wise passes
// (a scale's gradient over M rows) accumulate in fp64.
DELTAKERN_ALWAYS_INLINE void add_to_fp64(double* sum, vfloat v, int64_t count) {
  const vdouble d = __builtin_convertvector(v, vdouble);
  if (count == kLanes) {
    vdouble acc;
    std::memcpy(&acc, sum, sizeof(acc));
    acc += d;
    std::memcpy(sum, &acc, sizeof(acc));
    return;
  }
  for (int64_t j = 0; j < count; ++j) sum[j] += d[j];
}

}  // namespace vec16
}  // namespace deltakern
