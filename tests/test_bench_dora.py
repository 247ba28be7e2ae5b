"""The dora_linear benchmark case (deltakern/benchmark/cases/dora_linear.py): every provider passes
its check against fp64, and the check is able to fail: its fp64 PEFT copy on a fixed mask is
DoRA's math on that mask, the mask it replays is the one PEFT's dropout drew, and the floor is
held to LoRA's math, not DoRA's."""

from __future__ import annotations

import functools

import pytest
import torch

from deltakern.benchmark.cases.dora_linear import QUICK_SHAPES, DoraCase
from deltakern.benchmark.harness import CHECK_TOLERANCES, check_close
from deltakern.reference.dora_linear import dora_linear as reference_dora_linear
from deltakern.reference.philox import dropout_keep_mask

SEED = 97531


@functools.cache
def _case(shape) -> DoraCase:
    return DoraCase(shape, torch.float32, "cpu")


@pytest.fixture(params=QUICK_SHAPES, ids=str)
def case(request):
    return _case(request.param)


def test_quick_shapes_cover_both_peft_branches():
    """PEFT's DoRA forward has a dropout branch and a base-result branch: the quick run takes both."""
    assert sorted(s.dropout_p for s in QUICK_SHAPES) == [0.0, 0.1]


def test_every_provider_passes_its_check(case):
    providers = case.providers(["reference", "cpu"], with_compile=False)
    assert list(providers) == ["lora-floor", "reference", "deltakern-reference", "deltakern-cpu"]
    for name, fn in providers.items():
        ok, worst = case.check(name, fn)
        # fp32 against fp64: well inside the allowed error (1.0); measured at most 0.14.
        assert ok and worst < 0.3, (name, worst)
        assert all(p.grad is None for p in case.params(name)), name  # the check leaves no gradient behind


def test_fp64_peft_copy_on_a_philox_mask_is_the_dora_reference(case):
    """The expectation of the deltakern providers (PEFT's layer in fp64, its dropout replaced by
    deltakern's Philox mask) equals deltakern's reference dora_linear of that seed, a separate
    formula; another seed gives another output when dropout is on."""
    s = case.shape
    keep = dropout_keep_mask(SEED, s.m, s.in_features, s.dropout_p) if s.dropout_p else None
    expected = case._dora_expected64(keep)
    leaves = [t.detach().double().requires_grad_(True) for t in (case.x, case.lora_A, case.lora_B, case.magnitude)]
    out = reference_dora_linear(leaves[0], case.weight.double(), case.bias.double(), leaves[1], leaves[2], leaves[3],
                                case.scaling, s.dropout_p, SEED)
    out.backward(case.grad_out.double())
    ours = {"out": out.detach(), **{f"d{i}": t.grad for i, t in enumerate(leaves)}}
    for name, value in ours.items():
        torch.testing.assert_close(value, expected[name], atol=1e-10, rtol=1e-10, msg=name)
    if s.dropout_p:
        other = case._dora_expected64(dropout_keep_mask(SEED + 1, s.m, s.in_features, s.dropout_p))
        assert (other["out"] - expected["out"]).abs().max() > 0.1


@pytest.mark.parametrize("shape", [s for s in QUICK_SHAPES if s.dropout_p], ids=str)
def test_the_replayed_mask_is_the_one_peft_drew(shape):
    """PEFT's output after ``manual_seed`` matches fp64 on the check's replayed mask, and fails
    on a mask of another seed."""
    case = _case(shape)
    s = case.shape
    torch.manual_seed(SEED)
    out = case.peft_layer(case.x).detach()
    for seed, should_match in ((SEED, True), (SEED + 1, False)):
        torch.manual_seed(seed)
        keep = torch.nn.functional.dropout(torch.ones_like(case.x), s.dropout_p) != 0
        ok, worst = check_close({"out": out}, {"out": case._dora_expected64(keep)["out"]}, *CHECK_TOLERANCES[case.dtype])
        assert ok == should_match, (seed, worst)


def test_the_check_fails_a_wrong_result(case):
    """A DoRA output off by 1% fails; the floor, held to LoRA's math, would fail DoRA's."""
    wrong = lambda x: case.peft_layer(x) * 1.01
    ok, worst = case.check("reference", wrong)
    assert not ok and worst > 1.0
    keep = dropout_keep_mask(SEED, case.shape.m, case.shape.in_features, case.shape.dropout_p) if case.shape.dropout_p else None
    lora, dora = case._lora_expected64(keep)["out"], case._dora_expected64(keep)["out"]
    ok, worst = check_close({"out": lora}, {"out": dora}, *CHECK_TOLERANCES[case.dtype])
    assert not ok and worst > 10.0, worst  # the magnitude's scale (1 ± 20%) matters
