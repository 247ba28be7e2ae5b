"""prefix_attention through pytest-benchmark: ``pytest bench/test_prefix_attention.py --benchmark-only``.

The same cases as ``deltakern bench --ops prefix``: PEFT's way (prefix expanded and concatenated,
dense mask, SDPA), SDPA over the input alone (a lower bound ignoring the prefix), torch.compile of
PEFT's way and each deltakern backend, each checked against the fp64 reference before timing.
"""

import pytest
from conftest import BACKENDS, benchmark_provider, provider_cases

from deltakern.benchmark.cases.prefix_attention import DEFAULT_SHAPES, PrefixCase
from deltakern.benchmark.harness import MODES

PROVIDERS = ["sdpa-no-prefix", "reference", "torch.compile", *(f"deltakern-{b}" for b in BACKENDS)]


@pytest.fixture(scope="module")
def cases():
    return provider_cases(PrefixCase, DEFAULT_SHAPES)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", DEFAULT_SHAPES, ids=str)
def test_prefix_attention(benchmark, cases, shape, provider, mode):
    case, providers = cases[shape]
    benchmark_provider(benchmark, case, providers[provider], provider, mode, f"prefix_attention {shape} {mode}")
