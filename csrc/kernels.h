// Torch-level entry points of the device-specific kernels. The device-neutral GEMM
// decomposition (csrc/lora_linear.cpp) calls these; csrc/cpu/ and csrc/cuda/ define them.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace deltakern {

// xa[M, R] = drop(x) @ lora_A^T without materialising drop(x). x [M, K], lora_A [R, K],
// xa [M, R] preallocated, all contiguous and of one dtype.
void lora_dropout_shrink_cpu(const at::Tensor& x, const at::Tensor& lora_A, double p,
                             int64_t seed, at::Tensor& xa);
// The low-rank part of the backward with dropout, in row blocks that stay in cache:
//   dx [M, K] <- mask * (dxa @ lora_A) / (1 - p)      dA [R, K] <- dxa^T @ drop(x)
// x [M, K], dxa [M, R], lora_A [R, K] contiguous; dx and dA preallocated.
void lora_dropout_lowrank_backward_cpu(const at::Tensor& x, const at::Tensor& dxa,
                                       const at::Tensor& lora_A, double p, int64_t seed,
                                       at::Tensor& dx, at::Tensor& d_lora_A);

// Bool [rows, cols] keep-mask of the dropout of (seed, p): exposes philox.h to the tests.
at::Tensor dropout_keep_mask_cpu(int64_t rows, int64_t cols, double p, int64_t seed);

// prefix_attention (csrc/cpu/prefix_attention.cpp). q [B, Hq, Lq, D]; k, v [B, Hkv, Lk, D];
// prefix_k, prefix_v [Hkv, P, D] (shared by the batch) or [B, Hkv, P, D]; key_padding_mask bool
// [B, Lk] (True = keep) or none; all contiguous. Forward returns out [B, Hq, Lq, D] and the fp32
// row log-sum-exp [B, Hq, Lq]; backward returns dq, dk, dv, dprefix_k, dprefix_v.
std::tuple<at::Tensor, at::Tensor> prefix_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const std::optional<at::Tensor>& key_padding_mask, bool causal,
    double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& prefix_k, const at::Tensor& prefix_v,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& out,
    const at::Tensor& lse, bool causal, double scale);

// adapter (csrc/cpu/adapter.cpp; csrc/cuda/adapter_cuda.cpp). All tensors 2-D, contiguous, of
// one dtype and device: h [M, d], w_down [r, d], b_down [r], w_up [d, r], b_up [d], residual
// [M, d] (none: the residual is h); activation is a code of activations.h. The forward returns
// out = residual + s (act(h w_downᵀ + b_down) w_upᵀ + b_up) [M, d] and pre = h w_downᵀ + b_down
// [M, r]; the backward returns (dh, dw_down, db_down, dw_up, db_up) for grad_out [M, d], with dh
// including grad_out itself when residual_is_h.
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
// The device-independent checks of both (shapes, one dtype and device, contiguity, activation
// code), with messages naming deltakern.adapter; each device adds its dtype check.
void check_adapter_fwd_args(const at::Tensor& h, const at::Tensor& w_down,
                            const std::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                            const std::optional<at::Tensor>& b_up,
                            const std::optional<at::Tensor>& residual, int64_t activation);
void check_adapter_bwd_args(const at::Tensor& grad_out, const at::Tensor& h,
                            const at::Tensor& w_down, const at::Tensor& w_up,
                            const at::Tensor& pre, int64_t activation);

// ia3_linear (csrc/cpu/ia3_linear.cpp; csrc/cuda/ia3_linear_cuda.cpp). x [M, K], weight [N, K],
// bias [N] or none, scale [K] (scale_input) or [N]; one dtype and device. The forward returns
// out [M, N] = (x ⊙ scale) weightᵀ + bias (scale_input) or (x weightᵀ + bias) ⊙ scale, and the
// tensor the backward needs besides the caller's x: the unscaled projection x weightᵀ + bias
// [M, N] for an output scale, a [0, N] tensor for an input scale. The backward takes grad_out
// [M, N] and `unscaled`, the tensor the scale multiplied (x for an input scale, the unscaled
// projection for an output scale), and returns (dx [M, K], dscale in scale's shape and dtype,
// accumulated in fp32). Weight and bias gradients are left to the caller.
std::tuple<at::Tensor, at::Tensor> ia3_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& bias,
                                                      const at::Tensor& scale, bool scale_input);
std::tuple<at::Tensor, at::Tensor> ia3_linear_bwd_cpu(const at::Tensor& grad_out,
                                                      const at::Tensor& unscaled,
                                                      const at::Tensor& weight,
                                                      const at::Tensor& scale, bool scale_input);

#ifdef DELTAKERN_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> ia3_linear_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias,
                                                       const at::Tensor& scale, bool scale_input);
std::tuple<at::Tensor, at::Tensor> ia3_linear_bwd_cuda(const at::Tensor& grad_out,
                                                       const at::Tensor& unscaled,
                                                       const at::Tensor& weight,
                                                       const at::Tensor& scale, bool scale_input);
void lora_dropout_shrink_cuda(const at::Tensor& x, const at::Tensor& lora_A, double p,
                              int64_t seed, at::Tensor& xa);
void lora_dropout_backward_cuda(const at::Tensor& x, at::Tensor& dx_lowrank,
                                at::Tensor& x_dropped, double p, int64_t seed);
// prefix_attention on CUDA (csrc/cuda/prefix_attention_cuda.cpp): the contract of the CPU
// functions above, for fp32, fp16 and bf16 and head dims up to 128.
std::tuple<at::Tensor, at::Tensor> prefix_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const std::optional<at::Tensor>& key_padding_mask, bool causal,
    double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& prefix_k, const at::Tensor& prefix_v,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& out,
    const at::Tensor& lse, bool causal, double scale);
// adapter on CUDA (csrc/cuda/adapter_cuda.cpp): the contract of the CPU functions above, for
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
