"""Dropout randomness: the pure-PyTorch Philox, its C++ port (philox.h) and Triton agree bit for bit."""

import pytest
import torch

from deltakern.reference.philox import dropout_keep_mask, philox4x32_10

SEEDS = [0, 1, 1234, 2**32 + 5, 2**63 - 1]


def test_known_answer_vector():
    """Random123's Philox4x32-10 known-answer test: counter 0, key 0."""
    words = [int(w) for w in philox4x32_10(0, torch.zeros(1, dtype=torch.int64))]
    assert words == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rows, cols", [(1, 1), (7, 13), (129, 257)])
def test_cpp_port_matches_reference(rows, cols, seed, p):
    cpp = torch.ops.deltakern.dropout_keep_mask(rows, cols, p, seed)
    assert torch.equal(cpp, dropout_keep_mask(seed, rows, cols, p))


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("seed", SEEDS)
def test_triton_matches_reference(seed, p):
    from deltakern.triton_kernels.rng import dropout_keep_mask as triton_mask

    triton = triton_mask(7, 13, p, seed, device="cpu")
    assert torch.equal(triton, dropout_keep_mask(seed, 7, 13, p))


def test_cpp_and_triton_agree_on_a_large_mask():
    from deltakern.triton_kernels.rng import dropout_keep_mask as triton_mask

    cpp = torch.ops.deltakern.dropout_keep_mask(33, 1031, 0.3, 99)
    assert torch.equal(triton_mask(33, 1031, 0.3, 99, device="cpu"), cpp)


def test_keep_rate_is_one_minus_p():
    mask = torch.ops.deltakern.dropout_keep_mask(512, 1024, 0.1, 3)
    assert abs(mask.float().mean().item() - 0.9) < 0.002  # 6 sigma at n = 2**19
