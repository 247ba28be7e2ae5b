// Torch glue of the adapter op on CUDA: the decomposition of csrc/cpu/adapter.cpp with the
// GEMMs in cuBLAS through ATen (accumulating into the output with beta = 1 where a pass has
// initialised it) and the element-wise passes in the kernels of adapter.cu, launched on the
// current stream of the tensors' device. Compiled by the host compiler.
//   forward   pre = h w_downᵀ + b_down (addmm); a = act(pre) (kernel); out = residual + s·b_up
//             (kernel); out += s · a w_upᵀ (GEMM, beta = 1)
//   backward  dz = dOut w_up (GEMM, fp32 output); a_s = s·act(pre), dpre = s·dz·act'(pre) and
//             the column sums of dpre (kernel); dw_up = dOutᵀ a_s, dw_down = dpreᵀ h (GEMMs);
//             column sums of dOut (db_up = s·Σ dOut), and dh = dOut when the residual is h
//             (kernel);
//             dh (+)= dpre w_down (GEMM). The bias gradients are the per-row-group fp32 partial
//             sums of the kernels summed over the groups (at::sum, deterministic).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cuda_runtime.h>

#include <optional>
#include <tuple>

#include "adapter.cuh"
#include "adapter.h"
#include "glue.h"

namespace deltakern {
namespace {

constexpr const char* kOp = "deltakern.adapter (cuda)";

void check_launch(cudaError_t err, const char* kernel, const at::Tensor& h, int64_t r) {
  TORCH_CHECK(err == cudaSuccess, kOp, ": CUDA kernel ", kernel, " failed for M=", h.size(0), ", d=",
              h.size(1), ", r=", r, ", dtype ", h.scalar_type(), ": ", cudaGetErrorString(err));
}

void check_cuda_inputs(const at::Tensor& h) {
  TORCH_CHECK(h.is_cuda(), kOp, ": h must be a CUDA tensor, got device ", h.device());
  to_dtype(h, kOp, "h");  // float32, float16 or bfloat16
}

// scale · the sum of the [groups, n] fp32 partials over the groups, in `like`'s dtype.
at::Tensor sum_groups(const at::Tensor& partial, const at::Tensor& like, double scale = 1.0) {
  at::Tensor sum = partial.sum(0);
  if (scale != 1.0) sum.mul_(scale);
  return sum.to(like.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> adapter_fwd_cuda(const at::Tensor& h, const at::Tensor& w_down,
                                                    const std::optional<at::Tensor>& b_down,
                                                    const at::Tensor& w_up,
                                                    const std::optional<at::Tensor>& b_up,
                                                    const std::optional<at::Tensor>& residual,
                                                    int64_t activation, double scaling) {
  check_adapter_fwd_args(h, w_down, b_down, w_up, b_up, residual, activation);
  check_cuda_inputs(h);
  const c10::cuda::CUDAGuard guard(h.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(h.device().index());
  const int64_t r = w_down.size(0);

  at::Tensor pre = b_down.has_value() ? at::addmm(*b_down, h, w_down.t()) : at::mm(h, w_down.t());
  at::Tensor a = at::empty_like(pre);
  AdapterActivationParams act_params{};
  act_params.pre = pre.const_data_ptr();
  act_params.a = a.data_ptr();
  act_params.n = pre.numel();
  act_params.act = static_cast<Activation>(activation);
  act_params.dtype = to_dtype(h, kOp, "h");
  check_launch(launch_adapter_activation(act_params, stream), "activation", h, r);

  at::Tensor out = at::empty_like(h);
  AdapterInitParams init{};
  init.residual = residual.has_value() ? residual->const_data_ptr() : h.const_data_ptr();
  init.b_up = b_up.has_value() ? b_up->const_data_ptr() : nullptr;
  init.out = out.data_ptr();
  init.M = h.size(0);
  init.d = h.size(1);
  init.scale = static_cast<float>(scaling);
  init.dtype = act_params.dtype;
  check_launch(launch_adapter_init(init, stream), "init", h, r);

  out.addmm_(a, w_up.t(), /*beta=*/1.0, /*alpha=*/scaling);
  return {out, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> adapter_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& w_down, const at::Tensor& w_up,
    const at::Tensor& pre, int64_t activation, double scaling, bool residual_is_h) {
  check_adapter_bwd_args(grad_out, h, w_down, w_up, pre, activation);
  check_cuda_inputs(h);
  const c10::cuda::CUDAGuard guard(h.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(h.device().index());
  const int64_t M = h.size(0), d = h.size(1), r = w_down.size(0);
  const DType dtype = to_dtype(h, kOp, "h");
  const auto fp32 = h.options().dtype(at::kFloat);
  const int64_t groups = column_sum_row_groups(M);

  // dz = dOut w_up in fp32 for every dtype (cuBLAS accumulates in fp32 and, through mm's
  // out_dtype, stores fp32): a dz rounded to fp16/bf16 made db_down's error several times eager
  // PyTorch's when the sum over M cancels (r = 1). For fp32 the kernel updates dz in place.
  const bool fp32_in = h.scalar_type() == at::kFloat;
  at::Tensor dz = fp32_in ? at::mm(grad_out, w_up) : at::mm(grad_out, w_up, at::kFloat);
  at::Tensor dpre = fp32_in ? dz : at::empty_like(pre);
  at::Tensor a_s = at::empty_like(pre);
  at::Tensor partial_down = at::empty({groups, r}, fp32);
  AdapterDpreParams dp{};
  dp.pre = pre.const_data_ptr();
  dp.dz = dz.const_data_ptr<float>();
  dp.dpre = dpre.data_ptr();
  dp.a_s = a_s.data_ptr();
  dp.partial = partial_down.data_ptr<float>();
  dp.M = M;
  dp.r = r;
  dp.scale = static_cast<float>(scaling);
  dp.act = static_cast<Activation>(activation);
  dp.dtype = dtype;
  check_launch(launch_adapter_dpre(dp, stream), "dpre", h, r);
  at::Tensor db_down = sum_groups(partial_down, h);
  at::Tensor dw_up = at::mm(grad_out.t(), a_s);

  at::Tensor dh = residual_is_h ? at::empty_like(grad_out) : at::Tensor();
  at::Tensor partial_up = at::empty({groups, d}, fp32);
  AdapterColsumParams cs{};
  cs.src = grad_out.const_data_ptr();
  cs.copy = residual_is_h ? dh.data_ptr() : nullptr;
  cs.partial = partial_up.data_ptr<float>();
  cs.M = M;
  cs.d = d;
  cs.dtype = dtype;
  check_launch(launch_adapter_colsum(cs, stream), "colsum", h, r);
  at::Tensor db_up = sum_groups(partial_up, h, scaling);
  if (residual_is_h) {
    dh.addmm_(dpre, w_down);
  } else {
    dh = at::mm(dpre, w_down);
  }
  at::Tensor dw_down = at::mm(dpre.t(), h);
  return {dh, dw_down, db_down, dw_up, db_up};
}

}  // namespace deltakern
