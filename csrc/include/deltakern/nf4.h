// Decoding of bitsandbytes' NF4 weights (deltakern/nf4.py), shared by the CPU kernels and the
// CUDA kernels: framework-free, __host__ __device__.
//
// The weight [rows, cols] is flattened row-major; element i = n * cols + k has a 4-bit code in
// byte packed[i / 2], the high nibble when i is even, the low one when i is odd. Its value is the
// fp32 product code[nibble] * absmax[i / blocksize] (one fp32 multiply, never fused with
// anything), rounded to the compute dtype by the caller. A block of blocksize elements may span
// two rows; blocksize is even (32 ... 4096), so a block boundary never splits a byte.
#pragma once

#include <cstdint>

#include "deltakern/hd.h"

namespace deltakern {

// The 4-bit code of element i.
DELTAKERN_HD unsigned nf4_nibble(const uint8_t* packed, int64_t i) {
  const unsigned byte = packed[i >> 1];
  return (i & 1) ? (byte & 0xFu) : (byte >> 4);
}

// The fp32 value of element i: code[nibble] * absmax[block], the product bitsandbytes forms.
DELTAKERN_HD float nf4_value(const uint8_t* packed, const float* absmax, const float* code, int64_t blocksize,
                             int64_t i) {
  return code[nf4_nibble(packed, i)] * absmax[i / blocksize];
}

}  // namespace deltakern
