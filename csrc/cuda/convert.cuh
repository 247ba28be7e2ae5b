// Conversions between fp32 and the storage types of the CUDA kernels (float, __half,
// __nv_bfloat16), and small integer helpers. Framework-free and __host__ __device__. Explicit
// conversion intrinsics, because torch builds with __CUDA_NO_HALF_OPERATORS__ /
// __CUDA_NO_BFLOAT16_CONVERSIONS__.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "deltakern/hd.h"

namespace deltakern {

DELTAKERN_HD float to_float(float v) { return v; }
DELTAKERN_HD float to_float(__half v) { return __half2float(v); }
DELTAKERN_HD float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
DELTAKERN_HD T from_float(float v);
template <>
DELTAKERN_HD float from_float<float>(float v) { return v; }
template <>
DELTAKERN_HD __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
DELTAKERN_HD __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

DELTAKERN_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
DELTAKERN_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace deltakern
