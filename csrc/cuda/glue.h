// Checks shared by the torch glue of the CUDA kernels (*_cuda.cpp, host compiler only): the
// kernels' dtype tag of a tensor, and "a contiguous CUDA tensor like the reference input".
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "deltakern/dtype.h"

namespace deltakern {

inline DType to_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": ", name, " must be float32, float16 or bfloat16 on CUDA, got ",
                  t.scalar_type());
  }
}

// t is a contiguous CUDA tensor on ref's device with ref's dtype (ref is named ref_name).
inline void check_cuda_tensor(const at::Tensor& t, const at::Tensor& ref, const char* op,
                              const char* name, const char* ref_name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on ", ref.device(), " like ",
              ref_name, ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have ", ref_name,
              "'s dtype ", ref.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

}  // namespace deltakern
