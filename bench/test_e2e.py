"""The end-to-end fine-tuning step through pytest-benchmark: ``pytest bench/test_e2e.py --benchmark-only``.

The same cases as ``deltakern bench --ops e2e`` (deltakern.benchmark.e2e): a Llama-style model built from a
config, fine-tuned by LoRA, prefix tuning, Houlsby adapters, prompt tuning, P-tuning or BitFit, the
PEFT way (or the eager adapter / BitFit reference) against deltakern's. Each provider's loss and
delta gradients are checked against the reference before timing; bytes saved, peak memory and
tokens per second go in extra_info.
"""

import pytest
from conftest import BACKENDS, DEVICE, benchmark_provider, provider_cases

from deltakern.benchmark.e2e import E2E_DEFAULT_SHAPES, E2ECase
from deltakern.benchmark.harness import MODES

SHAPES = E2E_DEFAULT_SHAPES[DEVICE]
# torch.compile of the reference model only on CUDA: E2ECase.providers explains the CPU cost.
PROVIDERS = ["reference", *(["torch.compile"] if DEVICE == "cuda" else []), *(f"deltakern-{b}" for b in BACKENDS)]


@pytest.fixture(scope="module")
def cases():
    return provider_cases(E2ECase, SHAPES)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_e2e(benchmark, cases, shape, provider, mode):
    case, providers = cases[shape]
    benchmark_provider(benchmark, case, providers[provider], provider, mode, f"e2e {shape} {mode}")
