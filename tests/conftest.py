"""Test setup: Triton runs under its interpreter on CPU tensors when no GPU is present.

TRITON_INTERPRET must be set before any Triton kernel is decorated, so it is set here, at
collection, before deltakern.triton_kernels is imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; its CPU twin runs here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def poison_uninitialized():
    """torch.empty (and at::empty in the extension) return NaN-filled memory while active, so an
    output element a kernel forgets to write fails the comparison."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.fixture
def one_thread():
    """torch on one thread for the test: tiny shapes, where more threads only add scheduling noise
    on the shared CPU (the prompt search tests compare losses step by step)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
