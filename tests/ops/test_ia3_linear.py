"""ia3_linear on every backend that runs here against the fp64 reference."""

import itertools
import math
import re

import pytest
import torch

import deltakern
from deltakern.benchmark.harness import saved_tensors_bytes
from deltakern.reference.ia3_linear import ia3_linear as reference_ia3_linear
from tests.compile_check import assert_compiled_step_matches_eager
from tests.tolerances import assert_backend_matches_reference

M_SIZES = (1, 7, 129)
K_SIZES = (1, 13, 96)
N_SIZES = (1, 5, 130)
MODES = {"output": False, "input": True}

# Every (M, K, N) for the C++ and reference backends; for Triton, whose interpreter is slow, each
# (M, K) once with N cycling, so every value of each is covered.
FULL_SHAPES = list(itertools.product(M_SIZES, K_SIZES, N_SIZES))
COVERING = [(m, k, N_SIZES[i % len(N_SIZES)]) for i, (m, k) in enumerate(itertools.product(M_SIZES, K_SIZES))]
GRADS = ("x", "weight", "bias", "scale")


def make_inputs(m, k, n, scale_input, bias=True, leading=(), seed=0):
    """fp64 inputs with O(1) outputs: x ``[*leading, m, k]``, weight scaled by fan-in and a scale
    vector away from ones, so a missing or doubled scale shows."""
    g = torch.Generator().manual_seed(seed)
    f = torch.float64
    return {
        "x": torch.randn(*leading, m, k, generator=g, dtype=f),
        "weight": torch.randn(n, k, generator=g, dtype=f) / math.sqrt(max(k, 1)),
        "bias": torch.randn(n, generator=g, dtype=f) if bias else None,
        "scale": 1.0 + 0.5 * torch.randn(k if scale_input else n, generator=g, dtype=f),
        "grad_out": torch.randn(*leading, m, n, generator=g, dtype=f),
    }


def run(fn, inputs, dtype, scale_input, frozen=()):
    """Output and the gradients of the tensor inputs of ``fn`` (those not in ``frozen``) on
    ``inputs`` cast to ``dtype``."""
    t = {k: (None if v is None else v.detach().to(dtype, copy=True).requires_grad_(k not in frozen))
         for k, v in inputs.items() if k != "grad_out"}
    out = fn(t["x"], t["weight"], t["bias"], t["scale"], scale_input=scale_input)
    out.backward(inputs["grad_out"].to(dtype))
    return out.detach(), {k: t[k].grad for k in GRADS if t[k] is not None and k not in frozen}


def check(backend, inputs, dtype, scale_input, frozen=()):
    assert_backend_matches_reference(backend, deltakern.ia3_linear, reference_ia3_linear, run, inputs, dtype,
                                     scale_input, frozen)


def shape_id(shape):
    return "M{}-K{}-N{}".format(*shape)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", FULL_SHAPES, ids=shape_id)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_fp32_matches_reference(backend, shape, mode, poison_uninitialized):
    check(backend, make_inputs(*shape, MODES[mode]), torch.float32, MODES[mode])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", FULL_SHAPES, ids=shape_id)
def test_cpu_bf16_matches_reference(shape, mode, poison_uninitialized):
    check("cpu", make_inputs(*shape, MODES[mode]), torch.bfloat16, MODES[mode])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(129, 96, 130), (7, 13, 5)], ids=shape_id)
def test_cpu_fp64_matches_reference(shape, mode, poison_uninitialized):
    check("cpu", make_inputs(*shape, MODES[mode]), torch.float64, MODES[mode])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", COVERING, ids=shape_id)
def test_triton_fp32_matches_reference(shape, mode, poison_uninitialized):
    check("triton", make_inputs(*shape, MODES[mode]), torch.float32, MODES[mode])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_frozen_weight_without_bias_and_3d_input(backend, mode, poison_uninitialized):
    """The usual (IA)³ call: frozen weight, gradients for x and the scale only."""
    inputs = make_inputs(7, 13, 5, MODES[mode], bias=False, leading=(3,))
    check(backend, inputs, torch.float32, MODES[mode], frozen=("weight",))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(0, 13, 5), (7, 0, 5), (7, 13, 0)], ids=shape_id)
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_empty_extents(backend, shape, mode, poison_uninitialized):
    """M = 0 gives an empty output and a zero scale gradient; K = 0 gives the (scaled) bias."""
    check(backend, make_inputs(*shape, MODES[mode]), torch.float32, MODES[mode])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_fp64(backend, mode):
    inputs = make_inputs(3, 5, 4, MODES[mode], seed=1)
    tensors = [inputs[k].requires_grad_(True) for k in GRADS]

    def fn(x, weight, bias, scale):
        return deltakern.ia3_linear(x, weight, bias, scale, scale_input=MODES[mode])

    with deltakern.use_backend(backend):
        assert torch.autograd.gradcheck(fn, tensors)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("suffix", ["", "_triton"])
def test_opcheck(suffix, mode):
    scale_input = MODES[mode]
    t = {k: v.float() for k, v in make_inputs(5, 16, 12, scale_input).items()}
    fwd = getattr(torch.ops.deltakern, f"ia3_linear_fwd{suffix}").default
    bwd = getattr(torch.ops.deltakern, f"ia3_linear_bwd{suffix}").default
    leaves = [t[k].clone().requires_grad_(True) for k in ("x", "weight", "bias", "scale")]
    torch.library.opcheck(fwd, (*leaves, scale_input))
    torch.library.opcheck(fwd, (t["x"], t["weight"], None, t["scale"], scale_input))
    _, z = fwd(t["x"], t["weight"], t["bias"], t["scale"], scale_input)
    torch.library.opcheck(bwd, (t["grad_out"], t["x"] if scale_input else z, t["weight"], t["scale"], scale_input))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_saves_what_the_scale_multiplied(backend, mode):
    """With a frozen weight, backward keeps x for an input scale (the caller's tensor) and the
    unscaled projection [M, out] for an output scale, and nothing else of activation size."""
    scale_input = MODES[mode]
    t = {k: (None if v is None else v.float()) for k, v in make_inputs(32, 96, 40, scale_input).items()}
    x, scale = t["x"].requires_grad_(True), t["scale"].requires_grad_(True)
    weights = (t["weight"], t["bias"], scale)
    with deltakern.use_backend(backend):
        saved = saved_tensors_bytes(
            lambda: deltakern.ia3_linear(x, t["weight"], t["bias"], scale, scale_input=scale_input), exclude=weights)
    assert saved == (x.nbytes if scale_input else 32 * 40 * 4)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_torch_compile_fullgraph(backend, mode):
    inputs = make_inputs(7, 13, 5, MODES[mode])

    def step(x, weight, bias, scale):
        return deltakern.ia3_linear(x, weight, bias, scale, scale_input=MODES[mode]).square().sum()

    assert_compiled_step_matches_eager(step, [inputs[k] for k in GRADS], backend)


def test_backend_dtype_error():
    half = [None if v is None else v.half() for k, v in make_inputs(3, 5, 2, False).items() if k != "grad_out"]
    with deltakern.use_backend("cpu"), pytest.raises(
            ValueError, match=r"deltakern\.ia3_linear: backend 'cpu' computes in float32, bfloat16, float64; got torch.float16"):
        deltakern.ia3_linear(*half)


@pytest.mark.parametrize(
    "change, kwargs, message",
    [
        (lambda i: i.update(weight=i["weight"][:, :4]), {}, "x has 5 input features, weight [out, in] expects in=4"),
        (lambda i: i.update(bias=i["bias"][:1]), {}, "bias must be [out=2], got (1,)"),
        (lambda i: i.update(scale=i["scale"][:1]), {}, "an output scale must be [out=2], got (1,)"),
        (lambda i: None, {"scale_input": True}, "an input scale must be [in=5], got (2,)"),
        (lambda i: i.update(scale=i["scale"][None]), {}, "scale must be 1-D, got shape (1, 2)"),
        (lambda i: i.update(scale=i["scale"].float()), {}, "scale has dtype torch.float32, expected torch.float64 like x"),
        (lambda i: i.update(x=i["x"].long()), {}, "x must be a floating-point tensor, got torch.int64"),
        (lambda i: None, {"scale_input": 1}, "scale_input must be a bool, got 1"),
    ],
    ids=["weight", "bias", "scale_out", "scale_in", "scale_rank", "dtype", "int_x", "scale_input"],
)
def test_bad_inputs_name_the_argument(change, kwargs, message):
    inputs = make_inputs(3, 5, 2, False)
    change(inputs)
    with pytest.raises(ValueError, match=r"deltakern\.ia3_linear: " + re.escape(message)):
        deltakern.ia3_linear(inputs["x"], inputs["weight"], inputs["bias"], inputs["scale"], **kwargs)
