// Entry points of lora_linear, y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ. Its forward and backward are
// one device-neutral GEMM decomposition (csrc/lora_linear.cpp) that each device's entry points
// call with the device's dropout kernels (csrc/cpu/lora_linear.cpp, csrc/cuda/lora_linear_cuda.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace deltakern {

// A device's kernels of the dropout parts, on contiguous 2-D tensors of one dtype and device,
// with dropout_p in (0, 1) and the keep mask of philox.h for (seed, dropout_p).
struct LoraDropoutKernels {
  // xa [M, R] = drop(x) lora_Aᵀ without materialising drop(x). x [M, K], lora_A [R, K], xa
  // preallocated.
  void (*shrink)(const at::Tensor& x, const at::Tensor& lora_A, double dropout_p, int64_t seed, at::Tensor& xa);
  // The low-rank part of the backward:
  //   dx [M, K] <- mask ⊙ (dxa lora_A) / (1 - dropout_p)      d_lora_A [R, K] <- dxaᵀ drop(x)
  // x [M, K], dxa [M, R], lora_A [R, K]; dx and d_lora_A preallocated.
  void (*lowrank_backward)(const at::Tensor& x, const at::Tensor& dxa, const at::Tensor& lora_A, double dropout_p,
                           int64_t seed, at::Tensor& dx, at::Tensor& d_lora_A);
};

// The base GEMMs of the decomposition, each adding onto its output (beta = 1): forward
// out [M, N] += x [M, K] Wᵀ, backward dx [M, K] += grad_out [M, N] W. dense_base_gemms multiplies
// a dense weight through ATen (MKL/oneDNN on CPU, cuBLAS on CUDA); the QLoRA op passes GEMMs
// that dequantise its 4-bit weight tile by tile.
struct LoraBaseGemms {
  std::function<void(const at::Tensor& x, at::Tensor& out)> forward;
  std::function<void(const at::Tensor& grad_out, at::Tensor& dx)> backward;
};
LoraBaseGemms dense_base_gemms(const at::Tensor& weight);

// The decomposition. Forward: out [M, N] = x Wᵀ + b + s · xa Bᵀ with xa [M, R] = drop(x) Aᵀ;
// returns (out, xa). Backward: returns (dx [M, K], dA [R, K], dB [N, R]) for grad_out [M, N].
// x [M, K], bias [N] or none, lora_A [R, K], lora_B [N, R], all of one dtype; seed is a
// one-element int64 CPU tensor; W is what `base` multiplies.
std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_gemms(const at::Tensor& x, int64_t out_features,
                                                         const std::optional<at::Tensor>& bias,
                                                         const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                         double scaling, double dropout_p, const at::Tensor& seed,
                                                         const LoraBaseGemms& base,
                                                         const LoraDropoutKernels& dropout);
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_gemms(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& xa, double scaling, double dropout_p, const at::Tensor& seed, const LoraBaseGemms& base,
    const LoraDropoutKernels& dropout);

// The op's kernels, the decomposition with the device's dropout kernels.
std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias,
                                                       const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                       double scaling, double dropout_p, const at::Tensor& seed);
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scaling, double dropout_p, const at::Tensor& seed);

// The CPU dropout kernels, for the ops that build on lora_linear's decomposition.
const LoraDropoutKernels& lora_dropout_kernels_cpu();

// Bool [rows, cols] keep-mask of the dropout of (seed, dropout_p): exposes philox.h to the tests.
at::Tensor dropout_keep_mask_cpu(int64_t rows, int64_t cols, double dropout_p, int64_t seed);

// The uint8 [256] keep bytes of counters first_counter ... first_counter + 63 from one keep_block
// variant (csrc/cpu/keep_mask.h), and the variants this CPU runs: for the tests.
at::Tensor keep_block_bytes_cpu(int64_t seed, int64_t first_counter, double p, const std::string& variant);
std::vector<std::string> keep_block_variants();

#ifdef DELTAKERN_WITH_CUDA
// The CUDA dropout kernels, as lora_dropout_kernels_cpu.
const LoraDropoutKernels& lora_dropout_kernels_cuda();

std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias,
                                                        const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                        double scaling, double dropout_p, const at::Tensor& seed);
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scaling, double dropout_p, const at::Tensor& seed);
#endif

}  // namespace deltakern
