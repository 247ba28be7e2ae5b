"""adapter through pytest-benchmark: ``pytest bench/test_adapter.py --benchmark-only``.

The same cases as ``deltakern bench --ops adapter``: the eager reference as adapter libraries run
it (Linear, activation, Linear, scale, residual add), torch.compile of it and each deltakern
backend, each checked against fp64 before it is timed; bytes saved and peak memory go in the
benchmark's extra_info. Speed targets (README) are ratios read from one run, not asserted.
"""

import pytest
from conftest import BACKENDS, benchmark_provider, provider_cases

from deltakern.benchmark.cases.adapter import DEFAULT_SHAPES, AdapterCase
from deltakern.benchmark.harness import MODES

PROVIDERS = ["reference", "torch.compile", *(f"deltakern-{b}" for b in BACKENDS)]


@pytest.fixture(scope="module")
def cases():
    return provider_cases(AdapterCase, DEFAULT_SHAPES)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", DEFAULT_SHAPES, ids=str)
def test_adapter(benchmark, cases, shape, provider, mode):
    case, providers = cases[shape]
    benchmark_provider(benchmark, case, providers[provider], provider, mode, f"adapter {shape} {mode}")
