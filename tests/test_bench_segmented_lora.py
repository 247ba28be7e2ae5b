"""The segmented_lora_linear benchmark case (deltakern/benchmark/cases/segmented_lora_linear.py):
every provider passes its check against fp64 math, and the check is able to fail (a wrong adapter
or another dropout mask is caught)."""

from __future__ import annotations

import functools

import pytest
import torch

from deltakern.benchmark.cases.segmented_lora_linear import QUICK_SHAPES, SegmentedLoraCase, SegmentedLoraShape

SHAPES = (*QUICK_SHAPES, SegmentedLoraShape(256, 64, 48, 4, 3, 0.0))


@functools.cache
def _case(shape) -> SegmentedLoraCase:
    return SegmentedLoraCase(shape, torch.float32, "cpu")


@pytest.fixture(params=SHAPES, ids=str)
def case(request):
    return _case(request.param)


def test_every_provider_passes_its_check(case):
    providers = case.providers(["reference", "cpu"])
    assert list(providers) == ["single-adapter", "reference", "deltakern-reference", "deltakern-cpu"]
    for name, fn in providers.items():
        ok, worst = case.check(name, fn)
        assert ok, f"{name}: worst scaled error {worst:.3g}"


def test_rows_follow_sequences_round_robin(case):
    s = case.shape
    assert case.segments.offsets[-1] == s.m
    assert case.adapter_index[:128].eq(0).all() and case.adapter_index[128:256].eq(1 % s.adapters).all()


def test_check_catches_a_swapped_adapter(case):
    """The PEFT loop with two adapters' B swapped fails its check."""
    assert case.shape.adapters >= 2
    B = case.lora_B
    swapped = [B[1], B[0], *B[2:]]

    def wrong(x):
        F = torch.nn.functional
        result = F.linear(x, case.weight, case.bias)
        for rows, a, b, s in zip(case.rows, case.lora_A, swapped, case.scalings):
            result[rows] += F.linear(F.linear(case.dropout(x[rows]), a), b) * s
        return result

    ok, _ = case.check("reference", wrong)
    assert not ok


def test_check_catches_another_mask():
    """deltakern's provider run with another seed than the check replays fails it."""
    case = _case(QUICK_SHAPES[0])
    assert case.shape.dropout_p > 0
    ok, _ = case.check("reference", lambda x: case.deltakern("cpu", seed=1)(x))
    assert not ok
