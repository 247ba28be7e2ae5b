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

#ifdef DELTAKERN_WITH_CUDA
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
#endif

}  // namespace deltakern
