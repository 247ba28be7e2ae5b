"""The comparison helpers bite: tests/tolerances.assert_close (every dtype) and the benchmark's
check_close reject an output of zeros, the output of the neighbouring row, and the output under a
dropout mask one Philox lane off, while accepting the kernel's own result; and the low-precision
floor is relative (a bf16 output whose values are all small is not passed as zeros)."""

import pytest
import torch

import deltakern
from deltakern.benchmark.harness import CHECK_TOLERANCES, check_close
from deltakern.reference.philox import dropout_keep_mask
from tests.tolerances import LOWP_FACTOR, LOWP_FLOOR_ULPS, assert_close

SEED, P = 4242, 0.3
M, K, N, R = 33, 96, 40, 8


def _inputs(scale: float):
    g = torch.Generator().manual_seed(7)
    d = torch.float64
    return (torch.randn(M, K, generator=g, dtype=d), torch.randn(N, K, generator=g, dtype=d) / K**0.5 * scale,
            torch.randn(N, generator=g, dtype=d) * scale, torch.randn(R, K, generator=g, dtype=d) / K**0.5,
            torch.randn(N, R, generator=g, dtype=d) / R**0.5 * scale)


def _lora(x, w, b, a, bb, keep):
    """LoRA with the given keep mask, in x's dtype."""
    dropped = x * keep.to(x.dtype) / (1.0 - P)
    return torch.nn.functional.linear(x, w, b) + 2.0 * torch.nn.functional.linear(torch.nn.functional.linear(dropped, a), bb)


def _cases(dtype, scale):
    """(the kernel's output, the fp64 expectation, eager in dtype, the wrong outputs by name)."""
    x, w, b, a, bb = _inputs(scale)
    keep = dropout_keep_mask(SEED, M, K, P)
    shifted = dropout_keep_mask(SEED, M, K + 1, P).reshape(-1)[1 : M * K + 1].reshape(M, K)  # one lane on
    assert (shifted != keep).any()
    expected = _lora(x, w, b, a, bb, keep)
    low = [t.to(dtype) for t in (x, w, b, a, bb)]
    backend = "cpu" if dtype != torch.float16 else "reference"  # the CPU backend has no fp16
    with deltakern.use_backend(backend):
        kernel = deltakern.lora_linear(*low, 2.0, P, seed=SEED)
    eager = _lora(*low, keep) if dtype in (torch.bfloat16, torch.float16) else None
    wrong = {"zeros": torch.zeros_like(kernel), "neighbouring row": kernel.roll(1, dims=0),
             "mask one lane off": _lora(*low, shifted)}
    return kernel, expected, eager, wrong


@pytest.mark.parametrize("scale", [1.0, 1e-3], ids=["unit", "small"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_assert_close_accepts_the_kernel_and_rejects_wrong_outputs(dtype, scale):
    kernel, expected, eager, wrong = _cases(dtype, scale)
    assert_close(kernel, expected, eager, name="kernel")
    for name, output in wrong.items():
        with pytest.raises(AssertionError):
            assert_close(output, expected, eager, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_benchmark_check_accepts_the_kernel_and_rejects_wrong_outputs(dtype):
    """At the magnitudes the benchmark cases produce (values of order 1)."""
    kernel, expected, _, wrong = _cases(dtype, 1.0)
    atol, rtol = CHECK_TOLERANCES[dtype]
    assert check_close({"out": kernel}, {"out": expected}, atol, rtol)[0]
    for name, output in wrong.items():
        assert not check_close({"out": output}, {"out": expected}, atol, rtol)[0], name


def test_lowp_floor_is_relative():
    """A bf16 output of magnitude 1e-3 whose eager error is ~0 gets a floor of a few ulps of 1e-3,
    not of 1: zeros fail."""
    expected = torch.full((4, 4), 1e-3, dtype=torch.float64)
    exact = expected.to(torch.bfloat16)
    bound = LOWP_FACTOR * (exact.double() - expected).abs().max().item() + \
        LOWP_FLOOR_ULPS * torch.finfo(torch.bfloat16).eps * 1e-3
    assert bound < 1e-4
    assert_close(exact, expected, exact, name="exact")
    with pytest.raises(AssertionError, match="bfloat16 error"):
        assert_close(torch.zeros_like(exact), expected, exact, name="zeros")


def test_bench_judges_low_precision_against_the_reference_error():
    """In bf16 a provider beyond the fixed tolerance passes only within twice the reference's own
    scaled error; in fp32 the fixed tolerance alone decides."""
    from deltakern.benchmark.harness import _judge_checks

    errors = {"frozen-linear": (True, 0.2), "reference": (False, 2.5), "deltakern-cpu": (False, 4.9),
              "deltakern-triton": (False, 5.1)}
    judged = _judge_checks(errors, torch.bfloat16)
    assert {p: ok for p, (ok, _) in judged.items()} == {"frozen-linear": True, "reference": True,
                                                          "deltakern-cpu": True, "deltakern-triton": False}
    assert "reference 2.5; bound 5" in judged["deltakern-triton"][1]
    assert {p: ok for p, (ok, _) in _judge_checks(errors, torch.float32).items()} == {
        "frozen-linear": True, "reference": False, "deltakern-cpu": False, "deltakern-triton": False}
    # A reference that is not finite gives no bound.
    assert not _judge_checks({"reference": (False, float("nan")), "deltakern-cpu": (False, 1.5)},
                             torch.bfloat16)["deltakern-cpu"][0]
