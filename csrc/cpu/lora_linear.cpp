// CPU kernels of the LoRA dropout parts: a fused dropout-shrink and the one-pass dropout
// backward, and lora_linear's CPU entry points: the device-neutral decomposition
// (csrc/lora_linear.cpp), whose large GEMMs stay in ATen, with these dropout kernels.
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "blocks.h"
#include "keep_mask.h"
#include "lora_linear.h"

namespace deltakern {

namespace {

// Rows of x dropped into a thread-local buffer per low-rank GEMM call: about 512 KiB of it (128
// rows of 1024 fp32), which stays in L2 between the masking pass and the GEMM that reads it back.
// Fewer, larger calls matter more than the cache here: each MKL call of [rows, K] x [K, 16] costs
// a fixed few microseconds. Against 32-row blocks, lora_linear's step (forward and backward) at
// M=2048, 1024², r=16, p=0.1 went from 1.15-1.22x the frozen linear to 1.08-1.13x, and the seven
// projections of the e2e decoder layer (M=1024, K=512 and 1376, p=0.05) from 1.18-1.29x to
// 1.13-1.26x (interleaved medians of 22 repeats, noisy 2-core machine); 256-512 rows were no
// better than 128, and 2048 worse.
constexpr int64_t kBlockBytes = 512 << 10;
int64_t block_rows(int64_t K, int64_t element_size) {
  return std::clamp<int64_t>(kBlockBytes / std::max<int64_t>(K * element_size, 1), 32, 512);
}
// Rows per parallel task: both threads get work at M >= 64.
constexpr int64_t kRowGrain = 32;
// Elements per task of the element-wise passes.
constexpr int64_t kMaskGrain = 1 << 15;

// LoraDropoutKernels::shrink.
void dropout_shrink(const at::Tensor& x, const at::Tensor& lora_A, double dropout_p, int64_t seed, at::Tensor& xa) {
  const int64_t M = x.size(0), K = x.size(1);
  const at::Tensor lora_A_t = lora_A.t();
  const float p32 = static_cast<float>(dropout_p);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "lora_dropout_shrink_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t keep_scale = static_cast<opmath_t>(1.0 / (1.0 - dropout_p));
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    const int64_t rows_per_block = block_rows(K, sizeof(scalar_t));
    at::parallel_for(0, M, kRowGrain, [&](int64_t row_begin, int64_t row_end) {
      // OpenMP workers do not inherit the caller's dispatch state: keep the ATen calls below
      // autograd, as the calling thread is (weights that require grad would be refused).
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      at::Tensor dropped = at::empty({std::min(rows_per_block, row_end - row_begin), K}, x.options());
      scalar_t* out = dropped.data_ptr<scalar_t>();
      for_each_block(row_begin, row_end, rows_per_block, [&](int64_t row, int64_t rows) {
        const scalar_t* in = x_data + row * K;
        for_each_keep_run(seed, p32, row * K, (row + rows) * K, [&](int64_t offset, int64_t n, const uint8_t* keep) {
          scale_kept(in + offset, keep, n, keep_scale, out + offset);
        });
        at::Tensor xa_rows = xa.narrow(0, row, rows);
        at::mm_out(xa_rows, dropped.narrow(0, 0, rows), lora_A_t);
      });
    });
  });
}

// LoraDropoutKernels::lowrank_backward, in row blocks that stay in cache.
void dropout_lowrank_backward(const at::Tensor& x, const at::Tensor& dxa, const at::Tensor& lora_A, double dropout_p,
                              int64_t seed, at::Tensor& dx, at::Tensor& d_lora_A) {
  const int64_t M = x.size(0), K = x.size(1), R = lora_A.size(0);
  const float p32 = static_cast<float>(dropout_p);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "lora_dropout_lowrank_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto opmath = x.options().dtype(c10::CppTypeToScalarType<opmath_t>::value);
    const opmath_t keep_scale = static_cast<opmath_t>(1.0 / (1.0 - dropout_p));
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    // One dA partial per thread, summed at the end: the row blocks of drop(x) never leave the
    // cache and no [M, K] temporary exists. Measured at M=2048, K=N=1024, r=16, dropout_p=0.1 (whole
    // backward, interleaved medians): 31.0 ms, against 34.9 ms for the unfused version (one
    // GEMM for dxa A, a mask pass writing drop(x) to memory, one GEMM over it). Rows per block:
    // block_rows.
    at::Tensor partials = at::zeros({at::get_num_threads(), R, K}, opmath);
    const int64_t rows_per_block = block_rows(K, sizeof(opmath_t));
    at::parallel_for(0, M, kRowGrain, [&](int64_t row_begin, int64_t row_end) {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in the shrink
      at::Tensor partial = partials[at::get_thread_num()];
      at::Tensor dropped = at::empty({std::min(rows_per_block, row_end - row_begin), K}, opmath);
      opmath_t* dropped_data = dropped.data_ptr<opmath_t>();
      for_each_block(row_begin, row_end, rows_per_block, [&](int64_t row, int64_t rows) {
        at::Tensor dx_rows = dx.narrow(0, row, rows);
        const at::Tensor dxa_rows = dxa.narrow(0, row, rows);
        at::mm_out(dx_rows, dxa_rows, lora_A);
        scalar_t* dx_data = dx_rows.data_ptr<scalar_t>();
        const scalar_t* in = x_data + row * K;
        for_each_keep_run(seed, p32, row * K, (row + rows) * K, [&](int64_t offset, int64_t n, const uint8_t* keep) {
          scale_kept(dx_data + offset, keep, n, keep_scale, dx_data + offset);
          scale_kept(in + offset, keep, n, keep_scale, dropped_data + offset);
        });
        partial.addmm_(dxa_rows.t().to(opmath), dropped.narrow(0, 0, rows));
      });
    });
    d_lora_A.copy_(partials.sum(0));
  });
}

constexpr LoraDropoutKernels kDropout{&dropout_shrink, &dropout_lowrank_backward};

}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias,
                                                       const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                       double scaling, double dropout_p, const at::Tensor& seed) {
  return lora_linear_fwd_gemms(x, weight.size(0), bias, lora_A, lora_B, scaling, dropout_p, seed,
                               dense_base_gemms(weight), kDropout);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scaling, double dropout_p, const at::Tensor& seed) {
  return lora_linear_bwd_gemms(grad_out, x, lora_A, lora_B, xa, scaling, dropout_p, seed, dense_base_gemms(weight),
                               kDropout);
}

const LoraDropoutKernels& lora_dropout_kernels_cpu() { return kDropout; }

at::Tensor dropout_keep_mask_cpu(int64_t rows, int64_t cols, double dropout_p, int64_t seed) {
  TORCH_CHECK(rows >= 0 && cols >= 0, "deltakern.dropout_keep_mask: rows and cols must be >= 0");
  at::Tensor mask = at::empty({rows, cols}, at::TensorOptions().dtype(at::kBool));
  bool* data = mask.data_ptr<bool>();
  const float p32 = static_cast<float>(dropout_p);
  at::parallel_for(0, rows * cols, kMaskGrain, [&](int64_t begin, int64_t end) {
    for_each_keep_run(seed, p32, begin, end, [&](int64_t offset, int64_t n, const uint8_t* keep) {
      std::copy(keep, keep + n, data + begin + offset);
    });
  });
  return mask;
}

at::Tensor keep_block_bytes_cpu(int64_t seed, int64_t first_counter, double p, const std::string& variant) {
  TORCH_CHECK(seed >= 0 && first_counter >= 0, "deltakern.keep_block_bytes: seed and first_counter must be >= 0");
  KeepBlockFn block;
  try {
    block = keep_block_variant(variant);
  } catch (const std::invalid_argument& error) {
    TORCH_CHECK(false, error.what());
  }
  at::Tensor keep = at::empty({kKeepBlockElements}, at::TensorOptions().dtype(at::kByte));
  block(static_cast<uint64_t>(seed), static_cast<uint64_t>(first_counter),
        dropout_threshold(static_cast<float>(p)), keep.data_ptr<uint8_t>());
  return keep;
}

}  // namespace deltakern
