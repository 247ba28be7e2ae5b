// The checks of the adapter op's arguments that hold on every device: shapes, one dtype and
// device, contiguity and the activation code. The CPU and CUDA entry points call them first and
// then check the dtypes their kernels take.
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

#include "adapter.h"
#include "deltakern/activations.h"

namespace deltakern {
namespace {

constexpr const char* kOp = "deltakern.adapter";

void check_same(const at::Tensor& t, const at::Tensor& h, const char* name) {
  TORCH_CHECK(t.scalar_type() == h.scalar_type(), kOp, ": ", name, " must have h's dtype ",
              h.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == h.device(), kOp, ": ", name, " must be on h's device ", h.device(), ", got ",
              t.device());
  TORCH_CHECK(t.is_contiguous(), kOp, ": ", name, " must be contiguous");
}

void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name, const char* dims) {
  TORCH_CHECK(t.sizes() == expected, kOp, ": ", name, " must be ", dims, " = ", expected, ", got ", t.sizes());
}

// "relu, gelu, ...": the names of kActivationNames.
std::string activation_names() {
  std::string names;
  for (const char* name : kActivationNames) {
    if (!names.empty()) names += ", ";
    names += name;
  }
  return names;
}

void check_activation(int64_t activation) {
  TORCH_CHECK(is_activation_code(activation), kOp, ": activation code must be in [0, ", kNumActivations, ") (",
              activation_names(), "), got ", activation);
}

// h [M, d] and w_down [r, d] with r >= 1, which every other shape follows; returns (M, d, r).
std::tuple<int64_t, int64_t, int64_t> check_h_and_w_down(const at::Tensor& h, const at::Tensor& w_down) {
  TORCH_CHECK(h.dim() == 2, kOp, ": h must be 2-D [M, d], got ", h.sizes());
  TORCH_CHECK(w_down.dim() == 2 && w_down.size(1) == h.size(1), kOp, ": w_down must be [r, d] with d = ",
              h.size(1), ", got ", w_down.sizes());
  const int64_t M = h.size(0), d = h.size(1), r = w_down.size(0);
  TORCH_CHECK(r > 0, kOp, ": w_down must have r >= 1 rows, got ", w_down.sizes());
  return {M, d, r};
}

}  // namespace

void check_adapter_fwd_args(const at::Tensor& h, const at::Tensor& w_down, const std::optional<at::Tensor>& b_down,
                            const at::Tensor& w_up, const std::optional<at::Tensor>& b_up,
                            const std::optional<at::Tensor>& residual, int64_t activation) {
  const auto [M, d, r] = check_h_and_w_down(h, w_down);
  check_shape(w_up, {d, r}, "w_up", "[d, r]");
  check_same(h, h, "h");
  check_same(w_down, h, "w_down");
  check_same(w_up, h, "w_up");
  if (b_down.has_value()) {
    check_shape(*b_down, {r}, "b_down", "[r]");
    check_same(*b_down, h, "b_down");
  }
  if (b_up.has_value()) {
    check_shape(*b_up, {d}, "b_up", "[d]");
    check_same(*b_up, h, "b_up");
  }
  if (residual.has_value()) {
    check_shape(*residual, {M, d}, "residual", "[M, d]");
    check_same(*residual, h, "residual");
  }
  check_activation(activation);
}

void check_adapter_bwd_args(const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& w_down,
                            const at::Tensor& w_up, const at::Tensor& pre, int64_t activation) {
  const auto [M, d, r] = check_h_and_w_down(h, w_down);
  check_shape(grad_out, {M, d}, "grad_out", "[M, d]");
  check_shape(w_up, {d, r}, "w_up", "[d, r]");
  check_shape(pre, {M, r}, "pre", "[M, r]");
  check_same(h, h, "h");
  check_same(grad_out, h, "grad_out");
  check_same(w_down, h, "w_down");
  check_same(w_up, h, "w_up");
  check_same(pre, h, "pre");
  check_activation(activation);
}

}  // namespace deltakern
