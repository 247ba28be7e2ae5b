"""Where an e2e step's time goes: torch.profiler over 3 training steps of the floor, deltakern's
and the reference's model of one method at the default CPU shape, self CPU time grouped by op
category (GEMMs split by whether a dimension is the LoRA rank 16). Self CPU time sums the threads
and includes the profiler's overhead: read the categories as proportions, not as step times.

    python bench/profile_e2e.py [METHOD]      (default lora; any e2e method name)
"""

from __future__ import annotations

import collections
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from deltakern.benchmark import e2e

STEPS = 3
GEMMS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul"}
LAYOUT = {"aten::copy_", "aten::clone", "aten::contiguous", "aten::empty", "aten::empty_strided", "aten::empty_like",
          "aten::zeros", "aten::zero_", "aten::fill_", "aten::cat", "aten::stack", "aten::to", "aten::_to_copy", "aten::t",
          "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::_unsafe_view", "aten::transpose",
          "aten::permute", "aten::expand", "aten::as_strided", "aten::select", "aten::slice", "aten::narrow",
          "aten::split", "aten::chunk", "aten::squeeze", "aten::unsqueeze", "aten::flatten", "aten::unflatten",
          "aten::detach", "aten::alias", "aten::resize_", "aten::new_empty", "aten::new_zeros", "aten::lift_fresh",
          "aten::index_select", "aten::embedding", "aten::set_"}


def category(name: str, dims: set[int]) -> str:
    if name in GEMMS:
        return "GEMM low-rank (a dimension of r=16)" if 16 in dims else "GEMM base/head"
    if name.startswith("deltakern"):
        return "deltakern op self (Philox, fused elementwise)"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if "_foreach" in name or "adam" in name.lower():
        return "optimizer"
    if "bernoulli" in name or "dropout" in name or "rand" in name:
        return "dropout RNG (torch)"
    if "log_softmax" in name or "nll_loss" in name or "cross_entropy" in name:
        return "loss"
    if name in LAYOUT:
        return "copies/views/allocs"
    return "elementwise/norm/other aten" if name.startswith("aten::") else "autograd/python/other"


def main(method: str) -> None:
    shape = next(s for s in e2e.E2E_DEFAULT_SHAPES["cpu"] if s.method == method)
    case = e2e.E2ECase(shape, torch.float32, "cpu")
    providers = case.providers(["cpu"])
    for name in ("floor", "deltakern-cpu", "reference"):
        step, _ = case.run_mode(name, providers[name], "full")
        for _ in range(2):  # warm-up
            step()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(STEPS):
                step()
        times = collections.Counter()
        for event in prof.key_averages(group_by_input_shape=True):
            dims = {d for shape in (event.input_shapes or []) if isinstance(shape, (list, tuple)) for d in shape}
            times[category(event.key, dims)] += event.self_cpu_time_total / STEPS / 1e3
        print(f"== {method} {name}: {sum(times.values()):.1f} ms self CPU per step")
        for label, ms in times.most_common():
            print(f"   {label:<48} {ms:8.1f} ms")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "lora")
