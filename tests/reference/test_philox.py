"""Dropout randomness: the pure-PyTorch Philox, its C++ port (philox.h) and Triton agree bit for bit."""

import pytest
import torch

from deltakern.reference.philox import dropout_keep_mask, philox4x32_10, philox_uniform

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


def _reference_block(seed: int, first_counter: int, p: float) -> torch.Tensor:
    counter = torch.arange(first_counter, first_counter + 64, dtype=torch.int64)
    words = torch.stack(philox4x32_10(seed, counter), dim=-1).reshape(-1)
    return (philox_uniform(words) >= torch.tensor(p, dtype=torch.float32)).to(torch.uint8)


def test_keep_block_variants_include_the_portable_one():
    variants = torch.ops.deltakern.keep_block_variants()
    assert variants[-1] == "portable" and set(variants) <= {"avx512", "avx2", "portable"}


@pytest.mark.parametrize("variant", ["avx512", "avx2", "portable"])
@pytest.mark.parametrize("p", [0.0, 0.05, 0.5, 0.999])
@pytest.mark.parametrize("first_counter", [0, 2**32 - 40, 2**33 + 3, 2**62 + 17])
def test_every_keep_block_variant_matches_reference(variant, p, first_counter):
    """Each SIMD variant of the CPU keep-mask block (the one the CPU picks is the fastest it runs)
    draws the reference's bits, across a carry of the counter's low word into its high word."""
    if variant not in torch.ops.deltakern.keep_block_variants():
        pytest.skip(f"this CPU cannot run the {variant} variant")
    for seed in SEEDS:
        got = torch.ops.deltakern.keep_block_bytes(seed, first_counter, p, variant)
        assert torch.equal(got, _reference_block(seed, first_counter, p))


def test_keep_block_refuses_an_unknown_variant():
    with pytest.raises(RuntimeError, match="variant 'sse9' is unknown"):
        torch.ops.deltakern.keep_block_bytes(0, 0, 0.1, "sse9")
