"""ia3_linear through pytest-benchmark: ``pytest bench/test_ia3.py --benchmark-only``.

The same cases as ``deltakern bench --ops ia3``: the frozen linear alone (the floor), PEFT's eager
way (the linear, then the scale as a pass of its own, or the scaled input into the linear),
torch.compile of it and each deltakern backend, each checked against fp64 before it is timed;
bytes saved and peak memory go in the benchmark's extra_info. Speed targets (README) are ratios
read from one run, not asserted.
"""

import pytest
from conftest import BACKENDS, benchmark_provider, provider_cases

from deltakern.benchmark.cases.ia3_linear import DEFAULT_SHAPES, Ia3Case
from deltakern.benchmark.harness import MODES

PROVIDERS = ["frozen-linear", "reference", "torch.compile", *(f"deltakern-{b}" for b in BACKENDS)]


@pytest.fixture(scope="module")
def cases():
    return provider_cases(Ia3Case, DEFAULT_SHAPES)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", DEFAULT_SHAPES, ids=str)
def test_ia3(benchmark, cases, shape, provider, mode):
    case, providers = cases[shape]
    benchmark_provider(benchmark, case, providers[provider], provider, mode, f"ia3 {shape} {mode}")
