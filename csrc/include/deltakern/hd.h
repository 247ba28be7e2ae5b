// DELTAKERN_HD marks the framework-free functions shared by the CPU (host compiler) and CUDA
// (nvcc) kernels: host and device, inlined, under nvcc; plain inline otherwise.
#pragma once

#if defined(__CUDACC__)
#define DELTAKERN_HD __host__ __device__ __forceinline__
#else
#define DELTAKERN_HD inline
#endif
