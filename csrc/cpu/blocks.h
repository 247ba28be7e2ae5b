// Pieces of the CPU kernels that cut a problem into blocks of rows, each processed by one
// thread while it is in cache:
//   brgemm           a GEMM on raw row-major blocks through oneDNN's brgemm microkernel,
//                    single-threaded, for calls from inside a parallel region
//   block_view       a raw row-major block as a tensor, for ATen's GEMM on it
//   transpose_into   a block transposed into a buffer (brgemm multiplies untransposed operands)
//   for_each_share   a range cut into `tasks` contiguous shares, run in parallel
//   for_each_block   the blocks of a range, in order (the row-tiling loop)
//   PartialSums      column sums over rows: one fp64 partial per task, added up in task order
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace deltakern {

// C[M, N] = (accumulate ? C : 0) + A[M, K] B[K, N] on row-major blocks given by raw pointers and
// leading dimensions: at::native::cpublas::brgemm (oneDNN's AVX-512 / AMX microkernel, MKL's GEMM
// where oneDNN's ukernel is unavailable), on the calling thread. fp32 A and B; or bf16 A and B
// with B in oneDNN's VNNI layout ([K / 2, N, 2]: the rows of a pair interleaved, K even, ldb = N).
// C is fp32 either way.
template <typename in_t>
inline void brgemm(int64_t M, int64_t N, int64_t K, const in_t* A, int64_t lda, const in_t* B, int64_t ldb,
                   float* C, int64_t ldc, bool accumulate) {
  static_assert(std::is_same_v<in_t, float> || std::is_same_v<in_t, c10::BFloat16>, "fp32 or bf16 operands");
  // oneDNN cannot set up a microkernel for an empty extent (std::bad_alloc at d = 0).
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    }
    return;
  }
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C,
                              /*is_vnni=*/std::is_same_v<in_t, c10::BFloat16>);
}

// The [rows, cols] block at data with row stride ld, as a tensor that does not own it.
template <typename scalar_t>
at::Tensor block_view(const scalar_t* data, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<scalar_t*>(data), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value));
}

// dst[cols, rows] (contiguous) = src[rows, cols]ᵀ (row stride ld_src), converted to dst_t.
template <typename src_t, typename dst_t>
void transpose_into(const src_t* src, int64_t rows, int64_t cols, int64_t ld_src, dst_t* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[c * rows + r] = static_cast<dst_t>(src[r * ld_src + c]);
  }
}

// Calls f(task, begin, end) for the `tasks` contiguous shares [n t / tasks, n (t + 1) / tasks)
// of [0, n), in parallel. The split depends only on n and tasks, so results are reproducible
// run to run at a given task count.
template <typename F>
void for_each_share(int64_t n, int64_t tasks, F&& f) {
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    // OpenMP workers do not inherit the caller's dispatch state: keep the ATen calls of f below
    // autograd, as the calling thread is (weights that require grad would be refused).
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t t = begin; t < end; ++t) f(t, n * t / tasks, n * (t + 1) / tasks);
  });
}

// Calls f(start, count) for the blocks [start, start + count) of `block` elements that cut
// [begin, end), in order; the last one is shorter when block does not divide end - begin.
template <typename F>
inline void for_each_block(int64_t begin, int64_t end, int64_t block, F&& f) {
  for (int64_t start = begin; start < end; start += block) f(start, std::min(block, end - start));
}

// Column sums over rows [M, n], one partial of n fp64 values per task (of for_each_share: each
// task sums its own rows into of(task)), added up in task order: reproducible run to run at a
// given task count. NOTE fp64 rather than fp32 running sums: with fp32 (in blocks of 64 rows),
// a bias gradient of one column came out 3 to 13 times eager PyTorch's error (whose sum is
// pairwise) in 3 of 160 fp32 cases at M = 1000 and 2053; in fp64 none is above twice it, and the
// sums still take no measurable time next to the GEMMs.
class PartialSums {
 public:
  PartialSums(int64_t tasks, int64_t n) : tasks_(tasks), n_(n), partial_(tasks * n, 0.0) {}

  double* of(int64_t task) { return partial_.data() + task * n_; }

  // scale · Σ over tasks, as a new [n] tensor of dtype `options`.
  at::Tensor sum(const at::TensorOptions& options, double scale = 1.0) const {
    at::Tensor total = at::zeros({n_}, options.dtype(at::kDouble));
    double* out = total.data_ptr<double>();
    for (int64_t t = 0; t < tasks_; ++t) {
      for (int64_t j = 0; j < n_; ++j) out[j] += partial_[t * n_ + j];
    }
    if (scale != 1.0) {
      for (int64_t j = 0; j < n_; ++j) out[j] *= scale;
    }
    return total.to(options.dtype());
  }

 private:
  int64_t tasks_, n_;
  std::vector<double> partial_;
};

}  // namespace deltakern
