// Entry points of dora_linear (DoRA, PEFT's DoraLinearLayer): with the fp32 column scale
// c = magnitude / ‖W + s·B A‖ [N] (fp64 for fp64 inputs) computed by deltakern/ops/dora_linear.py,
//   p == 0:  y = c ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b
//   p > 0:   y = x Wᵀ + b + (c − 1) ⊙ (x̃ Wᵀ) + c ⊙ s·(x̃ Aᵀ) Bᵀ,   x̃ = drop(x)
// Forward and backward build on lora_linear's decomposition (csrc/lora_linear.h): the device-neutral
// GEMM recipe is csrc/dora_linear.cpp, each device supplies its element-wise kernels (DoraKernels;
// csrc/cpu/dora_linear.cpp, csrc/cuda/dora_linear_cuda.cpp). The CPU runs its own recipe for
// moderate dropout (one base GEMM each way plus sparse corrections, csrc/cpu/dora_linear.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "lora_linear.h"

namespace deltakern {

constexpr const char* kDoraOp = "deltakern.dora_linear";

// A device's element-wise kernels of dora_linear, on contiguous tensors of one device; scale is the
// column scale c [N] (fp32, fp64 for fp64 tensors), the others share x's dtype.
struct DoraKernels {
  // y [M, N] = (c − shift) ⊙ z + bias, bias [N] or none; y may be z itself (in place).
  void (*scale_columns)(const at::Tensor& z, const at::Tensor& scale, double shift,
                        const std::optional<at::Tensor>& bias, at::Tensor& y);
  // g_scaled [M, N] = (c − shift) ⊙ grad_out, and returns d_scale [N] = Σ_rows grad_out ⊙ z in
  // scale's dtype (accumulated in fp32 or wider) when z is defined, else an undefined tensor.
  at::Tensor (*scale_grad)(const at::Tensor& grad_out, const at::Tensor& z, const at::Tensor& scale, double shift,
                           at::Tensor& g_scaled);
  // out [rows, K] = rows row0 .. row0 + rows − 1 of drop(x), x [M, K]: element numbering of the
  // whole x, so the mask is the one of the full [M, K] view.
  void (*drop_rows)(const at::Tensor& x, int64_t row0, double dropout_p, int64_t seed, at::Tensor& out);
  // dx [M, K] += mask / (1 − p) ⊙ t, then t [M, K] = drop(x): one pass, the mask regenerated.
  void (*mask_accumulate)(const at::Tensor& x, at::Tensor& t, at::Tensor& dx, double dropout_p, int64_t seed);
  // The forward's drop(x) temporary holds at most this many elements (whole rows, at least one).
  int64_t drop_block_elements;
  // lora_linear's dropout kernels of the device.
  const LoraDropoutKernels* lora;
};

// Checked arguments of a direct call of the ops (the Python op validates fully before it gets
// here): ranks, shapes, dtypes, devices and the seed. Returns the seed.
int64_t check_dora_fwd_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scale,
                            double dropout_p, const at::Tensor& seed);
int64_t check_dora_bwd_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scale,
                            const at::Tensor& xa, const at::Tensor& z, double dropout_p, const at::Tensor& seed);

// The low-rank gradients of a backward with the column scale c: dxa = s·(c ⊙ g) B [M, R] and
// dB = s·(c ⊙ g)ᵀ xa [N, R], as s·g (c ⊙ B) and s·c ⊙ (gᵀ xa).
std::tuple<at::Tensor, at::Tensor> dora_lowrank_grads(const at::Tensor& grad_out, const at::Tensor& lora_B,
                                                      const at::Tensor& scale, const at::Tensor& xa, double scaling);

// The device-neutral recipe, on checked arguments. Forward returns (y [M, N], xa [M, R], z [M, N]
// when save_z, else an empty [0] tensor); backward returns (dx [M, K], d_lora_A [R, K],
// d_lora_B [N, R], d_scale [N] when z is [M, N], else an empty [0] tensor).
//   p == 0: z = x Wᵀ + s·xa Bᵀ and xa = x Aᵀ from lora_linear_fwd_gemms, y = c ⊙ z + b;
//           backward: gc = c ⊙ g and d_scale in one pass, then lora_linear_bwd_gemms on gc.
//   p > 0:  z = x̃ Wᵀ + s·xa Bᵀ, xa = x̃ Aᵀ from lora_linear_fwd_gemms with a base GEMM that drops
//           x in row blocks, y = (c − 1) ⊙ z + b + s·xa Bᵀ + x Wᵀ; backward: gm = (c − 1) ⊙ g
//           and d_scale in one pass, dxa = s·g (c ⊙ B), dB = s·c ⊙ (gᵀ xa), t = gm W + dxa A,
//           dx = g W, then dx += mask ⊙ t / (1 − p) and t = x̃ in one pass, dA = dxaᵀ x̃.
std::tuple<at::Tensor, at::Tensor, at::Tensor> dora_linear_fwd_gemms(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& scale, double scaling, double dropout_p, const at::Tensor& seed,
    bool save_z, const DoraKernels& kernels);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_bwd_gemms(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& scale, const at::Tensor& xa, const at::Tensor& z, double scaling,
    double dropout_p, const at::Tensor& seed, const DoraKernels& kernels);

// The ops' kernels (schemas in csrc/bindings.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> dora_linear_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& scale, double scaling, double dropout_p, const at::Tensor& seed,
    bool save_z);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& scale, const at::Tensor& xa, const at::Tensor& z, double scaling,
    double dropout_p, const at::Tensor& seed);

#ifdef DELTAKERN_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> dora_linear_fwd_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& scale, double scaling, double dropout_p, const at::Tensor& seed,
    bool save_z);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& scale, const at::Tensor& xa, const at::Tensor& z, double scaling,
    double dropout_p, const at::Tensor& seed);
#endif

}  // namespace deltakern
