// Entry points of prefix_attention (csrc/cpu/prefix_attention.cpp;
// csrc/cuda/prefix_attention_cuda.cpp). q [B, Hq, Lq, D]; k, v [B, Hkv, Lk, D]; prefix_k,
// prefix_v [Hkv, P, D] (shared by the batch) or [B, Hkv, P, D]; key_padding_mask bool [B, Lk]
// (True = keep) or none; all contiguous. Forward returns out [B, Hq, Lq, D] and the fp32 row
// log-sum-exp [B, Hq, Lq]; backward returns dq, dk, dv, dprefix_k, dprefix_v.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace deltakern {

// fp32, bf16 and fp64.
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
// fp32, fp16 and bf16, head dims up to 128.
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
