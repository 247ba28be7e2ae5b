// Torch glue of qlora_linear on CUDA: the base GEMMs over the NF4 weight as row tiles of Ŵ,
// each dequantised by the kernel of qlora_linear.cu into one reused tile buffer and multiplied
// by cuBLAS (addmm_ through ATen, accumulating with beta = 1) on the tensors' current stream:
//   forward  out[:, n0 : n0 + tn] += x tileᵀ        backward  dx += dY[:, n0 : n0 + tn] tile
// with tile = Ŵ[n0 : n0 + tn, :], the flat range [n0 K, (n0 + tn) K) of the weight. The stream
// orders each dequantisation after the GEMM that read the buffer before it. The rest of the op
// is lora_linear's decomposition (csrc/qlora_linear.h) with lora_linear's CUDA dropout kernels.
// Compiled by the host compiler.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "glue.h"
#include "lora_linear.h"
#include "qlora_linear.cuh"
#include "qlora_linear.h"

namespace deltakern {
namespace {

// Values of Ŵ per tile: 8 MiB in bf16. A [4096, 4096] weight takes 4 tiles, each GEMM still
// large enough to fill the GPU at training batch sizes; the buffer stays small next to the
// activations.
constexpr int64_t kTileElements = int64_t{1} << 22;

// dst (contiguous, w.dtype, count elements) = the flat elements [first, first + count) of w.
void dequantize_into(const Nf4Weight& w, int64_t first, int64_t count, at::Tensor& dst) {
  Nf4DequantizeParams params{};
  params.packed = w.packed.const_data_ptr<uint8_t>();
  params.absmax = w.absmax.const_data_ptr<float>();
  params.code = w.code.const_data_ptr<float>();
  params.blocksize = w.blocksize;
  params.first = first;
  params.count = count;
  params.out = dst.data_ptr();
  params.dtype = to_dtype(dst, kQloraOp, "the weight tile");
  const cudaError_t err = launch_nf4_dequantize(params, c10::cuda::getCurrentCUDAStream(dst.device().index()));
  TORCH_CHECK(err == cudaSuccess, kQloraOp, ": NF4 dequantisation launch failed for elements [", first, ", ",
              first + count, "), dtype ", dst.scalar_type(), ": ", cudaGetErrorString(err));
}

// Calls f(n0, tn, tile) for the row tiles of w, tile = Ŵ[n0 : n0 + tn, :] in one reused buffer.
template <typename F>
void for_each_row_tile(const Nf4Weight& w, const at::TensorOptions& options, F&& f) {
  if (w.rows == 0 || w.cols == 0) return;
  const int64_t tile_rows = std::min(w.rows, std::max<int64_t>(1, kTileElements / w.cols));
  at::Tensor buffer = at::empty({tile_rows * w.cols}, options);
  for (int64_t n0 = 0; n0 < w.rows; n0 += tile_rows) {
    const int64_t tn = std::min(tile_rows, w.rows - n0);
    at::Tensor tile = buffer.narrow(0, 0, tn * w.cols);
    dequantize_into(w, n0 * w.cols, tn * w.cols, tile);
    f(n0, tn, tile.view({tn, w.cols}));
  }
}

void base_forward(const at::Tensor& x, const Nf4Weight& w, at::Tensor& out) {
  if (x.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  for_each_row_tile(w, x.options(), [&](int64_t n0, int64_t tn, const at::Tensor& tile) {
    out.narrow(1, n0, tn).addmm_(x, tile.t());
  });
}

void base_backward(const at::Tensor& grad_out, const Nf4Weight& w, at::Tensor& dx) {
  if (grad_out.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(grad_out.device());
  for_each_row_tile(w, grad_out.options(), [&](int64_t n0, int64_t tn, const at::Tensor& tile) {
    dx.addmm_(grad_out.narrow(1, n0, tn), tile);
  });
}

// cuBLAS accumulates fp16 and bf16 in fp32 itself: every dtype computes in its own.
at::ScalarType accumulate_dtype(at::ScalarType dtype, int64_t /*rows*/) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, kQloraOp,
              ": x must be float32, float16 or bfloat16 on CUDA, got ", dtype);
  return dtype;
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), kQloraOp, ": ", name, " must be a CUDA tensor, got ", t.device());
}

constexpr QloraBaseKernels kBase{&base_forward, &base_backward, &accumulate_dtype};

}  // namespace

std::tuple<at::Tensor, at::Tensor> qlora_linear_fwd_cuda(const at::Tensor& x, const at::Tensor& packed,
                                                         const at::Tensor& absmax, const at::Tensor& code,
                                                         int64_t blocksize, int64_t out_features,
                                                         const std::optional<at::Tensor>& bias,
                                                         const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                         double scaling, double dropout_p, const at::Tensor& seed) {
  check_cuda(x, "x");
  return qlora_linear_fwd_gemms(x, packed, absmax, code, blocksize, out_features, bias, lora_A, lora_B, scaling,
                                dropout_p, seed, kBase, lora_dropout_kernels_cuda());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qlora_linear_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
    const at::Tensor& code, int64_t blocksize, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& xa, double scaling, double dropout_p, const at::Tensor& seed) {
  check_cuda(x, "x");
  return qlora_linear_bwd_gemms(grad_out, x, packed, absmax, code, blocksize, lora_A, lora_B, xa, scaling,
                                dropout_p, seed, kBase, lora_dropout_kernels_cuda());
}

at::Tensor nf4_dequantize_cuda(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                               int64_t blocksize, int64_t rows, int64_t cols, at::ScalarType dtype) {
  check_cuda(packed, "packed");
  const Nf4Weight w = check_nf4_weight(packed, absmax, code, blocksize, rows, cols, dtype, packed.device());
  at::Tensor out = at::empty({rows, cols}, packed.options().dtype(dtype));
  to_dtype(out, kQloraOp, "nf4_dequantize's dtype");
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(packed.device());
  dequantize_into(w, 0, out.numel(), out);
  return out;
}

}  // namespace deltakern
