// Entry points of ia3_linear (csrc/cpu/ia3_linear.cpp; csrc/cuda/ia3_linear_cuda.cpp). x [M, K],
// weight [N, K], bias [N] or none, scale [K] (scale_input) or [N]; one dtype and device. The
// forward returns out [M, N] = (x ⊙ scale) weightᵀ + bias (scale_input) or (x weightᵀ + bias) ⊙
// scale, and the tensor the backward needs besides the caller's x: the unscaled projection
// x weightᵀ + bias [M, N] for an output scale, a [0, N] tensor for an input scale. The backward
// takes grad_out [M, N] and `unscaled`, the tensor the scale multiplied (x for an input scale, the
// unscaled projection for an output scale), and returns (dx [M, K], dscale in scale's shape and
// dtype, accumulated in fp32). Weight and bias gradients are left to the caller.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace deltakern {

// fp32, bf16 and fp64.
std::tuple<at::Tensor, at::Tensor> ia3_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& bias,
                                                      const at::Tensor& scale, bool scale_input);
std::tuple<at::Tensor, at::Tensor> ia3_linear_bwd_cpu(const at::Tensor& grad_out,
                                                      const at::Tensor& unscaled,
                                                      const at::Tensor& weight,
                                                      const at::Tensor& scale, bool scale_input);

#ifdef DELTAKERN_WITH_CUDA
// fp32, fp16 and bf16.
std::tuple<at::Tensor, at::Tensor> ia3_linear_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias,
                                                       const at::Tensor& scale, bool scale_input);
std::tuple<at::Tensor, at::Tensor> ia3_linear_bwd_cuda(const at::Tensor& grad_out,
                                                       const at::Tensor& unscaled,
                                                       const at::Tensor& weight,
                                                       const at::Tensor& scale, bool scale_input);
#endif

}  // namespace deltakern
