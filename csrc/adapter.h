// Entry points of the adapter op (csrc/cpu/adapter.cpp; csrc/cuda/adapter_cuda.cpp) and the
// device-independent checks they share (csrc/adapter_checks.cpp). All tensors 2-D, contiguous,
// of one dtype and device: h [M, d], w_down [r, d], b_down [r], w_up [d, r], b_up [d], residual
// [M, d] (none: the residual is h); activation is a code of activations.h. The forward returns
// out = residual + s (act(h w_downᵀ + b_down) w_upᵀ + b_up) [M, d] and pre = h w_downᵀ + b_down
// [M, r]; the backward returns (dh, dw_down, db_down, dw_up, db_up) for grad_out [M, d], with dh
// including grad_out itself when residual_is_h.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace deltakern {

// The checks of both directions that hold on every device (shapes, one dtype and device,
// contiguity, activation code), with messages naming deltakern.adapter; each device adds its
// dtype check.
void check_adapter_fwd_args(const at::Tensor& h, const at::Tensor& w_down,
                            const std::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                            const std::optional<at::Tensor>& b_up,
                            const std::optional<at::Tensor>& residual, int64_t activation);
void check_adapter_bwd_args(const at::Tensor& grad_out, const at::Tensor& h,
                            const at::Tensor& w_down, const at::Tensor& w_up,
                            const at::Tensor& pre, int64_t activation);

// fp32, bf16 and fp64.
std::tuple<at::Tensor, at::Tensor> adapter_fwd_cpu(const at::Tensor& h, const at::Tensor& w_down,
                                                   const std::optional<at::Tensor>& b_down,
                                                   const at::Tensor& w_up,
                                                   const std::optional<at::Tensor>& b_up,
                                                   const std::optional<at::Tensor>& residual,
                                                   int64_t activation, double scaling);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> adapter_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& w_down,
    const at::Tensor& w_up, const at::Tensor& pre, int64_t activation, double scaling,
    bool residual_is_h);

#ifdef DELTAKERN_WITH_CUDA
// fp32, fp16 and bf16.
std::tuple<at::Tensor, at::Tensor> adapter_fwd_cuda(const at::Tensor& h, const at::Tensor& w_down,
                                                    const std::optional<at::Tensor>& b_down,
                                                    const at::Tensor& w_up,
                                                    const std::optional<at::Tensor>& b_up,
                                                    const std::optional<at::Tensor>& residual,
                                                    int64_t activation, double scaling);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> adapter_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& w_down,
    const at::Tensor& w_up, const at::Tensor& pre, int64_t activation, double scaling,
    bool residual_is_h);
#endif

}  // namespace deltakern
