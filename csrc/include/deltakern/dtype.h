// The element type of the tensors behind the void pointers of the framework-free params
// structs: the torch glue (host compiler) sets it from the tensor's dtype, the CUDA kernels
// (nvcc) dispatch on it. Plain C++, no framework types.
#pragma once

namespace deltakern {

// The codes are fixed: the host harnesses of tests/csrc pass them as ints.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace deltakern
