// The activations, their values and derivatives: one formula each, shared by the CPU kernels
// (fp32 in 16-lane vectors, fp64 in scalars) and the CUDA kernels (fp32 math for every dtype).
// Framework-free, host and device (nvcc) alike.
//
// The table they follow is deltakern/activations.py: a code is the index of its name in
// ACTIVATIONS ("relu", "gelu", "gelu_tanh", "silu", "tanh") and travels as an int through the op
// schemas. enum class Activation lists the codes and kActivationNames the names, in that order;
// deltakern._C exports kActivationNames as deltakern._C.activations, and
// tests/test_activations.py checks it against ACTIVATIONS. Each formula is the one PyTorch
// evaluates (aten/src/ATen/native/cpu/Activation.cpp, GeluKernel.cpp):
//   relu       max(x, 0)                           relu'      x <= 0 ? 0 : 1 (0 at 0; 1 at NaN, as
//                                                             torch's threshold_backward)
//   gelu       x Φ(x) = x (1 + erf(x/√2)) / 2       gelu'      Φ(x) + x φ(x), φ(x) = e^(-x²/2)/√(2π)
//   gelu_tanh  x (1 + tanh(u)) / 2 with u = √(2/π) (x + 0.044715 x³)
//              gelu_tanh' = (1 + tanh u) / 2 + x (1 - tanh² u) √(2/π) (1 + 3 · 0.044715 x²) / 2
//   silu       x σ(x), σ(x) = 1 / (1 + e^(-x))      silu'      σ(x) (1 + x (1 - σ(x)))
//   tanh       tanh(x)                             tanh'      1 - tanh²(x)
//
// The formulas are templates on the value type T and a Math policy that supplies exp, erf and
// tanh of T and names the scalar type of T's elements (Math::Scalar). ScalarMath<float|double>
// calls the C library on the host and CUDA's functions on the device; the CPU kernels pass a
// policy of GCC vector types (their VecMath), for which the same expressions compile to
// lane-wise vector code: scalar operands broadcast, comparisons give lane masks and `?:`
// selects lane-wise. So every formula is written with Scalar constants, T{} for zero, and
// selects whose two arms are both T.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "deltakern/hd.h"

// The formulas are always inlined, on the host as well: the CPU kernels call them from
// functions compiled for AVX-512 and AVX2 (target_clones), and an outlined copy would be
// compiled for the baseline target and take its vectors through memory.
#if defined(__CUDACC__)
#define DELTAKERN_ACT_HD __host__ __device__ __forceinline__
#else
#define DELTAKERN_ACT_HD inline __attribute__((always_inline))
#endif

namespace deltakern {

enum class Activation : int { kRelu = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3, kTanh = 4 };

constexpr int kNumActivations = 5;

// The name of each activation, in code order (deltakern/activations.py's ACTIVATIONS).
inline constexpr const char* kActivationNames[] = {"relu", "gelu", "gelu_tanh", "silu", "tanh"};
static_assert(sizeof(kActivationNames) / sizeof(kActivationNames[0]) == kNumActivations,
              "one name per activation code");

// Whether an int from the op schema names an activation.
DELTAKERN_HD bool is_activation_code(int64_t code) { return code >= 0 && code < kNumActivations; }

// exp, erf and tanh of float or double: the C library on the host, CUDA's on the device.
template <typename T>
struct ScalarMath {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "float or double");
  using Scalar = T;

  static DELTAKERN_ACT_HD T exp(T x) {
#if defined(__CUDA_ARCH__)
    if constexpr (std::is_same_v<T, float>) return ::expf(x); else return ::exp(x);
#else
    return std::exp(x);
#endif
  }
  static DELTAKERN_ACT_HD T erf(T x) {
#if defined(__CUDA_ARCH__)
    if constexpr (std::is_same_v<T, float>) return ::erff(x); else return ::erf(x);
#else
    return std::erf(x);
#endif
  }
  static DELTAKERN_ACT_HD T tanh(T x) {
#if defined(__CUDA_ARCH__)
    if constexpr (std::is_same_v<T, float>) return ::tanhf(x); else return ::tanh(x);
#else
    return std::tanh(x);
#endif
  }
};

namespace activation_detail {
// Constants in double; the formulas cast them to Math::Scalar.
constexpr double kSqrt1_2 = 0.70710678118654752440;       // 1/√2
constexpr double kInvSqrt2Pi = 0.39894228040143267794;    // 1/√(2π)
constexpr double kSqrt2OverPi = 0.79788456080286535588;   // √(2/π)
constexpr double kGeluTanhCubic = 0.044715;
}  // namespace activation_detail

// act(x).
template <Activation kAct, typename T, typename Math = ScalarMath<T>>
DELTAKERN_ACT_HD T activation(T x) {
  using S = typename Math::Scalar;
  namespace k = activation_detail;
  if constexpr (kAct == Activation::kRelu) {
    return x < S(0) ? T{} : x;  // NaN stays NaN, as torch.relu
  } else if constexpr (kAct == Activation::kGelu) {
    return S(0.5) * x * (S(1) + Math::erf(x * S(k::kSqrt1_2)));
  } else if constexpr (kAct == Activation::kGeluTanh) {
    const T inner = S(k::kSqrt2OverPi) * (x + S(k::kGeluTanhCubic) * x * x * x);
    return S(0.5) * x * (S(1) + Math::tanh(inner));
  } else if constexpr (kAct == Activation::kSilu) {
    return x / (S(1) + Math::exp(-x));
  } else {
    static_assert(kAct == Activation::kTanh, "unknown activation");
    return Math::tanh(x);
  }
}

// act'(x), and act(x) into value: the two share their exp, erf or tanh.
template <Activation kAct, typename T, typename Math = ScalarMath<T>>
DELTAKERN_ACT_HD T activation_grad(T x, T& value) {
  using S = typename Math::Scalar;
  namespace k = activation_detail;
  if constexpr (kAct == Activation::kRelu) {
    value = x < S(0) ? T{} : x;
    return x <= S(0) ? T{} : T{} + S(1);
  } else if constexpr (kAct == Activation::kGelu) {
    const T cdf = S(0.5) * (S(1) + Math::erf(x * S(k::kSqrt1_2)));
    const T pdf = S(k::kInvSqrt2Pi) * Math::exp(S(-0.5) * x * x);
    value = x * cdf;
    return cdf + x * pdf;
  } else if constexpr (kAct == Activation::kGeluTanh) {
    const T x_sq = x * x;
    const T t = Math::tanh(S(k::kSqrt2OverPi) * (x + S(k::kGeluTanhCubic) * x_sq * x));
    const T half_x = S(0.5) * x;
    value = half_x * (S(1) + t);
    return S(0.5) * (S(1) + t) +
           half_x * (S(1) - t * t) * (S(k::kSqrt2OverPi) * (S(1) + S(3.0 * k::kGeluTanhCubic) * x_sq));
  } else if constexpr (kAct == Activation::kSilu) {
    const T sigmoid = S(1) / (S(1) + Math::exp(-x));
    value = x * sigmoid;
    return sigmoid * (S(1) + x * (S(1) - sigmoid));
  } else {
    static_assert(kAct == Activation::kTanh, "unknown activation");
    const T t = Math::tanh(x);
    value = t;
    return S(1) - t * t;
  }
}

// Calls f(std::integral_constant<Activation, kAct>{}) for the runtime code act, so a kernel is
// instantiated once per activation and its inner loop has no switch. Host code only (the
// launchers); act must be valid (is_activation_code).
template <typename F>
inline decltype(auto) dispatch_activation(Activation act, F&& f) {
  switch (act) {
    case Activation::kGelu:
      return std::forward<F>(f)(std::integral_constant<Activation, Activation::kGelu>{});
    case Activation::kGeluTanh:
      return std::forward<F>(f)(std::integral_constant<Activation, Activation::kGeluTanh>{});
    case Activation::kSilu:
      return std::forward<F>(f)(std::integral_constant<Activation, Activation::kSilu>{});
    case Activation::kTanh:
      return std::forward<F>(f)(std::integral_constant<Activation, Activation::kTanh>{});
    case Activation::kRelu:
    default:
      return std::forward<F>(f)(std::integral_constant<Activation, Activation::kRelu>{});
  }
}

}  // namespace deltakern
