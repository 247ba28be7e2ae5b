// CUDA kernel of qlora_linear's NF4 dequantisation: a flat range of the weight's elements into a
// tile buffer, which the torch glue (qlora_linear_cuda.cpp) hands to cuBLAS. Raw pointers and a
// stream only; no torch header.
//
// One lane decodes one byte, the pair of elements 2b and 2b + 1 (those inside [first, first +
// count)), with nf4.h's decoding: the fp32 product code[nibble] * absmax[i / blocksize], rounded
// once to the output dtype (__float2half_rn / __float2bfloat16_rn: round to nearest even, as
// at::Tensor.to). The body is __host__ __device__ and sees the grid only through its arguments,
// so tests/csrc/qlora_linear_cuda_host.cu runs it on the CPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "convert.cuh"
#include "deltakern/nf4.h"
#include "qlora_linear.cuh"

namespace deltakern {
namespace {

constexpr int kDequantizeThreads = 256;
// Blocks at most; the lanes grid-stride over the remaining bytes.
constexpr int64_t kMaxDequantizeBlocks = 65535;

// The bytes holding the elements [first, first + count).
DELTAKERN_HD int64_t first_byte(int64_t first) { return first >> 1; }
DELTAKERN_HD int64_t byte_count(int64_t first, int64_t count) { return ((first + count + 1) >> 1) - (first >> 1); }

// Byte first_byte(first) + b of the range: its elements that fall inside [first, first + count).
template <typename T>
DELTAKERN_HD void dequantize_byte(const Nf4DequantizeParams& p, const float* code, int64_t b) {
  const int64_t byte = first_byte(p.first) + b;
  const unsigned bits = p.packed[byte];
  const unsigned nibbles[2] = {bits >> 4, bits & 0xFu};
  T* out = static_cast<T*>(p.out);
  for (int half = 0; half < 2; ++half) {
    const int64_t i = 2 * byte + half;
    if (i >= p.first && i < p.first + p.count) {
      out[i - p.first] = from_float<T>(code[nibbles[half]] * p.absmax[i / p.blocksize]);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kDequantizeThreads) nf4_dequantize_kernel(Nf4DequantizeParams p) {
  __shared__ float code[16];
  if (threadIdx.x < 16) code[threadIdx.x] = p.code[threadIdx.x];
  __syncthreads();
  const int64_t bytes = byte_count(p.first, p.count);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kDequantizeThreads;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * kDequantizeThreads + threadIdx.x; b < bytes; b += stride) {
    dequantize_byte<T>(p, code, b);
  }
}

template <typename T>
cudaError_t dequantize_typed(const Nf4DequantizeParams& params, cudaStream_t stream) {
  const Nf4DequantizeGeometry g = nf4_dequantize_geometry(params.first, params.count);
  nf4_dequantize_kernel<T><<<static_cast<unsigned>(g.blocks), g.threads, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace

Nf4DequantizeGeometry nf4_dequantize_geometry(int64_t first, int64_t count) {
  return {kDequantizeThreads, std::min(ceil_div(byte_count(first, count), kDequantizeThreads), kMaxDequantizeBlocks)};
}

cudaError_t launch_nf4_dequantize(const Nf4DequantizeParams& params, cudaStream_t stream) {
  if (params.count == 0) return cudaSuccess;
  switch (params.dtype) {
    case DType::kFloat32: return dequantize_typed<float>(params, stream);
    case DType::kFloat16: return dequantize_typed<__half>(params, stream);
    case DType::kBFloat16: return dequantize_typed<__nv_bfloat16>(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace deltakern
