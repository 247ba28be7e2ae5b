"""lora_linear through pytest-benchmark: ``pytest bench/test_lora.py --benchmark-only``.

The same cases as ``deltakern bench`` (deltakern.benchmark.cases.lora_linear): each provider is checked against
fp64 math on the same dropout mask before it is timed, and its bytes saved for backward go in
the benchmark's extra_info. Speed targets (README) are ratios read from one run, not asserted.
"""

import pytest
from conftest import BACKENDS, benchmark_provider, provider_cases

from deltakern.benchmark.cases.lora_linear import DEFAULT_SHAPES, LoraCase
from deltakern.benchmark.harness import MODES

PROVIDERS = ["frozen-linear", "reference", "torch.compile", *(f"deltakern-{b}" for b in BACKENDS)]


@pytest.fixture(scope="module")
def cases():
    return provider_cases(LoraCase, DEFAULT_SHAPES)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", DEFAULT_SHAPES, ids=str)
def test_lora_linear(benchmark, cases, shape, provider, mode):
    case, providers = cases[shape]
    benchmark_provider(benchmark, case, providers[provider], provider, mode, f"lora_linear {shape} {mode}")
