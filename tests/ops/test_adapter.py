"""adapter on every backend that runs here against the fp64 reference."""

import itertools
import math
import re

import pytest
import torch

import deltakern
from deltakern.benchmark.harness import saved_tensors_bytes
from deltakern.activations import ACTIVATIONS
from deltakern.reference.adapter import adapter as reference_adapter
from tests.compile_check import assert_compiled_step_matches_eager
from tests.tolerances import assert_backend_matches_reference

M_SIZES = (1, 7, 129)
D_SIZES = (13, 96, 257)
RANKS = (1, 8, 64)
RESIDUALS = ("h", "separate")

# Every (M, d, r) for the C++ and reference backends, each with every activation and both
# residuals; for Triton, whose interpreter is slow, each (M, d) once with r and the activation
# cycling so every value of each is covered.
FULL_SHAPES = list(itertools.product(M_SIZES, D_SIZES, RANKS))
COVERING = [
    (m, d, RANKS[i % len(RANKS)], ACTIVATIONS[i % len(ACTIVATIONS)], RESIDUALS[i % 2])
    for i, (m, d) in enumerate(itertools.product(M_SIZES, D_SIZES))
]
GRADS = ("h", "w_down", "b_down", "w_up", "b_up", "residual")


def make_inputs(m, d, r, residual="h", bias=True, leading=(), seed=0):
    """fp64 inputs with O(1) activations: h ``[*leading, m, d]`` and weights scaled by fan-in."""
    g = torch.Generator().manual_seed(seed)
    f = torch.float64
    shape = (*leading, m, d)
    return {
        "h": torch.randn(shape, generator=g, dtype=f),
        "w_down": torch.randn(r, d, generator=g, dtype=f) / math.sqrt(max(d, 1)),
        "b_down": torch.randn(r, generator=g, dtype=f) if bias else None,
        "w_up": torch.randn(d, r, generator=g, dtype=f) / math.sqrt(r),
        "b_up": torch.randn(d, generator=g, dtype=f) if bias else None,
        "residual": torch.randn(shape, generator=g, dtype=f) if residual == "separate" else None,
        "grad_out": torch.randn(shape, generator=g, dtype=f),
    }


def run(fn, inputs, dtype, activation, scaling=0.7):
    """Output and the gradients of every tensor input of ``fn`` on ``inputs`` cast to ``dtype``."""
    t = {k: (None if v is None else v.detach().to(dtype, copy=True).requires_grad_(True)) for k, v in inputs.items() if k != "grad_out"}
    out = fn(t["h"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], activation=activation, scaling=scaling, residual=t["residual"])
    out.backward(inputs["grad_out"].to(dtype))
    return out.detach(), {k: t[k].grad for k in GRADS if t[k] is not None}


def check(backend, inputs, dtype, activation):
    assert_backend_matches_reference(backend, deltakern.adapter, reference_adapter, run, inputs, dtype, activation)


def shape_id(shape):
    return "M{}-d{}-r{}".format(*shape)


@pytest.mark.parametrize("residual", RESIDUALS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", FULL_SHAPES, ids=shape_id)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_fp32_matches_reference(backend, shape, activation, residual, poison_uninitialized):
    check(backend, make_inputs(*shape, residual=residual), torch.float32, activation)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", FULL_SHAPES, ids=shape_id)
def test_cpu_bf16_matches_reference(shape, activation, poison_uninitialized):
    check("cpu", make_inputs(*shape, residual="separate" if shape[2] == 8 else "h"), torch.bfloat16, activation)


@pytest.mark.parametrize("m, d, r, activation, residual", COVERING, ids=lambda v: str(v))
def test_triton_fp32_matches_reference(m, d, r, activation, residual, poison_uninitialized):
    check("triton", make_inputs(m, d, r, residual=residual), torch.float32, activation)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_without_biases_and_3d_input(backend, poison_uninitialized):
    check(backend, make_inputs(7, 96, 8, residual="separate", bias=False, leading=(3,)), torch.float32, "gelu")


@pytest.mark.parametrize("shape", [(0, 13, 4), (7, 0, 4)], ids=shape_id)
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_empty_extents(backend, shape, poison_uninitialized):
    """No rows: empty output and zero weight gradients. d = 0: empty output and weight
    gradients, and the bottleneck's bias gradient zero (nothing flows into it)."""
    check(backend, make_inputs(*shape, residual="separate", leading=(2,)), torch.float32, "gelu")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_fp64(backend, activation):
    inputs = make_inputs(3, 5, 2, residual="separate", seed=1)
    tensors = [inputs[k].requires_grad_(True) for k in GRADS]

    def fn(h, w_down, b_down, w_up, b_up, residual):
        return deltakern.adapter(h, w_down, b_down, w_up, b_up, activation=activation, scaling=0.7, residual=residual)

    with deltakern.use_backend(backend):
        assert torch.autograd.gradcheck(fn, tensors)


@pytest.mark.parametrize("suffix", ["", "_triton"])
def test_opcheck(suffix):
    inputs = make_inputs(5, 16, 16, residual="separate")
    t = {k: v.float() for k, v in inputs.items()}
    fwd = getattr(torch.ops.deltakern, f"adapter_fwd{suffix}").default
    bwd = getattr(torch.ops.deltakern, f"adapter_bwd{suffix}").default
    leaves = [t[k].clone().requires_grad_(True) for k in ("h", "w_down", "b_down", "w_up", "b_up", "residual")]
    torch.library.opcheck(fwd, (*leaves, ACTIVATIONS.index("gelu"), 0.7))
    torch.library.opcheck(fwd, (t["h"], t["w_down"], None, t["w_up"], None, None, ACTIVATIONS.index("silu"), 0.7))
    _, pre = fwd(t["h"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], None, ACTIVATIONS.index("gelu"), 0.7)
    torch.library.opcheck(bwd, (t["grad_out"], t["h"], t["w_down"], t["w_up"], pre, ACTIVATIONS.index("gelu"), 0.7, True))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_saves_h_and_the_preactivation(backend):
    """Saved for backward, besides the weights (by reference): h itself and pre [M, r]."""
    inputs = make_inputs(32, 96, 8)
    t = {k: (None if v is None else v.float().requires_grad_(True)) for k, v in inputs.items()}
    weights = (t["w_down"], t["b_down"], t["w_up"], t["b_up"])
    with deltakern.use_backend(backend):
        saved = saved_tensors_bytes(lambda: deltakern.adapter(t["h"], *weights, activation="gelu"), exclude=weights)
    assert saved == t["h"].nbytes + 32 * 8 * 4


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_torch_compile_fullgraph(backend):
    inputs = make_inputs(7, 13, 8, residual="separate")

    def step(h, w_down, b_down, w_up, b_up, residual):
        return deltakern.adapter(h, w_down, b_down, w_up, b_up, activation="silu", residual=residual).square().sum()

    assert_compiled_step_matches_eager(step, [inputs[k] for k in GRADS], backend)


def test_backend_dtype_error():
    inputs = make_inputs(3, 5, 2)
    half = [None if inputs[k] is None else inputs[k].half() for k in ("h", "w_down", "b_down", "w_up", "b_up")]
    with deltakern.use_backend("cpu"), pytest.raises(
            ValueError, match=r"deltakern\.adapter: backend 'cpu' computes in float32, bfloat16, float64; got torch.float16"):
        deltakern.adapter(*half)


@pytest.mark.parametrize(
    "change, kwargs, message",
    [
        (lambda i: i.update(w_down=i["w_down"][:, :4]), {}, "w_down must be [r, d=5] for h [..., d=5], got (2, 4)"),
        (lambda i: i.update(w_up=i["w_up"][:4]), {}, "w_up must be [d=5, r=2], got (4, 2)"),
        (lambda i: i.update(b_down=i["b_down"][:1]), {}, "b_down must be [r=2], got (1,)"),
        (lambda i: i.update(b_up=i["b_up"][:4]), {}, "b_up must be [d=5], got (4,)"),
        (lambda i: i.update(residual=i["h"][:2]), {}, "residual must have h's shape (3, 5), got (2, 5)"),
        (lambda i: i.update(w_up=i["w_up"].float()), {}, "w_up has dtype torch.float32, expected torch.float64 like h"),
        (lambda i: i.update(w_down=i["w_down"][:0], w_up=i["w_up"][:, :0], b_down=None), {}, "w_down has r=0 rows"),
        (lambda i: None, {"activation": "gelu_new"}, "unknown activation 'gelu_new'; expected one of relu, gelu, gelu_tanh, silu, tanh"),
        (lambda i: None, {"scaling": float("inf")}, "scaling must be a finite number, got inf"),
    ],
    ids=["w_down", "w_up", "b_down", "b_up", "residual", "dtype", "rank0", "activation", "scaling"],
)
def test_bad_inputs_name_the_argument(change, kwargs, message):
    inputs = make_inputs(3, 5, 2)
    inputs["residual"] = inputs["h"].clone()
    change(inputs)
    with pytest.raises(ValueError, match=r"deltakern\.adapter: " + re.escape(message)):
        deltakern.adapter(inputs["h"], inputs["w_down"], inputs["b_down"], inputs["w_up"], inputs["b_up"],
                          residual=inputs["residual"], **kwargs)
