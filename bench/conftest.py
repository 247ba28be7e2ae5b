"""Shared pieces of the pytest-benchmark suites: which providers run here, and one timed case."""

import torch

from deltakern.backend import availability
from deltakern.benchmark.harness import peak_bytes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton on CPU tensors is its interpreter: a correctness tool, not a contender.
BACKENDS = [
    b for b, state in availability(DEVICE).items()
    if state == "available" and b != "reference" and not (b == "triton" and DEVICE == "cpu")
]


def provider_cases(case_cls, shapes) -> dict:
    """{shape: (case, providers)}: the fp32 case of each shape on DEVICE and its providers."""
    built = {}
    for shape in shapes:
        case = case_cls(shape, torch.float32, DEVICE)
        built[shape] = (case, case.providers(BACKENDS))
    return built


def benchmark_provider(benchmark, case, fn, provider, mode, group):
    """Check ``provider`` against the reference on ``case``, then time ``mode``: 15 rounds after 2
    warm-up ones, or the case's own ``repeats`` and ``warmup`` (an end-to-end step takes seconds).
    A case with ``tokens`` (tokens per step) adds the full step's tokens per second to extra_info."""
    ok, worst = case.check(provider, fn)
    assert ok, f"{provider} differs from fp64: max scaled error {worst:.3g}"
    benchmark.group = group
    benchmark.extra_info["saved_MB"] = case.saved_bytes(fn) / 2**20
    full_step, _ = case.run_mode(provider, fn, "full")
    benchmark.extra_info["peak_MB"] = peak_bytes(full_step, case.device) / 2**20
    rounds, warmup = getattr(case, "repeats", 15), getattr(case, "warmup", 2)
    timed, setup = case.run_mode(provider, fn, mode)
    if setup is None:
        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup)
    else:
        benchmark.pedantic(timed, setup=lambda: ((setup(),), {}), rounds=rounds, warmup_rounds=warmup)
    if getattr(case, "tokens", None) and mode == "full" and benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["tokens_per_s"] = case.tokens / benchmark.stats.stats.median
