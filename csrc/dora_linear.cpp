// dora_linear's checks of direct calls and its device-neutral recipe (csrc/dora_linear.h): the
// GEMMs through lora_linear's decomposition and ATen (MKL/oneDNN on CPU, cuBLAS on CUDA), the
// element-wise passes through the device's DoraKernels.
#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "dora_linear.h"
#include "lora_linear.h"

namespace deltakern {
namespace {

void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), kDoraOp, ": ", name, " must have x's dtype ", x.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), kDoraOp, ": ", name, " must be on ", x.device(), " like x, got ",
              t.device());
}

void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name, const char* dims) {
  TORCH_CHECK(t.sizes() == expected, kDoraOp, ": ", name, " must be ", dims, " = ", expected, ", got ", t.sizes());
}

// x [M, K], weight [N, K], lora_A [R, K], lora_B [N, R], scale [N]; returns the seed.
int64_t check_common(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                     const at::Tensor& lora_B, const at::Tensor& scale, double dropout_p, const at::Tensor& seed) {
  TORCH_CHECK(x.dim() == 2, kDoraOp, ": x must be 2-D [M, K], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), kDoraOp, ": weight must be [N, K] with K = ",
              x.size(1), " (x's columns), got ", weight.sizes());
  const int64_t N = weight.size(0), K = x.size(1);
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(1) == K, kDoraOp, ": lora_A must be [R, K] with K = ", K, ", got ",
              lora_A.sizes());
  check_shape(lora_B, {N, lora_A.size(0)}, "lora_B", "[N, R]");
  check_shape(scale, {N}, "scale", "[N]");
  check_like(weight, x, "weight");
  check_like(lora_A, x, "lora_A");
  check_like(lora_B, x, "lora_B");
  const at::ScalarType scale_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(scale.scalar_type() == scale_dtype, kDoraOp, ": scale must be ", scale_dtype, " for ",
              x.scalar_type(), " inputs (float64 only for float64), got ", scale.scalar_type());
  TORCH_CHECK(scale.device() == x.device(), kDoraOp, ": scale must be on ", x.device(), " like x, got ",
              scale.device());
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, kDoraOp, ": dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(seed.device().is_cpu() && seed.scalar_type() == at::kLong && seed.numel() == 1, kDoraOp,
              ": seed must be a one-element int64 CPU tensor, got ", seed.scalar_type(), " ", seed.sizes(), " on ",
              seed.device());
  return seed.item<int64_t>();
}

at::Tensor empty_placeholder(const at::Tensor& like) { return at::empty({0}, like.options()); }

}  // namespace

int64_t check_dora_fwd_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scale,
                            double dropout_p, const at::Tensor& seed) {
  const int64_t s = check_common(x, weight, lora_A, lora_B, scale, dropout_p, seed);
  if (bias.has_value()) {
    check_shape(*bias, {weight.size(0)}, "bias", "[N]");
    check_like(*bias, x, "bias");
  }
  return s;
}

int64_t check_dora_bwd_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scale,
                            const at::Tensor& xa, const at::Tensor& z, double dropout_p, const at::Tensor& seed) {
  const int64_t s = check_common(x, weight, lora_A, lora_B, scale, dropout_p, seed);
  const int64_t M = x.size(0), N = weight.size(0);
  check_shape(grad_out, {M, N}, "grad_out", "[M, N]");
  check_like(grad_out, x, "grad_out");
  check_shape(xa, {M, lora_A.size(0)}, "xa", "[M, R]");
  check_like(xa, x, "xa");
  TORCH_CHECK((z.dim() == 2 && z.size(0) == M && z.size(1) == N) || (z.dim() == 1 && z.size(0) == 0), kDoraOp,
              ": z must be [M, N] = [", M, ", ", N, "] or the empty [0] placeholder, got ", z.sizes());
  check_like(z, x, "z");
  return s;
}

std::tuple<at::Tensor, at::Tensor> dora_lowrank_grads(const at::Tensor& grad_out, const at::Tensor& lora_B,
                                                      const at::Tensor& scale, const at::Tensor& xa, double scaling) {
  // c goes into the [N, R] factor, not into a second scaled copy of g [M, N].
  const at::ScalarType dtype = grad_out.scalar_type();
  const at::Tensor scaled_B = (lora_B.to(scale.scalar_type()) * scale.unsqueeze(1)).to(dtype);
  at::Tensor dxa = at::mm(grad_out, scaled_B).mul_(scaling);
  at::Tensor d_lora_B = (at::mm(xa.t(), grad_out).to(scale.scalar_type()) * (scale * scaling)).t().to(dtype);
  return {dxa, d_lora_B.contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dora_linear_fwd_gemms(
    const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& scale, double scaling, double dropout_p, const at::Tensor& seed,
    bool save_z, const DoraKernels& kernels) {
  const int64_t N = weight.size(0);
  const at::Tensor x = x_in.contiguous();
  if (dropout_p == 0.0) {
    auto [z, xa] = lora_linear_fwd_gemms(x, N, std::nullopt, lora_A, lora_B, scaling, 0.0, seed,
                                         dense_base_gemms(weight), *kernels.lora);
    at::Tensor y = save_z ? at::empty_like(z) : z;
    kernels.scale_columns(z, scale, 0.0, bias, y);
    return {y, xa, save_z ? z : empty_placeholder(x)};
  }
  // z = x̃ Wᵀ + s·xa Bᵀ is lora_linear's forward with the base GEMM on x̃ too: the base GEMM
  // drops x in row blocks of at most drop_block_elements, never the whole [M, K].
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t seed_value = seed.item<int64_t>();
  const int64_t block_rows = std::max<int64_t>(1, kernels.drop_block_elements / std::max<int64_t>(K, 1));
  const LoraBaseGemms dropped_base{
      [&](const at::Tensor& rows_of_x, at::Tensor& out) {
        at::Tensor buffer = at::empty({std::min(block_rows, M), K}, x.options());
        for (int64_t row0 = 0; row0 < M; row0 += block_rows) {
          const int64_t rows = std::min(block_rows, M - row0);
          at::Tensor dropped = buffer.narrow(0, 0, rows);
          kernels.drop_rows(rows_of_x, row0, dropout_p, seed_value, dropped);
          out.narrow(0, row0, rows).addmm_(dropped, weight.t());
        }
      },
      nullptr};
  auto [z, xa] = lora_linear_fwd_gemms(x, N, std::nullopt, lora_A, lora_B, scaling, dropout_p, seed, dropped_base,
                                       *kernels.lora);
  // y = (c − 1) ⊙ z + b + s·xa Bᵀ + x Wᵀ = x Wᵀ + b + (c − 1) ⊙ (x̃ Wᵀ) + c ⊙ s·xa Bᵀ.
  at::Tensor y = save_z ? at::empty_like(z) : z;
  kernels.scale_columns(z, scale, 1.0, bias, y);
  y.addmm_(xa, lora_B.t(), /*beta=*/1.0, /*alpha=*/scaling);
  y.addmm_(x, weight.t());
  return {y, xa, save_z ? z : empty_placeholder(x)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_bwd_gemms(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& scale, const at::Tensor& xa, const at::Tensor& z_in, double scaling,
    double dropout_p, const at::Tensor& seed, const DoraKernels& kernels) {
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const bool has_z = z_in.dim() == 2;
  const at::Tensor z = has_z ? z_in.contiguous() : at::Tensor();
  at::Tensor g_scaled = at::empty_like(grad_out);
  if (dropout_p == 0.0) {
    // gc = c ⊙ g and d_scale from one pass over (g, z); then lora_linear's backward of gc.
    at::Tensor d_scale = kernels.scale_grad(grad_out, z, scale, 0.0, g_scaled);
    auto [dx, d_lora_A, d_lora_B] = lora_linear_bwd_gemms(g_scaled, x, lora_A, lora_B, xa, scaling, 0.0, seed,
                                                          dense_base_gemms(weight), *kernels.lora);
    return {dx, d_lora_A, d_lora_B, has_z ? d_scale : empty_placeholder(scale)};
  }
  // gm = (c − 1) ⊙ g and d_scale from one pass over (g, z).
  at::Tensor d_scale = kernels.scale_grad(grad_out, z, scale, 1.0, g_scaled);
  auto [dxa, d_lora_B] = dora_lowrank_grads(grad_out, lora_B, scale, xa, scaling);
  // t = gm W + dxa A and dx = g W; one pass then adds mask ⊙ t / (1 − p) to dx and turns t into
  // x̃ for dA = dxaᵀ x̃.
  at::Tensor t = at::mm(g_scaled, weight);
  t.addmm_(dxa, lora_A);
  at::Tensor dx = at::mm(grad_out, weight);
  kernels.mask_accumulate(x, t, dx, dropout_p, seed.item<int64_t>());
  at::Tensor d_lora_A = at::mm(dxa.t(), t);
  return {dx, d_lora_A, d_lora_B, has_z ? d_scale : empty_placeholder(scale)};
}

}  // namespace deltakern
