"""qlora_linear through pytest-benchmark: ``pytest bench/test_qlora.py --benchmark-only``.

The same cases as ``deltakern bench --ops qlora`` (deltakern.benchmark.cases.qlora_linear): each
provider is checked against fp64 math on the dequantised weight and the same dropout mask before
it is timed. PEFT's way over bitsandbytes needs bitsandbytes installed (a test dependency).
Speed targets (README) are ratios read from one run, not asserted.
"""

import pytest
from conftest import BACKENDS, benchmark_provider, provider_cases

from deltakern.benchmark.cases.qlora_linear import DEFAULT_SHAPES, QLoraCase
from deltakern.benchmark.harness import MODES

PROVIDERS = ["frozen-linear", "dequantize-matmul", "reference", *(f"deltakern-{b}" for b in BACKENDS)]


@pytest.fixture(scope="module")
def cases():
    return provider_cases(QLoraCase, DEFAULT_SHAPES)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", DEFAULT_SHAPES, ids=str)
def test_qlora_linear(benchmark, cases, shape, provider, mode):
    case, providers = cases[shape]
    benchmark_provider(benchmark, case, providers[provider], provider, mode, f"qlora_linear {shape} {mode}")
