// Entry points of qlora_linear, y = x Ŵᵀ + b + s · (drop(x) Aᵀ) Bᵀ with Ŵ [N, K] an NF4 weight
// (csrc/include/deltakern/nf4.h), and of nf4_dequantize. Forward and backward are lora_linear's
// decomposition (csrc/lora_linear.h) with the two base GEMMs, x Ŵᵀ and dY Ŵ, replaced by a
// device's kernels that dequantise Ŵ tile by tile inside the GEMM loop (csrc/cpu/qlora_linear.cpp,
// csrc/cuda/qlora_linear_cuda.cpp): no [N, K] weight is ever written. The decomposition is
// inline here, so that both devices' entry points build it without a CUDA file calling a CPU one.
//
// Inputs arrive 2-D and validated by deltakern/ops/qlora_linear.py; the checks here guard direct
// calls of torch.ops.deltakern.*.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "lora_linear.h"

namespace deltakern {

constexpr const char* kQloraOp = "deltakern.qlora_linear";

// An NF4 weight [rows, cols] as the kernels take it: packed uint8 [ceil(rows * cols / 2)], absmax
// fp32 [ceil(rows * cols / blocksize)], code fp32 [16], all contiguous on one device; each value
// is rounded to `dtype` (the compute dtype), whatever dtype the GEMM accumulates in.
struct Nf4Weight {
  at::Tensor packed, absmax, code;
  int64_t blocksize, rows, cols;
  at::ScalarType dtype;
};

// A device's base GEMMs over an NF4 weight w, on contiguous 2-D tensors of one dtype, the
// accumulation dtype: accumulate(w.dtype). Both add onto their output (beta = 1).
struct QloraBaseKernels {
  // out [M, N] += x [M, K] Ŵᵀ
  void (*forward)(const at::Tensor& x, const Nf4Weight& w, at::Tensor& out);
  // dx [M, K] += grad_out [M, N] Ŵ
  void (*backward)(const at::Tensor& grad_out, const Nf4Weight& w, at::Tensor& dx);
  // The dtype a call in dtype t over `rows` rows of x computes in (the CPU takes bf16 to fp32
  // unless it has AVX-512 BF16 and rows is large: see csrc/cpu/qlora_linear.cpp), rounding the
  // results to t once at the end.
  at::ScalarType (*accumulate)(at::ScalarType t, int64_t rows);
};

// The weight of packed, absmax, code, checked against [rows, cols] and blocksize, on `device`,
// rounded to `dtype`. Raises naming deltakern.qlora_linear.
inline Nf4Weight check_nf4_weight(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                                  int64_t blocksize, int64_t rows, int64_t cols, at::ScalarType dtype,
                                  const at::Device& device) {
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0, kQloraOp,
              ": blocksize must be a power of two in [32, 4096], got ", blocksize);
  TORCH_CHECK(rows >= 0 && cols >= 0, kQloraOp, ": the weight's shape must be >= 0, got [", rows, ", ", cols, "]");
  const int64_t numel = rows * cols;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 1 && packed.numel() == (numel + 1) / 2,
              kQloraOp, ": packed must be uint8 [ceil(out * in / 2)] = [", (numel + 1) / 2, "] for a [", rows, ", ",
              cols, "] weight, got ", packed.scalar_type(), " ", packed.sizes());
  const int64_t blocks = (numel + blocksize - 1) / blocksize;
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.dim() == 1 && absmax.numel() == blocks, kQloraOp,
              ": absmax must be float32 [ceil(out * in / blocksize)] = [", blocks, "] for a [", rows, ", ", cols,
              "] weight in blocks of ", blocksize, ", got ", absmax.scalar_type(), " ", absmax.sizes(),
              " (nested absmax must be decoded first, blocksize mismatch?)");
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 16, kQloraOp,
              ": code must be the 16 float32 NF4 levels, got ", code.scalar_type(), " ", code.sizes());
  for (const at::Tensor* t : {&packed, &absmax, &code}) {
    TORCH_CHECK(t->device() == device, kQloraOp, ": packed, absmax and code must be on ", device, ", got ",
                t->device());
  }
  return Nf4Weight{packed.contiguous(), absmax.contiguous(), code.contiguous().view(-1), blocksize, rows, cols,
                   dtype};
}

namespace detail {

inline void check_qlora_2d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, kQloraOp, ": ", name, " must be 2-D, got ", t.dim(), "-D");
}

// x's and lora_A's K, lora_B's [N, R] and bias [N].
inline void check_qlora_shapes(const at::Tensor& x, int64_t out_features, const at::Tensor& lora_A,
                               const at::Tensor& lora_B, const std::optional<at::Tensor>& bias) {
  check_qlora_2d(x, "x");
  check_qlora_2d(lora_A, "lora_A");
  check_qlora_2d(lora_B, "lora_B");
  TORCH_CHECK(lora_A.size(1) == x.size(1), kQloraOp, ": lora_A must be [r, in=", x.size(1), "], got ",
              lora_A.sizes());
  TORCH_CHECK(lora_B.size(0) == out_features && lora_B.size(1) == lora_A.size(0), kQloraOp,
              ": lora_B must be [out=", out_features, ", r=", lora_A.size(0), "], got ", lora_B.sizes());
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == out_features), kQloraOp,
              ": bias must be [out=", out_features, "], got ", bias.has_value() ? bias->sizes() : at::IntArrayRef{});
  for (const at::Tensor* t : {&lora_A, &lora_B}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(), kQloraOp,
                ": lora_A, lora_B and bias must have x's dtype and device");
  }
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == x.scalar_type() && bias->device() == x.device()),
              kQloraOp, ": lora_A, lora_B and bias must have x's dtype and device");
}

inline at::Tensor to_acc(const at::Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }

// lora_linear's base GEMMs as the device's kernels over the NF4 weight w.
inline LoraBaseGemms nf4_base_gemms(const QloraBaseKernels& base, const Nf4Weight& w) {
  return {[&base, w](const at::Tensor& x, at::Tensor& out) { base.forward(x, w, out); },
          [&base, w](const at::Tensor& grad_out, at::Tensor& dx) { base.backward(grad_out, w, dx); }};
}

}  // namespace detail

// Forward: returns (out [M, N], xa [M, R]) with xa = drop(x) Aᵀ: lora_linear's decomposition in
// the accumulation dtype, with the NF4 base GEMMs. The dropout mask depends on (seed, element
// index, dropout_p) only, so the kernels of the accumulation dtype draw lora_linear's mask.
inline std::tuple<at::Tensor, at::Tensor> qlora_linear_fwd_gemms(
    const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
    int64_t blocksize, int64_t out_features, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scaling, double dropout_p, const at::Tensor& seed,
    const QloraBaseKernels& base, const LoraDropoutKernels& dropout) {
  detail::check_qlora_shapes(x_in, out_features, lora_A, lora_B, bias);
  const Nf4Weight w = check_nf4_weight(packed, absmax, code, blocksize, out_features, x_in.size(1),
                                       x_in.scalar_type(), x_in.device());
  const at::ScalarType dtype = x_in.scalar_type();
  const at::ScalarType acc = base.accumulate(dtype, x_in.size(0));
  const std::optional<at::Tensor> bias_acc =
      bias.has_value() ? std::optional<at::Tensor>(bias->to(acc)) : std::nullopt;
  auto [out, xa] = lora_linear_fwd_gemms(detail::to_acc(x_in, acc), out_features, bias_acc,
                                         detail::to_acc(lora_A, acc), detail::to_acc(lora_B, acc), scaling,
                                         dropout_p, seed, detail::nf4_base_gemms(base, w), dropout);
  return {out.to(dtype), xa.to(dtype)};
}

// Backward: returns (dx [M, K], dA [R, K], dB [N, R]), lora_linear's without the weight's gradient.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> qlora_linear_bwd_gemms(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& absmax,
    const at::Tensor& code, int64_t blocksize, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& xa, double scaling, double dropout_p, const at::Tensor& seed,
    const QloraBaseKernels& base, const LoraDropoutKernels& dropout) {
  detail::check_qlora_2d(grad_out, "grad_out");
  detail::check_qlora_shapes(x_in, grad_out.size(1), lora_A, lora_B, std::nullopt);
  TORCH_CHECK(grad_out.size(0) == x_in.size(0) && grad_out.scalar_type() == x_in.scalar_type(), kQloraOp,
              ": grad_out must be [M=", x_in.size(0), ", out] in x's dtype, got ", grad_out.scalar_type(), " ",
              grad_out.sizes());
  TORCH_CHECK(xa.dim() == 2 && xa.size(0) == x_in.size(0) && xa.size(1) == lora_A.size(0), kQloraOp,
              ": xa must be [M, r] = [", x_in.size(0), ", ", lora_A.size(0), "], got ", xa.sizes());
  const Nf4Weight w = check_nf4_weight(packed, absmax, code, blocksize, grad_out.size(1), x_in.size(1),
                                       x_in.scalar_type(), x_in.device());
  const at::ScalarType dtype = x_in.scalar_type();
  const at::ScalarType acc = base.accumulate(dtype, x_in.size(0));
  auto [dx, dA, dB] = lora_linear_bwd_gemms(
      detail::to_acc(grad_out, acc), detail::to_acc(x_in, acc), detail::to_acc(lora_A, acc),
      detail::to_acc(lora_B, acc), detail::to_acc(xa, acc), scaling, dropout_p, seed,
      detail::nf4_base_gemms(base, w), dropout);
  return {dx.to(dtype), dA.to(dtype), dB.to(dtype)};
}

// The op's kernels.
std::tuple<at::Tensor, at::Tensor> qlora_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& packed,
                                                        const at::Tensor& absmax, const at::Tensor& code,
                                                        int64_t blocksize, int64_t out_features,
                                                        const std::optional<at::Tensor>& bias,
                                                        const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                        double scaling, double dropout_p, const at::Tensor& seed);
std::tuple<at::Tensor, at::Tensor, at::Tensor> qlora_linear_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
    const at::Tensor& code, int64_t blocksize, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& xa, double scaling, double dropout_p, const at::Tensor& seed);
// The dense [rows, cols] weight in `dtype` (fp32, fp64, bf16 or fp16 on CPU; fp32, fp16 or bf16 on
// CUDA), equal bit for bit to deltakern.nf4.dequantize_nf4.
at::Tensor nf4_dequantize_cpu(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                              int64_t blocksize, int64_t rows, int64_t cols, at::ScalarType dtype);

#ifdef DELTAKERN_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> qlora_linear_fwd_cuda(const at::Tensor& x, const at::Tensor& packed,
                                                         const at::Tensor& absmax, const at::Tensor& code,
                                                         int64_t blocksize, int64_t out_features,
                                                         const std::optional<at::Tensor>& bias,
                                                         const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                         double scaling, double dropout_p, const at::Tensor& seed);
std::tuple<at::Tensor, at::Tensor, at::Tensor> qlora_linear_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
    const at::Tensor& code, int64_t blocksize, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& xa, double scaling, double dropout_p, const at::Tensor& seed);
at::Tensor nf4_dequantize_cuda(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                               int64_t blocksize, int64_t rows, int64_t cols, at::ScalarType dtype);
#endif

}  // namespace deltakern
