"""dora_linear on every backend against the fp64 reference and against PEFT's DoRA layer; the norm
identity and its cache; what backward saves; the memory it never takes (no [out, in] tensor);
its errors."""

from __future__ import annotations

import math
import re

import pytest
import torch

import deltakern
from deltakern.ops.dora_linear import (
    RowSqNormCache,
    dora_weight_norm,
    weight_row_sqnorm,
)
from deltakern.reference.dora_linear import dora_linear as reference_dora_linear
from deltakern.reference.dora_linear import dora_weight_norm as reference_weight_norm
from deltakern.reference.lora_linear import dropout as reference_dropout
from tests.allocations import largest_allocation
from tests.compile_check import assert_compiled_step_matches_eager
from tests.tolerances import assert_backend_matches_reference

SEED = 2468
GRADS = ("x", "lora_A", "lora_B", "magnitude")
# (M, in, out, r): M = 1, prime sizes, r = 1, non-multiples of every block size.
SHAPES = [(1, 13, 7, 1), (7, 96, 13, 8), (129, 33, 65, 16), (5, 257, 1, 4)]


def make_inputs(m, k, n, r, bias=True, seed=0):
    """fp64 inputs; the magnitude is the norm of W + s·B A times 1 ± 20% (PEFT starts it at the
    norm, training moves it), so the scale m / n is never 1."""
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    w = torch.randn(n, k, generator=g, dtype=d) / math.sqrt(k)
    a = torch.randn(r, k, generator=g, dtype=d) / math.sqrt(k)
    b = torch.randn(n, r, generator=g, dtype=d) / math.sqrt(r)
    norm = reference_weight_norm(w, a, b, 1.5)
    return {
        "x": torch.randn(m, k, generator=g, dtype=d),
        "weight": w,
        "bias": torch.randn(n, generator=g, dtype=d) if bias else None,
        "lora_A": a,
        "lora_B": b,
        "magnitude": norm * (1.0 + 0.2 * torch.randn(n, generator=g, dtype=d)),
        "grad_out": torch.randn(m, n, generator=g, dtype=d),
    }


def run(fn, inputs, dtype, scaling, dropout_p, grad_names=GRADS):
    t = {k: (None if v is None else v.detach().to(dtype, copy=True)) for k, v in inputs.items()}
    for name in grad_names:
        t[name].requires_grad_(True)
    out = fn(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["magnitude"], scaling, dropout_p, SEED)
    out.backward(t["grad_out"])
    return out.detach(), {name: t[name].grad for name in grad_names}


def shape_id(shape):
    return "M{}-in{}-out{}-r{}".format(*shape)


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_fp32_matches_reference(backend, shape, dropout_p, poison_uninitialized):
    assert_backend_matches_reference(backend, deltakern.dora_linear, reference_dora_linear, run,
                                     make_inputs(*shape, bias=shape[0] != 7), torch.float32, 1.5, dropout_p)


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_fp64_matches_reference(backend, dropout_p):
    """All gradients in fp64 (gradcheck below cannot take W, A and B: the norm they move is a
    constant for autograd)."""
    assert_backend_matches_reference(backend, deltakern.dora_linear, reference_dora_linear, run,
                                     make_inputs(7, 96, 13, 8), torch.float64, 1.5, dropout_p,
                                     ("x", "weight", "bias", "lora_A", "lora_B", "magnitude"))


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bf16_matches_reference(backend, shape, dropout_p, poison_uninitialized):
    assert_backend_matches_reference(backend, deltakern.dora_linear, reference_dora_linear, run,
                                     make_inputs(*shape), torch.bfloat16, 1.5, dropout_p)


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_weight_and_bias_gradients_when_trainable(backend, dropout_p):
    assert_backend_matches_reference(backend, deltakern.dora_linear, reference_dora_linear, run,
                                     make_inputs(7, 96, 13, 8), torch.float32, 1.5, dropout_p,
                                     ("x", "weight", "bias", "lora_A", "lora_B", "magnitude"))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_frozen_magnitude_gets_no_gradient_and_the_rest_still_does(backend):
    assert_backend_matches_reference(backend, deltakern.dora_linear, reference_dora_linear, run,
                                     make_inputs(7, 96, 13, 8), torch.float32, 1.5, 0.1, ("x", "lora_A", "lora_B"))


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_fp64(backend, dropout_p):
    i = make_inputs(5, 7, 6, 3)
    leaves = [i[k].requires_grad_() for k in ("x", "weight", "bias", "lora_A", "lora_B", "magnitude")]

    def fn(x, w, b, a, bb, m):
        return deltakern.dora_linear(x, w, b, a, bb, m, 0.5, dropout_p, seed=SEED)

    with deltakern.use_backend(backend):
        # The norm is a constant for autograd (PEFT detaches it): gradcheck's numerical Jacobian
        # would see it move with W, A and B, so those are checked with the norm held fixed below.
        assert torch.autograd.gradcheck(lambda x, b, m: fn(x, leaves[1], b, leaves[3], leaves[4], m),
                                        (leaves[0], leaves[2], leaves[5]))


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_dropout_mask_is_the_reference_mask(backend, dropout_p):
    """Same seed, same mask on every backend; another seed gives another output."""
    inputs = make_inputs(9, 96, 13, 8)
    with deltakern.use_backend(backend):
        out, grads = run(deltakern.dora_linear, inputs, torch.float32, 2.0, 0.5)
    with deltakern.use_backend("reference"):
        ref, ref_grads = run(deltakern.dora_linear, inputs, torch.float32, 2.0, 0.5)
        no_dropout, _ = run(deltakern.dora_linear, inputs, torch.float32, 2.0, 0.0)
    assert (ref - no_dropout).abs().max() > 0.1  # the mask matters at this p
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-5)


def test_without_dropout_the_two_formulas_agree():
    """PEFT's two forms (scaled sum without dropout, corrected base with it) are one function
    when the mask keeps everything: a p so small that nothing drops gives the p = 0 output."""
    inputs = make_inputs(7, 96, 13, 8)
    tiny = 1e-9
    x = reference_dropout(inputs["x"], tiny, SEED)
    assert torch.equal(x, inputs["x"] / (1 - tiny))
    out0, _ = run(reference_dora_linear, inputs, torch.float64, 1.5, 0.0)
    out_tiny, _ = run(reference_dora_linear, inputs, torch.float64, 1.5, tiny)
    torch.testing.assert_close(out_tiny, out0, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_m_zero_rows(backend):
    i = make_inputs(1, 13, 7, 2)
    x = torch.zeros(2, 0, 13)
    with deltakern.use_backend(backend):
        y = deltakern.dora_linear(x, *(i[k].float() for k in ("weight", "bias", "lora_A", "lora_B", "magnitude")), 1.0)
    assert y.shape == (2, 0, 7)


def test_leading_dims_and_transposed_weight():
    """x [B, L, in] and a Conv1D-style weight stored [in, out], passed as its transposed view."""
    i = make_inputs(6, 33, 17, 4)
    x = i["x"].float().reshape(2, 3, 33)
    stored = i["weight"].float().t().contiguous()  # [in, out]
    args = (i["bias"].float(), i["lora_A"].float(), i["lora_B"].float(), i["magnitude"].float(), 1.5)
    expected = reference_dora_linear(x, stored.t().contiguous(), *args)
    for backend in ("cpu", "triton"):
        with deltakern.use_backend(backend):
            got = deltakern.dora_linear(x, stored.t(), *args)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_torch_compile_fullgraph(backend, dropout_p):
    """One graph, eager's loss and gradients, W trainable too (its dropout term reads the seed
    tensor without .item())."""
    i = make_inputs(7, 33, 13, 4)
    tensors = [i[k] for k in ("x", "weight", "bias", "lora_A", "lora_B", "magnitude")]

    def step(x, w, b, a, bb, m):
        return deltakern.dora_linear(x, w, b, a, bb, m, 1.5, dropout_p, seed=SEED).square().sum()

    assert_compiled_step_matches_eager(step, tensors, backend)


def test_inductor_compiles_the_trainable_weight_dropout_gradient():
    """Inductor traces the backward jointly: the weight's dropout term must not read the seed with
    .item() (a data-dependent guard there fails the compile)."""
    i = make_inputs(7, 33, 13, 4)
    leaves = [i[k].float().requires_grad_(True) for k in ("x", "weight", "lora_A", "lora_B", "magnitude")]
    x, w, a, bb, m = leaves
    loss = deltakern.dora_linear(x, w, None, a, bb, m, 1.5, 0.1, seed=SEED).square().sum()
    loss.backward()
    eager = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    compiled = torch.compile(lambda *t: deltakern.dora_linear(t[0], t[1], None, *t[2:], 1.5, 0.1, seed=SEED)
                             .square().sum(), fullgraph=True)
    compiled(*leaves).backward()
    for name, got, want in zip(("x", "weight", "lora_A", "lora_B", "magnitude"), (t.grad for t in leaves), eager):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda msg, name=name: f"d{name}: {msg}")


# ------------------------------------------------------------------------------------------------
# Against PEFT's DoRA layer (the real thing)
# ------------------------------------------------------------------------------------------------


class _PhiloxDropout(torch.nn.Module):
    """PEFT's dropout module replaced by deltakern's mask of one seed, so both draw the same."""

    def __init__(self, p, seed):
        super().__init__()
        self.p, self.seed = p, seed

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1])
        return reference_dropout(rows, self.p, self.seed).reshape(x.shape)


def peft_dora_layer(k, n, r, dtype, dropout_p, seed=0):
    import peft

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(k, n)).to(dtype)
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], lora_dropout=dropout_p, use_dora=True)
    model = peft.get_peft_model(model, config, autocast_adapter_dtype=False)
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0.0, 0.1)
        layer.lora_magnitude_vector["default"].weight.mul_(1.0 + 0.2 * torch.randn(n, dtype=dtype))
    if dropout_p > 0.0:
        layer.lora_dropout["default"] = _PhiloxDropout(dropout_p, SEED)
    return model, layer


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_matches_peft_dora_layer(backend, dtype, dropout_p):
    k, n, r = 96, 65, 8
    model, layer = peft_dora_layer(k, n, r, dtype, dropout_p)
    model.train()
    x = torch.randn(2, 5, k, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(2, 5, n, dtype=dtype)
    y = model(x)
    y.backward(grad_out)
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    magnitude = layer.lora_magnitude_vector["default"].weight
    theirs = [y.detach(), x.grad, lora_A.grad, lora_B.grad, magnitude.grad]

    leaves = [t.detach().clone().requires_grad_(True) for t in (x, lora_A, lora_B, magnitude)]
    base = layer.base_layer
    with deltakern.use_backend(backend):
        ours_y = deltakern.dora_linear(leaves[0], base.weight, base.bias, leaves[1], leaves[2], leaves[3],
                                       layer.scaling["default"], dropout_p, seed=SEED)
    ours_y.backward(grad_out)
    ours = [ours_y.detach()] + [t.grad for t in leaves]
    # bf16: PEFT rounds W + s·B A and its norm to bf16, deltakern keeps the norm in fp32: both are
    # within a few bf16 ulps of each other.
    atol, rtol = (2e-5, 2e-5) if dtype == torch.float32 else (4e-2, 4e-2)
    for name, a, b in zip(("out", "dx", "dA", "dB", "dm"), ours, theirs):
        torch.testing.assert_close(a.float(), b.float(), atol=atol * max(1.0, b.abs().max().item()), rtol=rtol,
                                   msg=lambda m, name=name: f"{name}: {m}")


# ------------------------------------------------------------------------------------------------
# The norm without an [out, in] temporary, and its cache
# ------------------------------------------------------------------------------------------------


def test_norm_identity_equals_the_direct_norm_in_fp64():
    i = make_inputs(1, 257, 65, 16)
    direct = reference_weight_norm(i["weight"], i["lora_A"], i["lora_B"], 1.5)
    identity = dora_weight_norm(i["weight"], i["lora_A"], i["lora_B"], 1.5, weight_row_sqnorm(i["weight"]))
    torch.testing.assert_close(identity, direct, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_norm_identity_is_at_least_as_precise_as_the_direct_form(dtype):
    """Against fp64 on the same (rounded) inputs, the identity accumulated in fp32 is no less
    precise than PEFT's direct form in the input dtype (README, "DoRA": the numbers)."""
    i = make_inputs(1, 1024, 512, 16)
    w, a, b = (i[k].to(dtype) for k in ("weight", "lora_A", "lora_B"))
    exact = reference_weight_norm(w.double(), a.double(), b.double(), 1.5)
    identity = dora_weight_norm(w, a, b, 1.5, weight_row_sqnorm(w))
    direct = reference_weight_norm(w, a, b, 1.5)
    assert identity.dtype == torch.float32
    err_identity = ((identity.double() - exact) / exact).abs().max().item()
    err_direct = ((direct.double() - exact) / exact).abs().max().item()
    assert err_identity <= max(err_direct, 1e-6), (err_identity, err_direct)


def test_row_sqnorm_cache_follows_the_weight():
    w = torch.randn(7, 13)
    cache = RowSqNormCache()
    first = cache(w)
    assert cache(w) is first  # unchanged weight: the cached tensor
    with torch.no_grad():
        w[3].mul_(2.0)  # in place, as an optimizer step or merge_lora writes it
    after_inplace = cache(w)
    torch.testing.assert_close(after_inplace, w.square().sum(1))
    assert after_inplace[3] != first[3]
    other = torch.randn(7, 13)
    torch.testing.assert_close(cache(other), other.square().sum(1))  # another tensor
    torch.testing.assert_close(cache(other.t().contiguous().t()), other.square().sum(1))  # another layout
    stored = torch.randn(13, 7)  # a Conv1D weight [in, out], seen as its transposed view each call
    value = cache(stored.t())
    assert cache(stored.t()) is value
    torch.testing.assert_close(value, stored.square().sum(0))


def test_row_sqnorm_cache_tells_a_new_weight_at_a_freed_address():
    """A weight replaced by another of the same shape (load_state_dict(assign=True)) may land
    where the freed one was, with the same version (0): it is still another tensor."""
    cache = RowSqNormCache()
    w = torch.randn(64, 64)
    cache(w)
    address = w.data_ptr()
    del w
    for _ in range(8):  # the allocator hands the freed block back to a same-size request
        fresh = torch.randn(64, 64)
        if fresh.data_ptr() == address:
            break
    torch.testing.assert_close(cache(fresh), fresh.square().sum(1))


def test_bf16_row_sqnorm_is_chunked_and_fp32():
    w = torch.randn(3000, 700, dtype=torch.bfloat16)  # more than one 2**20-value chunk
    got = weight_row_sqnorm(w)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, w.double().square().sum(1).float(), atol=0, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# What backward saves, and the memory it never takes
# ------------------------------------------------------------------------------------------------


def _saved_bytes(fn):
    from deltakern.benchmark.harness import saved_tensors_bytes

    return saved_tensors_bytes(fn)


@pytest.mark.parametrize("backend", ["cpu"])
def test_saved_for_backward_is_lora_plus_z_only_when_the_magnitude_trains(backend):
    """lora_linear saves x and xa (plus the frozen weight by reference); DoRA adds z [M, out] for
    the magnitude's gradient and an [out] scale, and nothing [M, out] when the magnitude is frozen."""
    m, k, n, r = 64, 96, 80, 8
    i = {key: (v.float() if v is not None else None) for key, v in make_inputs(m, k, n, r).items()}
    x = i["x"].requires_grad_(True)
    a, b, mag = (i[key].requires_grad_(True) for key in ("lora_A", "lora_B", "magnitude"))
    frozen = (i["weight"].untyped_storage().nbytes() + i["bias"].untyped_storage().nbytes() + a.untyped_storage().nbytes()
              + b.untyped_storage().nbytes() + mag.untyped_storage().nbytes())
    with deltakern.use_backend(backend):
        lora = _saved_bytes(lambda: deltakern.lora_linear(x, i["weight"], i["bias"], a, b, 1.5, 0.1))
        dora = _saved_bytes(lambda: deltakern.dora_linear(x, i["weight"], i["bias"], a, b, mag, 1.5, 0.1))
        mag.requires_grad_(False)
        dora_frozen = _saved_bytes(lambda: deltakern.dora_linear(x, i["weight"], i["bias"], a, b, mag, 1.5, 0.1))
    # [out] vectors: the fp32 scale the kernels read and the norm that m / n keeps for dm.
    z_bytes, vectors, seed_bytes = m * n * 4, 2 * n * 4, 8
    assert lora <= m * k * 4 + m * r * 4 + frozen + seed_bytes + 64
    assert dora - lora <= z_bytes + vectors + 8
    assert dora_frozen - lora <= vectors + 8 + 4  # z is an empty placeholder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_cpu_step_never_allocates_an_out_by_in_tensor(dropout_p, dtype):
    """Forward and backward on the cpu backend allocate nothing of [out, in] size (W is 4 MiB in
    fp32 here): the largest tensors are the activations [M, in] / [M, out] (256 KiB)."""
    m, k, n, r = 64, 1024, 1024, 16
    t = {name: v.to(dtype) for name, v in make_inputs(m, k, n, r).items()}
    for name in GRADS:
        t[name].requires_grad_(True)
    dense_bytes = n * k * dtype.itemsize

    def step(backend):
        with deltakern.use_backend(backend):
            out = deltakern.dora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["magnitude"],
                                        1.0, dropout_p, SEED)
        out.backward(t["grad_out"])

    step("cpu")  # warm-up: one-time allocations (thread pools, oneDNN kernels) out of the way
    largest = largest_allocation(lambda: step("cpu"))
    assert largest <= dense_bytes // 4, f"largest allocation {largest} B against a {dense_bytes} B [out, in] tensor"
    # The check sees an [out, in] tensor where there is one: the reference forms W + s·B A.
    assert largest_allocation(lambda: step("reference")) >= dense_bytes


# ------------------------------------------------------------------------------------------------
# Custom ops and errors
# ------------------------------------------------------------------------------------------------


def _opcheck_args(dropout_p, save_z):
    i = {k: (v.float() if v is not None else None) for k, v in make_inputs(7, 13, 5, 3).items()}
    scale = torch.rand(5) + 0.5
    seed = torch.tensor(SEED)
    x, w, b, a, bb = (i[k] for k in ("x", "weight", "bias", "lora_A", "lora_B"))
    fwd = (x, w, b, a, bb, scale, 0.5, dropout_p, seed, save_z)
    xa = reference_dropout(x, dropout_p, SEED) @ a.t()
    z = (reference_dropout(x, dropout_p, SEED) @ w.t() + 0.5 * xa @ bb.t()) if save_z else x.new_empty(0)
    bwd = (i["grad_out"], x, w, a, bb, scale, xa, z, 0.5, dropout_p, seed)
    return fwd, bwd


@pytest.mark.parametrize("save_z", [True, False])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("suffix", ["", "_triton"])
def test_opcheck(suffix, dropout_p, save_z):
    fwd_args, bwd_args = _opcheck_args(dropout_p, save_z)
    torch.library.opcheck(getattr(torch.ops.deltakern, f"dora_linear_fwd{suffix}").default, fwd_args)
    torch.library.opcheck(getattr(torch.ops.deltakern, f"dora_linear_bwd{suffix}").default, bwd_args)


def _args():
    i = make_inputs(3, 13, 7, 4)
    return [i[k].float() for k in ("x", "weight", "bias", "lora_A", "lora_B", "magnitude")]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.__setitem__(5, a[5][:6]), "magnitude must be [out=7], got (6,)"),
        (lambda a: a.__setitem__(5, a[5][None]), "magnitude must be 1-D, got shape (1, 7)"),
        (lambda a: a.__setitem__(5, a[5].double()), "magnitude has dtype torch.float64, expected torch.float32 like x"),
        (lambda a: a.__setitem__(0, a[0][:, :12]), "x has 12 input features, weight [out, in] expects in=13"),
        (lambda a: a.__setitem__(3, a[3][:, :12]), "lora_A must be [r, in=13], got (4, 12)"),
        (lambda a: a.__setitem__(4, a[4][:6]), "lora_B must be [out=7, r=4], got (6, 4)"),
        (lambda a: a.__setitem__(2, a[2][:6]), "bias must be [out=7], got (6,)"),
        (lambda a: a.__setitem__(1, a[1].to("meta")), "weight is on meta, expected cpu like x"),
    ],
    ids=["out-m", "rank-m", "dtype-m", "in-x", "in-A", "out-B", "out-bias", "device-W"],
)
def test_bad_inputs_name_the_argument(mutate, message):
    a = _args()
    mutate(a)
    with pytest.raises(ValueError, match=re.escape(message)):
        deltakern.dora_linear(*a, 1.0)


def test_bad_weight_sqnorm_and_options_are_named():
    a = _args()
    with pytest.raises(ValueError, match=re.escape("weight_sqnorm must be [out=7], got (6,)")):
        deltakern.dora_linear(*a, 1.0, weight_sqnorm=torch.ones(6))
    with pytest.raises(ValueError, match=re.escape("weight_sqnorm is on meta, expected cpu like x")):
        deltakern.dora_linear(*a, 1.0, weight_sqnorm=torch.ones(7, device="meta"))
    with pytest.raises(ValueError, match=re.escape("dropout_p must be a float in [0, 1), got 1.0")):
        deltakern.dora_linear(*a, 1.0, 1.0)
    with pytest.raises(ValueError, match=re.escape("scaling must be a finite number, got nan")):
        deltakern.dora_linear(*a, float("nan"))


def test_a_given_weight_sqnorm_is_what_the_op_uses():
    """The cached ‖W‖² the caller passes is used as is (so a stale cache would show): doubling it
    changes the output as the identity says."""
    x, w, b, a, bb, m = _args()
    sq = weight_row_sqnorm(w)
    with deltakern.use_backend("cpu"):
        y = deltakern.dora_linear(x, w, b, a, bb, m, 1.0, weight_sqnorm=sq)
        y_other = deltakern.dora_linear(x, w, b, a, bb, m, 1.0, weight_sqnorm=2 * sq)
    expected_scale = m / dora_weight_norm(w, a, bb, 1.0, 2 * sq)
    z = x @ w.t() + x @ a.t() @ bb.t()
    torch.testing.assert_close(y, m / dora_weight_norm(w, a, bb, 1.0, sq) * z + b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_other, expected_scale * z + b, atol=1e-5, rtol=1e-5)
