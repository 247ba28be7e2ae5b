"""lora_linear through pytest-benchmark: ``pytest bench/test_lora.py --benchmark-only``.

The same cases as ``deltakern bench`` (deltakern.benchmark): each provider is checked against
fp64 math on the same dropout mask before it is timed, and its bytes saved for backward go in
the benchmark's extra_info. Speed targets (README) are ratios read from one run, not asserted.
"""

import pytest
import torch

from deltakern.backend import availability
from deltakern.benchmark import LORA_DEFAULT_SHAPES, MODES, LoraCase

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [
    b for b, state in availability(DEVICE).items()
    if state == "available" and b != "reference" and not (b == "triton" and DEVICE == "cpu")
]
PROVIDERS = ["frozen-linear", "reference", "torch.compile", *(f"deltakern-{b}" for b in BACKENDS)]


@pytest.fixture(scope="module")
def cases():
    built = {}
    for shape in LORA_DEFAULT_SHAPES:
        case = LoraCase(shape, torch.float32, DEVICE)
        built[shape] = (case, case.providers(BACKENDS))
    return built


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", LORA_DEFAULT_SHAPES, ids=str)
def test_lora_linear(benchmark, cases, shape, provider, mode):
    case, providers = cases[shape]
    fn = providers[provider]
    ok, worst = case.check(provider, fn)
    assert ok, f"{provider} differs from fp64 on the same mask: max scaled error {worst:.3g}"
    benchmark.group = f"lora_linear {shape} {mode}"
    benchmark.extra_info["saved_MB"] = case.saved_bytes(fn) / 2**20
    timed, setup = case.run_mode(provider, fn, mode)
    if setup is None:
        benchmark.pedantic(timed, rounds=15, warmup_rounds=2)
    else:
        benchmark.pedantic(timed, setup=lambda: ((setup(),), {}), rounds=15, warmup_rounds=2)
