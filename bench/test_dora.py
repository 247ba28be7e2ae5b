"""dora_linear through pytest-benchmark: ``pytest bench/test_dora.py --benchmark-only``.

The same cases as ``deltakern bench --ops dora`` (deltakern.benchmark.cases.dora_linear): PEFT's
DoRA layer, its torch.compile, deltakern's lora_linear on the same layer (the floor) and
deltakern's dora_linear, each checked against fp64 math on the dropout mask it drew before it is
timed. Speed targets (DESIGN.md) are ratios read from one run, not asserted.
"""

import pytest
from conftest import BACKENDS, benchmark_provider, provider_cases

from deltakern.benchmark.cases.dora_linear import DEFAULT_SHAPES, DoraCase
from deltakern.benchmark.harness import MODES

PROVIDERS = ["lora-floor", "reference", "torch.compile", *(f"deltakern-{b}" for b in BACKENDS)]


@pytest.fixture(scope="module")
def cases():
    return provider_cases(DoraCase, DEFAULT_SHAPES)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", DEFAULT_SHAPES, ids=str)
def test_dora_linear(benchmark, cases, shape, provider, mode):
    case, providers = cases[shape]
    benchmark_provider(benchmark, case, providers[provider], provider, mode, f"dora_linear {shape} {mode}")
