"""segmented_lora_linear on every backend against the fp64 reference; each adapter's rows equal to
lora_linear on those rows alone (dropout included, with the adapter's seed); the segments; the
errors."""

from __future__ import annotations

import math

import pytest
import torch

import deltakern
from deltakern.ops.segmented_lora_linear import LoraSegments, adapter_seeds, lora_segments
from deltakern.reference.segmented_lora_linear import segmented_lora_linear as reference_segmented
from tests.tolerances import assert_backend_matches_reference

SEED = 1357
SCALINGS = (0.5, 2.0, 1.25, 3.0)
GRADS = ("x", "lora_A", "lora_B")
# (in, out, ranks, adapter index per row): mixed ranks 1/8/16, an adapter with no rows (2 in the
# first), rows of no adapter (-1), interleaved rows and contiguous runs, prime sizes.
CASES = {
    "interleaved": (33, 13, (1, 8, 16), [2, 0, -1, 2, 2, 0, 1, -1, 0, 2, 1]),
    "runs": (17, 29, (8, 1, 16, 4), [0] * 5 + [-1] * 2 + [1] * 6 + [3] * 3),
    "empty-adapter": (40, 7, (4, 16, 1), [0, 1, 0, 0, -1, 1, 1]),
    "one-row": (13, 5, (2,), [0]),
}


def reference_op(x, weight, bias, lora_A, lora_B, scalings, segments, dropout_p=0.0, seed=None):
    """The reference behind the op's signature: seeds as the op derives them."""
    n = len(lora_A)
    p = list(dropout_p) if isinstance(dropout_p, (list, tuple)) else [dropout_p] * n
    index = segments.adapter_index() if isinstance(segments, LoraSegments) else segments.reshape(-1)
    x2d = x.reshape(-1, x.shape[-1])
    out = reference_segmented(x2d, weight, bias, lora_A, lora_B, scalings, index, p,
                              adapter_seeds(torch.tensor(seed), n).tolist())
    return out.reshape(*x.shape[:-1], weight.shape[0])


def make_inputs(k, n, ranks, index, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    m = len(index)
    return {
        "x": torch.randn(m, k, generator=g, dtype=d),
        "weight": torch.randn(n, k, generator=g, dtype=d) / math.sqrt(k),
        "bias": torch.randn(n, generator=g, dtype=d) if bias else None,
        "lora_A": [torch.randn(r, k, generator=g, dtype=d) / math.sqrt(k) for r in ranks],
        "lora_B": [torch.randn(n, r, generator=g, dtype=d) / math.sqrt(r) for r in ranks],
        "index": torch.tensor(index),
        "grad_out": torch.randn(m, n, generator=g, dtype=d),
    }


def run(fn, inputs, dtype, dropout_p, grad_names=GRADS):
    """fn's output and the gradients of ``grad_names`` (lists flattened to ``lora_A[i]``)."""
    t = {k: (None if v is None else [u.detach().to(dtype, copy=True) for u in v] if isinstance(v, list)
             else v if k == "index" else v.detach().to(dtype, copy=True)) for k, v in inputs.items()}
    for name in grad_names:
        for u in t[name] if isinstance(t[name], list) else [t[name]]:
            u.requires_grad_(True)
    n = len(t["lora_A"])
    out = fn(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], list(SCALINGS[:n]), t["index"], dropout_p,
             seed=SEED)
    out.backward(t["grad_out"])
    grads = {}
    for name in grad_names:
        if isinstance(t[name], list):
            grads.update({f"{name}[{i}]": u.grad for i, u in enumerate(t[name])})
        else:
            grads[name] = t[name].grad
    return out.detach(), grads


def dropouts(n, on):
    return [(0.1, 0.0, 0.3, 0.2)[i] for i in range(n)] if on else 0.0


@pytest.mark.parametrize("with_dropout", [False, True], ids=["p0", "p-mixed"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_fp32_matches_reference(backend, case, with_dropout, poison_uninitialized):
    k, n, ranks, index = CASES[case]
    assert_backend_matches_reference(backend, deltakern.segmented_lora_linear, reference_op, run,
                                     make_inputs(k, n, ranks, index, bias=case != "runs"), torch.float32,
                                     dropouts(len(ranks), with_dropout))


@pytest.mark.parametrize("with_dropout", [False, True], ids=["p0", "p-mixed"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_fp64_with_trainable_weight_and_bias(backend, with_dropout):
    k, n, ranks, index = CASES["interleaved"]
    assert_backend_matches_reference(backend, deltakern.segmented_lora_linear, reference_op, run,
                                     make_inputs(k, n, ranks, index), torch.float64, dropouts(3, with_dropout),
                                     ("x", "weight", "bias", "lora_A", "lora_B"))


@pytest.mark.parametrize("case", ["interleaved", "runs"])
def test_bf16_cpu_matches_reference(case, poison_uninitialized):
    k, n, ranks, index = CASES[case]
    assert_backend_matches_reference("cpu", deltakern.segmented_lora_linear, reference_op, run,
                                     make_inputs(k, n, ranks, index), torch.bfloat16, dropouts(len(ranks), True))


@pytest.mark.parametrize("with_dropout", [False, True], ids=["p0", "p-mixed"])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_each_adapter_trains_as_if_alone(backend, with_dropout):
    """Every adapter's output rows and its dA, dB equal lora_linear run on its rows alone (with
    the adapter's seed: the same dropout mask); rows of no adapter get the base only."""
    k, n, ranks, index = CASES["interleaved"]
    i = make_inputs(k, n, ranks, index)
    p = dropouts(3, with_dropout) or [0.0] * 3
    with deltakern.use_backend(backend):
        out, grads = run(deltakern.segmented_lora_linear, i, torch.float32, p)
        seeds = adapter_seeds(torch.tensor(SEED), 3).tolist()
        w, b = i["weight"].float(), i["bias"].float()
        for a in range(3):
            rows = (i["index"] == a).nonzero().squeeze(1)
            x = i["x"].float()[rows].requires_grad_(True)
            A = i["lora_A"][a].float().requires_grad_(True)
            B = i["lora_B"][a].float().requires_grad_(True)
            alone = deltakern.lora_linear(x, w, b, A, B, SCALINGS[a], p[a], seed=seeds[a])
            alone.backward(i["grad_out"].float()[rows])
            torch.testing.assert_close(out[rows], alone.detach(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(grads[f"lora_A[{a}]"], A.grad, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(grads[f"lora_B[{a}]"], B.grad, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(grads["x"][rows], x.grad, atol=1e-5, rtol=1e-5)
    base_rows = (i["index"] == -1).nonzero().squeeze(1)
    torch.testing.assert_close(out[base_rows], torch.nn.functional.linear(i["x"].float()[base_rows], w, b))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_adapter_without_rows_gets_zero_gradients(backend):
    k, n, ranks, index = CASES["empty-adapter"]
    with deltakern.use_backend(backend):
        _, grads = run(deltakern.segmented_lora_linear, make_inputs(k, n, ranks, index), torch.float32, 0.1)
    assert torch.equal(grads["lora_A[2]"], torch.zeros(1, k))
    assert torch.equal(grads["lora_B[2]"], torch.zeros(n, 1))
    assert grads["lora_A[0]"].abs().sum() > 0 and grads["lora_B[1]"].abs().sum() > 0


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_dropout_masks_are_the_reference_masks(backend):
    """Same seed, same masks on every backend; the masks matter at these p."""
    k, n, ranks, index = CASES["interleaved"]
    i = make_inputs(k, n, ranks, index)
    p = [0.5, 0.3, 0.6]
    with deltakern.use_backend(backend):
        out, grads = run(deltakern.segmented_lora_linear, i, torch.float32, p)
    with deltakern.use_backend("reference"):
        ref, ref_grads = run(deltakern.segmented_lora_linear, i, torch.float32, p)
        no_dropout, _ = run(deltakern.segmented_lora_linear, i, torch.float32, 0.0)
    assert (ref - no_dropout).abs().max() > 0.1
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_dropout", [False, True], ids=["p0", "p-mixed"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_fp64(backend, with_dropout):
    i = make_inputs(6, 5, (2, 3), [1, 0, -1, 1, 0])
    leaves = [i["x"], i["weight"], i["bias"], *i["lora_A"], *i["lora_B"]]
    for t in leaves:
        t.requires_grad_(True)
    p = [0.2, 0.4] if with_dropout else 0.0

    def fn(x, w, b, a0, a1, b0, b1):
        return deltakern.segmented_lora_linear(x, w, b, [a0, a1], [b0, b1], [0.5, 2.0], i["index"], p, seed=SEED)

    with deltakern.use_backend(backend):
        assert torch.autograd.gradcheck(fn, tuple(leaves))


def test_segments_are_computed_once_and_reused():
    """A LoraSegments gives what its index gives; its order groups the rows by adapter, ascending."""
    k, n, ranks, index = CASES["interleaved"]
    i = make_inputs(k, n, ranks, index)
    segments = lora_segments(i["index"], 3)
    assert segments.order.tolist() == [1, 5, 8, 6, 10, 0, 3, 4, 9]
    assert segments.offsets == (0, 3, 5, 9) and segments.num_rows == 11
    assert torch.equal(segments.adapter_index(), i["index"])
    args = (i["x"].float(), i["weight"].float(), i["bias"].float(), [a.float() for a in i["lora_A"]],
            [b.float() for b in i["lora_B"]], list(SCALINGS[:3]))
    for backend in ("cpu", "triton"):
        with deltakern.use_backend(backend):
            assert torch.equal(deltakern.segmented_lora_linear(*args, segments),
                               deltakern.segmented_lora_linear(*args, i["index"]))


def test_leading_dims_and_transposed_weight():
    """x [B, L, in] with an index [B, L], and a Conv1D-style weight stored [in, out] passed as its
    transposed view."""
    k, n, ranks, index = CASES["runs"]
    i = make_inputs(k, n, ranks, index)
    x = i["x"].float().reshape(2, 8, k)
    stored = i["weight"].float().t().contiguous()
    factors = ([a.float() for a in i["lora_A"]], [b.float() for b in i["lora_B"]], list(SCALINGS))
    expected = reference_op(x, stored.t().contiguous(), None, *factors, i["index"], 0.1, seed=SEED)
    for backend in ("cpu", "triton"):
        with deltakern.use_backend(backend):
            got = deltakern.segmented_lora_linear(x, stored.t(), None, *factors, i["index"].reshape(2, 8), 0.1,
                                                  seed=SEED)
        assert got.shape == (2, 8, n)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_zero_rows_and_all_rows_base_only(backend):
    i = make_inputs(9, 4, (2, 3), [-1, -1, -1])
    w, b = i["weight"].float(), i["bias"].float()
    factors = ([a.float() for a in i["lora_A"]], [u.float() for u in i["lora_B"]], [1.0, 1.0])
    with deltakern.use_backend(backend):
        empty = deltakern.segmented_lora_linear(torch.zeros(0, 9), w, b, *factors, torch.zeros(0, dtype=torch.long))
        base = deltakern.segmented_lora_linear(i["x"].float(), w, b, *factors, i["index"])
    assert empty.shape == (0, 4)
    torch.testing.assert_close(base, torch.nn.functional.linear(i["x"].float(), w, b))


def test_custom_ops_pass_opcheck():
    i = make_inputs(12, 7, (3, 5), [1, 0, -1, 1, 0, 0])
    segments = lora_segments(i["index"], 2)
    seeds = adapter_seeds(torch.tensor(SEED), 2)
    x, w, b = i["x"].float(), i["weight"].float(), i["bias"].float()
    A, B = [a.float() for a in i["lora_A"]], [u.float() for u in i["lora_B"]]
    op = torch.ops.deltakern.segmented_lora_linear_fwd
    fwd_args = (x, w, b, A, B, [0.5, 2.0], [0.1, 0.0], segments.order, list(segments.offsets), seeds)
    torch.library.opcheck(op, fwd_args, test_utils=("test_schema", "test_faketensor"))
    _, xa = op(*fwd_args)
    bwd_args = (i["grad_out"].float(), x, w, A, B, list(xa), [0.5, 2.0], [0.1, 0.0], segments.order,
                list(segments.offsets), seeds)
    torch.library.opcheck(torch.ops.deltakern.segmented_lora_linear_bwd, bwd_args,
                          test_utils=("test_schema", "test_faketensor"))


def _call(**overrides):
    i = make_inputs(8, 6, (2, 3), [0, 1, -1, 1])
    args = {"x": i["x"].float(), "weight": i["weight"].float(), "bias": i["bias"].float(),
            "lora_A": [a.float() for a in i["lora_A"]], "lora_B": [b.float() for b in i["lora_B"]],
            "scalings": [1.0, 2.0], "segments": i["index"], "dropout_p": 0.0}
    args.update(overrides)
    return deltakern.segmented_lora_linear(**args)


@pytest.mark.parametrize("overrides, message", [
    ({"lora_A": []}, "lora_A is empty"),
    ({"scalings": [1.0]}, "one entry per adapter, got 2, 2 and 1"),
    ({"lora_A": torch.zeros(2, 8)}, "lora_A must be a list or tuple"),
    ({"dropout_p": [0.1]}, r"dropout_p needs one entry per adapter \(2\), got 1"),
    ({"dropout_p": [0.1, 1.0]}, r"dropout_p\[1\] must be a float in \[0, 1\)"),
    ({"scalings": [1.0, float("nan")]}, r"scalings\[1\] must be a finite number"),
    ({"lora_A": [torch.zeros(2, 8), torch.zeros(3, 9)]}, r"\(adapter 1\): lora_A must be \[r, in=8\]"),
    ({"lora_B": [torch.zeros(6, 2), torch.zeros(6, 4)]}, r"\(adapter 1\): lora_B must be \[out=6, r=3\]"),
    ({"lora_A": [torch.zeros(2, 8, dtype=torch.float64), torch.zeros(3, 8)]}, r"lora_A\[0\] has dtype torch.float64"),
    ({"segments": torch.tensor([0, 1, 2, 0])}, r"values must lie in \[-1, 2\), got \[0, 2\]"),
    ({"segments": torch.tensor([0, 1, -2, 0])}, r"values must lie in \[-1, 2\), got \[-2, 1\]"),
    ({"segments": torch.tensor([0.0, 1.0, 0.0, 0.0])}, "must be an integer tensor"),
    ({"segments": torch.tensor([0, 1, 0])}, r"must have shape \(4,\) or \[4\]"),
    ({"segments": lora_segments(torch.tensor([0, 1, 0]), 2)}, "segments cover 3 rows, x has 4"),
    ({"segments": lora_segments(torch.tensor([0, 1, 0, 2]), 3)}, "built for 3 adapters, the call has 2"),
    ({"segments": [0, 1, -1, 1]}, "segments must be a LoraSegments"),
])
def test_errors_name_the_argument(overrides, message):
    with pytest.raises(ValueError, match=message):
        _call(**overrides)


def test_lora_segments_checks_its_arguments():
    with pytest.raises(ValueError, match="num_adapters must be an int >= 1"):
        lora_segments(torch.tensor([0]), 0)
    with pytest.raises(ValueError, match="must be an integer tensor"):
        lora_segments(torch.tensor([True]), 1)
