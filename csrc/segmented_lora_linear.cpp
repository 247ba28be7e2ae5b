// segmented_lora_linear forward and backward as one device-neutral decomposition: the base GEMM
// over all rows and every per-adapter GEMM go through ATen (MKL/oneDNN on CPU, cuBLAS on CUDA),
// the dropout parts through lora_linear's fused kernels (an adapter's gathered rows are one
// lora_linear input, so its mask is lora_linear's for seeds[i]), the row gathers/scatters
// through the device's SegmentRowKernels.
//
// An adapter whose rows form one contiguous range (a batch of whole sequences per adapter, the
// common case) skips the gather and scatter: its GEMMs read and write slices of x, dY, out and
// dx in place. That is decided on the host, so only for a CPU `order`; on CUDA reading `order`
// would cost a device sync per adapter and layer, and the gather runs instead.
//
// Inputs arrive 2-D and validated by deltakern/ops/segmented_lora_linear.py; the checks here
// only guard direct calls of torch.ops.deltakern.*.
#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "segmented_lora_linear.h"

namespace deltakern {
namespace {

constexpr const char* kOp = "deltakern.segmented_lora_linear";

void check_segments(const at::Tensor& x, at::TensorList lora_A, at::TensorList lora_B, at::ArrayRef<double> scalings,
                    at::ArrayRef<double> dropout_p, const at::Tensor& order, at::IntArrayRef offsets,
                    const at::Tensor& seeds) {
  const size_t n = lora_A.size();
  TORCH_CHECK(x.dim() == 2, kOp, ": x must be 2-D, got ", x.dim(), "-D");
  TORCH_CHECK(n >= 1 && lora_B.size() == n && scalings.size() == n && dropout_p.size() == n &&
                  offsets.size() == n + 1,
              kOp, ": lora_A, lora_B, scalings, dropout_p need one entry per adapter and offsets n + 1, got ", n,
              ", ", lora_B.size(), ", ", scalings.size(), ", ", dropout_p.size(), ", ", offsets.size());
  TORCH_CHECK(order.dim() == 1 && order.scalar_type() == at::kLong && order.device() == x.device(), kOp,
              ": order must be a 1-D int64 tensor on x's device");
  TORCH_CHECK(offsets[0] == 0 && offsets[n] == order.size(0), kOp, ": offsets must run from 0 to order's length ",
              order.size(0));
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(offsets[i] <= offsets[i + 1], kOp, ": offsets must not decrease");
  }
  TORCH_CHECK(seeds.device().is_cpu() && seeds.scalar_type() == at::kLong && seeds.numel() == static_cast<int64_t>(n),
              kOp, ": seeds must be an int64 CPU tensor with one seed per adapter");
}

// The first row of segment [begin, begin + count) of order when its rows are first, first + 1,
// ..., first + count - 1 (a slice serves for the gather), else -1; always -1 for a device order.
int64_t contiguous_first_row(const at::Tensor& order, int64_t begin, int64_t count) {
  if (!order.device().is_cpu()) return -1;
  const int64_t* rows = order.data_ptr<int64_t>() + begin;
  for (int64_t j = 1; j < count; ++j) {
    if (rows[j] != rows[0] + j) return -1;
  }
  return rows[0];
}

// contiguous_first_row of every adapter's segment (-1 for an empty one).
std::vector<int64_t> contiguous_first_rows(const at::Tensor& order, at::IntArrayRef offsets) {
  std::vector<int64_t> first_rows(offsets.size() - 1);
  for (size_t i = 0; i + 1 < offsets.size(); ++i) {
    const int64_t count = offsets[i + 1] - offsets[i];
    first_rows[i] = count > 0 ? contiguous_first_row(order, offsets[i], count) : -1;
  }
  return first_rows;
}

// The rows of `src` [M, C] that segment [begin, begin + count) of order names, as [count, C]:
// a slice when they are contiguous, else a gathered copy.
at::Tensor segment_rows(const at::Tensor& src, const at::Tensor& order, int64_t begin, int64_t count,
                        int64_t first_row, const SegmentRowKernels& rows) {
  if (first_row >= 0) return src.narrow(0, first_row, count);
  at::Tensor dst = at::empty({count, src.size(1)}, src.options());
  rows.gather(src, order.narrow(0, begin, count), dst);
  return dst;
}

// f(first, count) for every range of rows [0, M) outside the contiguous segments (those whose
// first_rows[i] >= 0 covers rows first_rows[i] .. first_rows[i] + M_i - 1): the rows of no adapter
// and of gathered segments.
template <typename F>
void for_each_uncovered_range(const std::vector<int64_t>& first_rows, at::IntArrayRef offsets, int64_t M, F&& f) {
  std::vector<std::pair<int64_t, int64_t>> covered;
  for (size_t i = 0; i < first_rows.size(); ++i) {
    if (first_rows[i] >= 0) covered.emplace_back(first_rows[i], first_rows[i] + offsets[i + 1] - offsets[i]);
  }
  std::sort(covered.begin(), covered.end());
  int64_t next = 0;
  for (const auto& [first, end] : covered) {
    if (first > next) f(next, first - next);
    next = end;
  }
  if (next < M) f(next, M - next);
}

}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>> segmented_lora_linear_fwd_gemms(
    const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::TensorList lora_A, at::TensorList lora_B, at::ArrayRef<double> scalings, at::ArrayRef<double> dropout_p,
    const at::Tensor& order_in, at::IntArrayRef offsets, const at::Tensor& seeds, const LoraDropoutKernels& dropout,
    const SegmentRowKernels& rows) {
  check_segments(x_in, lora_A, lora_B, scalings, dropout_p, order_in, offsets, seeds);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor order = order_in.contiguous();
  const size_t n = lora_A.size();
  // out starts as b + s_i xa_i B_iᵀ, then the base GEMM adds x Wᵀ with beta = 1 (lora_linear's
  // order: the GEMM reads each output tile as it writes it, no second pass over out). A
  // contiguous segment writes its rows in place; the other rows start as b (or 0) and the
  // gathered segments scatter-add onto them.
  const std::vector<int64_t> first_rows = contiguous_first_rows(order, offsets);
  at::Tensor out = at::empty({x.size(0), weight.size(0)}, x.options());
  for_each_uncovered_range(first_rows, offsets, x.size(0), [&](int64_t first, int64_t count) {
    at::Tensor rows_out = out.narrow(0, first, count);
    if (bias.has_value()) {
      rows_out.copy_(bias->expand_as(rows_out));
    } else {
      rows_out.zero_();
    }
  });
  std::vector<at::Tensor> xa;
  xa.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const int64_t begin = offsets[i], count = offsets[i + 1] - offsets[i];
    const at::Tensor lora_A_i = lora_A[i].contiguous();
    if (count == 0) {
      xa.push_back(at::empty({0, lora_A_i.size(0)}, x.options()));
      continue;
    }
    const int64_t first_row = first_rows[i];
    const at::Tensor x_i = segment_rows(x, order, begin, count, first_row, rows);
    at::Tensor xa_i;
    if (dropout_p[i] > 0.0) {
      xa_i = at::empty({count, lora_A_i.size(0)}, x.options());
      dropout.shrink(x_i, lora_A_i, dropout_p[i], seeds.data_ptr<int64_t>()[i], xa_i);
    } else {
      xa_i = at::mm(x_i, lora_A_i.t());
    }
    if (first_row >= 0) {
      at::Tensor rows_out = out.narrow(0, first_row, count);
      if (bias.has_value()) {
        at::addmm_out(rows_out, *bias, xa_i, lora_B[i].t(), /*beta=*/1.0, /*alpha=*/scalings[i]);
      } else {
        rows_out.addmm_(xa_i, lora_B[i].t(), /*beta=*/0.0, /*alpha=*/scalings[i]);
      }
    } else {
      rows.scatter_add(at::mm(xa_i, lora_B[i].t()), order.narrow(0, begin, count), scalings[i], out);
    }
    xa.push_back(std::move(xa_i));
  }
  out.addmm_(x, weight.t());
  return {out, xa};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> segmented_lora_linear_bwd_gemms(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& weight, at::TensorList lora_A,
    at::TensorList lora_B, at::TensorList xa, at::ArrayRef<double> scalings, at::ArrayRef<double> dropout_p,
    const at::Tensor& order_in, at::IntArrayRef offsets, const at::Tensor& seeds, const LoraDropoutKernels& dropout,
    const SegmentRowKernels& rows) {
  check_segments(x_in, lora_A, lora_B, scalings, dropout_p, order_in, offsets, seeds);
  TORCH_CHECK(xa.size() == lora_A.size(), kOp, ": xa needs one entry per adapter");
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor order = order_in.contiguous();
  const size_t n = lora_A.size();
  // dx starts as the low-rank terms, then the base GEMM adds dY W with beta = 1 (lora_linear's
  // order): a contiguous segment's dropout kernel writes its rows of dx in place, with no
  // temporary and no second pass. Rows outside every contiguous segment (rows of no adapter, of
  // gathered segments) are zeroed first; gathered segments scatter-add onto them.
  const std::vector<int64_t> first_rows = contiguous_first_rows(order, offsets);
  at::Tensor dx = at::empty_like(x);
  for_each_uncovered_range(first_rows, offsets, x.size(0),
                           [&](int64_t first, int64_t count) { dx.narrow(0, first, count).zero_(); });

  std::vector<at::Tensor> d_lora_A, d_lora_B;
  d_lora_A.reserve(n);
  d_lora_B.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const int64_t begin = offsets[i], count = offsets[i + 1] - offsets[i];
    if (count == 0) {
      d_lora_A.push_back(at::zeros(lora_A[i].sizes(), lora_A[i].options()));
      d_lora_B.push_back(at::zeros(lora_B[i].sizes(), lora_B[i].options()));
      continue;
    }
    const at::Tensor lora_A_i = lora_A[i].contiguous();
    const int64_t first_row = first_rows[i];
    const at::Tensor grad_out_i = segment_rows(grad_out, order, begin, count, first_row, rows);
    const at::Tensor x_i = segment_rows(x, order, begin, count, first_row, rows);
    at::Tensor dxa = at::mm(grad_out_i, lora_B[i]).mul_(scalings[i]);
    // dB as (xaᵀ dY)ᵀ, the orientation lora_linear measured faster in MKL.
    d_lora_B.push_back(at::mm(xa[i].t(), grad_out_i).mul_(scalings[i]).t().contiguous());
    at::Tensor dx_i = first_row >= 0 ? dx.narrow(0, first_row, count) : at::empty_like(x_i);
    at::Tensor dA;
    if (dropout_p[i] > 0.0) {
      dA = at::empty(lora_A_i.sizes(), lora_A_i.options());
      dropout.lowrank_backward(x_i, dxa, lora_A_i, dropout_p[i], seeds.data_ptr<int64_t>()[i], dx_i, dA);
    } else {
      dA = at::mm(dxa.t(), x_i);
      at::mm_out(dx_i, dxa, lora_A_i);
    }
    if (first_row < 0) rows.scatter_add(dx_i, order.narrow(0, begin, count), 1.0, dx);
    d_lora_A.push_back(std::move(dA));
  }
  dx.addmm_(grad_out, weight);
  return {dx, d_lora_A, d_lora_B};
}

}  // namespace deltakern
