"""The activation table: deltakern/activations.py is the one list of names, and the other
implementations follow it code for code."""

import pytest
import torch
import triton
import triton.language as tl

from deltakern import _native
from deltakern.activations import ACTIVATIONS, CODES, activation_fn
from deltakern.triton_kernels import adapter as triton_adapter
from tests.tolerances import assert_close


def test_cpp_activation_names_follow_the_python_table():
    """csrc/include/deltakern/activations.h's names, exported as deltakern._C.activations (a tuple
    of str in code order), are ACTIVATIONS."""
    if _native.C is None:
        pytest.skip(f"the C++ half needs the native extension: {_native.LOAD_ERROR}")
    assert _native.C.activations == ACTIVATIONS


# Triton: the adapter kernels compare their ACTIVATION constexpr with constants of
# triton_kernels/adapter.py (run under TRITON_INTERPRET=1 here, see tests/conftest.py).


@triton.jit
def _activation_kernel(x_ptr, y_ptr, dydx_ptr, n, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    """y = act(x), dydx = act'(x) with the adapter kernels' own activation functions."""
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    tl.store(y_ptr + offs, triton_adapter._act(x, ACTIVATION), mask=ok)
    tl.store(dydx_ptr + offs, triton_adapter._act_grad(x, ACTIVATION), mask=ok)


def _triton_activation(x: torch.Tensor, code: int) -> tuple[torch.Tensor, torch.Tensor]:
    y, dydx = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    _activation_kernel[(1,)](x, y, dydx, x.numel(), ACTIVATION=code, BLOCK=triton.next_power_of_2(x.numel()))
    return y, dydx


def test_triton_activation_codes_follow_the_python_table():
    """One constexpr per name of ACTIVATIONS in triton_kernels/adapter.py (RELU, GELU_TANH, ...),
    holding its code."""
    assert {name: getattr(triton_adapter, name.upper()).value for name in ACTIVATIONS} == CODES


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_triton_activation_of_each_code_is_its_named_function(name):
    """The Triton activation and its derivative at code CODES[name] against activation_fn(name)
    in fp64, over values on both sides of the kernels' tanh switch (|x| = 0.625)."""
    generator = torch.Generator().manual_seed(CODES[name])
    x = torch.randn(257, generator=generator) * 3.0
    y, dydx = _triton_activation(x, CODES[name])
    x64 = x.double().requires_grad_()
    expected = activation_fn(name)(x64)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x64)
    assert_close(y, expected.detach(), name=name)
    assert_close(dydx, expected_grad, name=f"{name}'")


def test_triton_activation_rejects_a_code_outside_the_table():
    with pytest.raises(Exception, match="not a code of deltakern.activations"):
        _triton_activation(torch.randn(16), len(ACTIVATIONS))
