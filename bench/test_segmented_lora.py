"""segmented_lora_linear through pytest-benchmark: ``pytest bench/test_segmented_lora.py --benchmark-only``.

The same cases as ``deltakern bench --ops multi-lora`` (deltakern.benchmark.cases.segmented_lora_linear):
one adapter's lora_linear over all rows (the floor), PEFT's per-adapter mixed-batch loop and
deltakern's segmented op, each checked against fp64 math on the dropout masks it drew before it
is timed. Speed targets are ratios read from one run, not asserted.
"""

import pytest
from conftest import BACKENDS, benchmark_provider, provider_cases

from deltakern.benchmark.cases.segmented_lora_linear import DEFAULT_SHAPES, SegmentedLoraCase
from deltakern.benchmark.harness import MODES

PROVIDERS = ["single-adapter", "reference", *(f"deltakern-{b}" for b in BACKENDS)]


@pytest.fixture(scope="module")
def cases():
    return provider_cases(SegmentedLoraCase, DEFAULT_SHAPES)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", DEFAULT_SHAPES, ids=str)
def test_segmented_lora_linear(benchmark, cases, shape, provider, mode):
    case, providers = cases[shape]
    benchmark_provider(benchmark, case, providers[provider], provider, mode, f"segmented_lora_linear {shape} {mode}")
