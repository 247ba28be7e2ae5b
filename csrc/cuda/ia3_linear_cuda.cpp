// Torch glue of ia3_linear on CUDA: the GEMMs in cuBLAS through ATen (accumulating in fp32),
// the scale and its gradient in the kernels of ia3_linear.cu, launched on the current stream of
// the tensors' device. Compiled by the host compiler. x [M, K], W [N, K], dY [M, N].
//   input scale   forward   s applied to one GEMM operand (kernel): x ⊙ s ([M, K]), or for
//                           fp32 W ⊙ s (columns, [N, K]) when M > N; out = addmm(b, ·, ·ᵀ).
//                           Nothing of [M, N] besides the GEMM's output.
//                 backward  g = dY W (GEMM, fp32 output); dx = g ⊙ s and the per-row-group fp32
//                           partials of ds = Σ g ⊙ x (one kernel).
//   output scale  forward   z = addmm(b, x, Wᵀ) (GEMM); out = z ⊙ s (kernel).
//                 backward  the partials of ds = Σ dY ⊙ z (kernel, which also writes dY ⊙ s
//                           when that is the GEMM operand); dx = (dY ⊙ s) W, or for fp32
//                           dY (W ⊙ s rows) when M > 2K (GEMM).
// ds is the sum of the partials over the row groups (at::sum, deterministic), in scale's dtype.
//
// fp16/bf16 always scale x (forward) and dY (backward), the operands eager PyTorch rounds, as
// the cpu kernels and Triton do: the scaled operand is rounded to the dtype either way, and
// rounding the one eager rounds keeps the error where eager's is. On the cpu backend, folding
// into W put bf16 dx at M = 1, K = 1, N = 300 at 1.4 times the bound of tests/tolerances.py
// (csrc/cpu/ia3_linear.cpp). The cost is the scale pass over [M, K] rather than [N, K]: for
// M = 16384, K = N = 4096 in bf16 about 0.1 ms more at 2 TB/s next to a ~2 ms GEMM
// (estimated; no GPU here to measure).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cuda_runtime.h>

#include <optional>
#include <tuple>

#include "glue.h"
#include "ia3_linear.cuh"
#include "ia3_linear.h"

namespace deltakern {
namespace {

constexpr const char* kOp = "deltakern.ia3_linear (cuda)";

// t is the [rows, cols] tensor the kernel walks.
void check_launch(cudaError_t err, const char* kernel, const at::Tensor& t) {
  TORCH_CHECK(err == cudaSuccess, kOp, ": CUDA kernel ", kernel, " failed for ", t.sizes(), ", dtype ",
              t.scalar_type(), ": ", cudaGetErrorString(err));
}

// The cheap checks of a direct call (the Python op validates fully before it gets here):
// ranks, the shapes the kernels index with, and one device, dtype and layout for all.
void check_weight_and_scale(const at::Tensor& weight, const at::Tensor& scale, bool scale_input,
                            const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(weight.dim() == 2, kOp, ": weight must be 2-D [N, K], got ", weight.sizes());
  const int64_t features = weight.size(scale_input ? 1 : 0);
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == features, kOp, ": ",
              scale_input ? "an input scale must be [K] = [" : "an output scale must be [N] = [",
              features, "], got ", scale.sizes());
  check_cuda_tensor(weight, ref, kOp, "weight", ref_name);
  check_cuda_tensor(scale, ref, kOp, "scale", ref_name);
}

// scale · src per column (s [cols]) or per row (s [rows]) into a new tensor like src.
at::Tensor scaled(const at::Tensor& src, const at::Tensor& scale, bool per_column, DType dtype,
                  cudaStream_t stream) {
  at::Tensor dst = at::empty_like(src);
  Ia3ScaleParams p{};
  p.src = src.const_data_ptr();
  p.scale = scale.const_data_ptr();
  p.dst = dst.data_ptr();
  p.rows = src.size(0);
  p.cols = src.size(1);
  p.per_column = per_column;
  p.dtype = dtype;
  check_launch(launch_ia3_scale(p, stream), "scale", src);
  return dst;
}

// a bᵀ + bias for a [M, K], b [N, K]: one cuBLAS GEMM with the bias as its beta term.
at::Tensor project(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias) {
  return bias.has_value() ? at::addmm(*bias, a, b.t()) : at::mm(a, b.t());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ia3_linear_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias,
                                                       const at::Tensor& scale, bool scale_input) {
  TORCH_CHECK(x.is_cuda(), kOp, ": x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 2, kOp, ": x must be 2-D [M, K], got ", x.sizes());
  const DType dtype = to_dtype(x, kOp, "x");
  check_cuda_tensor(x, x, kOp, "x", "x");
  check_weight_and_scale(weight, scale, scale_input, x, "x");
  TORCH_CHECK(weight.size(1) == x.size(1), kOp, ": weight must be [N, K] with K = ", x.size(1),
              " (x's columns), got ", weight.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), kOp, ": bias must be [N] = [",
                weight.size(0), "], got ", bias->sizes());
    check_cuda_tensor(*bias, x, kOp, "bias", "x");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  const int64_t M = x.size(0), N = weight.size(0);

  if (scale_input) {
    // fp32 folds the scale into the smaller GEMM operand, so its pass reads and writes
    // min(M, N)·K elements; [M, N] is written once, by the GEMM. The scaled operand is rounded
    // to the dtype once, as the reference's x ⊙ s is.
    const bool fold_weight = dtype == DType::kFloat32 && M > N;
    at::Tensor out = fold_weight ? project(x, scaled(weight, scale, /*per_column=*/true, dtype, stream), bias)
                                 : project(scaled(x, scale, /*per_column=*/true, dtype, stream), weight, bias);
    return {out, x.new_empty({0, N})};
  }

  // The output scale keeps a pass over [M, N] after the GEMM: backward needs the unscaled z
  // (ds = Σ dY ⊙ z), so z is written in any case, and ATen's cuBLAS GEMMs have no epilogue that
  // would also write z ⊙ s. A fused epilogue would save only this pass's read of z: for
  // M = 16384 tokens, N = K = 4096 in bf16 that is 128 MiB, about 0.07 ms at A100's 2 TB/s next
  // to the GEMM's 550 GFLOP, about 2 ms at 280 TFLOP/s (estimated: ~3%; no GPU here to measure).
  at::Tensor z = project(x, weight, bias);
  return {scaled(z, scale, /*per_column=*/true, dtype, stream), z};
}

std::tuple<at::Tensor, at::Tensor> ia3_linear_bwd_cuda(const at::Tensor& grad_out,
                                                       const at::Tensor& unscaled,
                                                       const at::Tensor& weight,
                                                       const at::Tensor& scale, bool scale_input) {
  TORCH_CHECK(grad_out.is_cuda(), kOp, ": grad_out must be a CUDA tensor, got device ", grad_out.device());
  TORCH_CHECK(grad_out.dim() == 2, kOp, ": grad_out must be 2-D [M, N], got ", grad_out.sizes());
  const DType dtype = to_dtype(grad_out, kOp, "grad_out");
  check_cuda_tensor(grad_out, grad_out, kOp, "grad_out", "grad_out");
  check_weight_and_scale(weight, scale, scale_input, grad_out, "grad_out");
  const int64_t M = grad_out.size(0), N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(grad_out.size(1) == N, kOp, ": grad_out must be [M, N] with N = ", N,
              " (weight's rows), got ", grad_out.sizes());
  const int64_t unscaled_cols = scale_input ? K : N;
  TORCH_CHECK(unscaled.dim() == 2 && unscaled.size(0) == M && unscaled.size(1) == unscaled_cols, kOp,
              ": unscaled (", scale_input ? "x" : "the unscaled projection", ") must be [", M, ", ",
              unscaled_cols, "], got ", unscaled.sizes());
  check_cuda_tensor(unscaled, grad_out, kOp, "unscaled", "grad_out");
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(grad_out.device().index());
  at::Tensor partial = at::empty({column_sum_row_groups(M), unscaled_cols}, grad_out.options().dtype(at::kFloat));
  at::Tensor dx;

  if (scale_input) {
    // g = dY W in fp32 for every dtype (cuBLAS accumulates in fp32 and, through mm's out_dtype,
    // stores fp32), as adapter_cuda.cpp's dz: ds = Σ g ⊙ x then sums unrounded products, and dx
    // is rounded once. For fp32 the kernel turns g into dx in place.
    const bool fp32_in = grad_out.scalar_type() == at::kFloat;
    at::Tensor g = fp32_in ? at::mm(grad_out, weight) : at::mm(grad_out, weight, at::kFloat);
    dx = fp32_in ? g : at::empty({M, K}, grad_out.options());
    Ia3InputGradParams p{};
    p.g = g.const_data_ptr<float>();
    p.x = unscaled.const_data_ptr();
    p.scale = scale.const_data_ptr();
    p.dx = dx.data_ptr();
    p.partial = partial.data_ptr<float>();
    p.M = M;
    p.K = K;
    p.dtype = dtype;
    check_launch(launch_ia3_input_grad(p, stream), "input_grad", unscaled);
  } else {
    // dx = (dY ⊙ s) W costs the column-sum pass (which reads dY anyway) M·N more writes;
    // dY (W ⊙ s) costs a pass of its own reading and writing N·K. For fp32 the weight fold is
    // the cheaper one when M > 2K (training: M = batch · sequence tokens, many times K).
    const bool fold_weight = dtype == DType::kFloat32 && M > 2 * K;
    at::Tensor grad_scaled = fold_weight ? at::Tensor() : at::empty_like(grad_out);
    Ia3OutputGradParams p{};
    p.grad_out = grad_out.const_data_ptr();
    p.z = unscaled.const_data_ptr();
    p.scale = scale.const_data_ptr();
    p.scaled_grad = fold_weight ? nullptr : grad_scaled.data_ptr();
    p.partial = partial.data_ptr<float>();
    p.M = M;
    p.N = N;
    p.dtype = dtype;
    check_launch(launch_ia3_output_grad(p, stream), "output_grad", grad_out);
    dx = fold_weight ? at::mm(grad_out, scaled(weight, scale, /*per_column=*/false, dtype, stream))
                     : at::mm(grad_scaled, weight);
  }
  return {dx, partial.sum(0).to(scale.scalar_type())};
}

}  // namespace deltakern
