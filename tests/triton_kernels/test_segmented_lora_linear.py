"""The Triton launchers of segmented_lora_linear (under TRITON_INTERPRET=1 on the CPU) against one
``lora_linear`` per adapter.

``segmented_lora_linear_fwd`` / ``_bwd`` are called directly, in fp32, and compared with an fp64
computation built from ``deltakern.reference.lora_linear``: adapter i's rows ``x_i`` go through
``lora_linear(x_i, W, b, A_i, B_i, s_i, p_i, seeds[i])`` (its dropout draws the mask of a
``[M_i, in]`` input with seed seeds[i], as the contract asks), rows of no adapter through
``x W^T + b``; autograd of that gives dx, dA_i and dB_i, and ``xa_i = dropout(x_i) A_i^T``.
The launchers use the interpreter tiles (16-row tiles, 32-wide column / K tiles, 2 row tiles per
dA/dx program), so the shapes below span several tiles and end mid-tile. The op-level tests
(tests/ops/test_segmented_lora_linear.py) run the same backend through ``deltakern.use_backend``.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from deltakern.reference.lora_linear import dropout as reference_dropout
from deltakern.reference.lora_linear import lora_linear as reference_lora_linear
from deltakern.reference.philox import dropout_keep_mask
from deltakern.triton_kernels import segmented_lora_linear as kernels
from deltakern.triton_kernels.segmented_lora_linear import (
    segmented_lora_linear_bwd,
    segmented_lora_linear_fwd,
)
from tests.tolerances import assert_close

# Adapter seeds as the op derives them (seed + i * phi mod 2**63): full 63-bit Philox keys.
_PHI = 0x9E3779B97F4A7C15 % 2**63


def adapter_seeds(seed: int, n: int) -> torch.Tensor:
    return torch.tensor([(seed + i * _PHI) % 2**63 for i in range(n)], dtype=torch.int64)


def segments(index: torch.Tensor, n: int):
    """(order, offsets) of an adapter index, as the contract defines them."""
    rows = [(index == i).nonzero().squeeze(1) for i in range(n)]
    offsets = [0]
    for r in rows:
        offsets.append(offsets[-1] + r.numel())
    return torch.cat(rows).to(torch.int64), offsets


def make_case(m, k, n_out, ranks, index, seed=0, bias=True):
    """fp64 inputs scaled to O(1) outputs; ``index`` the adapter of each row (-1: none)."""
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    return {
        "x": torch.randn(m, k, generator=g, dtype=d),
        "weight": torch.randn(n_out, k, generator=g, dtype=d) / math.sqrt(k),
        "bias": torch.randn(n_out, generator=g, dtype=d) if bias else None,
        "lora_A": [torch.randn(r, k, generator=g, dtype=d) / math.sqrt(k) for r in ranks],
        "lora_B": [torch.randn(n_out, r, generator=g, dtype=d) / math.sqrt(max(r, 1)) for r in ranks],
        "grad_out": torch.randn(m, n_out, generator=g, dtype=d),
        "index": torch.as_tensor(index, dtype=torch.int64),
    }


def per_adapter_reference(t, scalings, dropout_p, seeds):
    """fp64: y, xa list and (dx, dA list, dB list) from one reference lora_linear per adapter."""
    x = t["x"].clone().requires_grad_(True)
    lora_A = [a.clone().requires_grad_(True) for a in t["lora_A"]]
    lora_B = [b.clone().requires_grad_(True) for b in t["lora_B"]]
    y = F.linear(x, t["weight"], t["bias"])
    xa = []
    for i, (a, b) in enumerate(zip(lora_A, lora_B)):
        rows = (t["index"] == i).nonzero().squeeze(1)
        x_i = x.index_select(0, rows)
        seed = int(seeds[i])
        xa.append(F.linear(reference_dropout(x_i.detach(), dropout_p[i], seed), a.detach()))
        if rows.numel():
            y = y.index_copy(0, rows, reference_lora_linear(x_i, t["weight"], t["bias"], a, b, scalings[i],
                                                            dropout_p[i], seed))
    y.backward(t["grad_out"])
    zeros = torch.zeros_like
    return (y.detach(), xa, x.grad, [zeros(a) if a.grad is None else a.grad for a in lora_A],
            [zeros(b) if b.grad is None else b.grad for b in lora_B])


def run_launchers(t, scalings, dropout_p, seeds, weight_transposed=False):
    f = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in t.items()}
    lora_A = [a.float() for a in t["lora_A"]]
    lora_B = [b.float() for b in t["lora_B"]]
    weight = f["weight"].t().contiguous().t() if weight_transposed else f["weight"]
    order, offsets = segments(t["index"], len(lora_A))
    y, xa = segmented_lora_linear_fwd(f["x"], weight, f["bias"], lora_A, lora_B, scalings, dropout_p, order,
                                      offsets, seeds)
    dx, da, db = segmented_lora_linear_bwd(f["grad_out"], f["x"], weight, lora_A, lora_B, xa, scalings, dropout_p,
                                           order, offsets, seeds)
    return y, xa, dx, da, db


def assert_matches(got, want):
    y, xa, dx, da, db = got
    ry, rxa, rdx, rda, rdb = want
    assert y.dtype == dx.dtype == torch.float32
    assert_close(y, ry, name="y")
    assert_close(dx, rdx, name="dx")
    for i in range(len(rxa)):
        assert xa[i].dtype == da[i].dtype == db[i].dtype == torch.float32
        assert_close(xa[i], rxa[i], name=f"xa[{i}]")
        assert_close(da[i], rda[i], name=f"dA[{i}]")
        assert_close(db[i], rdb[i], name=f"dB[{i}]")


def _mixed_index(m, n, seed):
    """Rows spread over adapters 0..n-2 and -1 in random order; adapter n-1 gets no rows."""
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(-1, n - 1, (m,), generator=g)
    index[m // 2] = -1
    return index


# (M, in, out, ranks, dropout_p per adapter): the last adapter of each case has no rows.
CASES = [
    # mixed ranks 1 / 8 / 16, per-adapter dropout (one adapter without), rows of no adapter
    (37, 45, 40, (1, 8, 16, 4), (0.1, 0.0, 0.25, 0.1)),
    (37, 45, 40, (1, 8, 16, 4), (0.0, 0.0, 0.0, 0.0)),
    # segments longer than a dA/dx row group (2 x 16 rows), in = 1, rank 3 next to rank 16
    (71, 1, 33, (3, 16), (0.1, 0.1)),
    # out = 1, M = 1 for some adapters
    (5, 33, 1, (2, 5, 7, 1), (0.3, 0.0, 0.1, 0.0)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}-in{}-out{}-r{}-p{}".format(
    c[0], c[1], c[2], "_".join(map(str, c[3])), "_".join(map(str, c[4]))))
def test_matches_per_adapter_lora_linear(case, poison_uninitialized):
    m, k, n_out, ranks, dropout_p = case
    n = len(ranks)
    t = make_case(m, k, n_out, ranks, _mixed_index(m, n, seed=m), bias=m % 2 == 1)
    assert (t["index"] == -1).any() and not (t["index"] == n - 1).any()
    scalings = [0.5 + 0.75 * i for i in range(n)]
    seeds = adapter_seeds(1234 + m, n)
    assert_matches(run_launchers(t, scalings, list(dropout_p), seeds),
                   per_adapter_reference(t, scalings, dropout_p, seeds))


def test_transposed_weight(poison_uninitialized):
    """A Conv1D weight (a transposed view) goes to the base GEMMs as it is."""
    t = make_case(20, 24, 18, (4, 2), [0, 1, -1, 1] * 5)
    seeds = adapter_seeds(7, 2)
    assert_matches(run_launchers(t, [1.0, 2.0], [0.1, 0.0], seeds, weight_transposed=True),
                   per_adapter_reference(t, [1.0, 2.0], [0.1, 0.0], seeds))


@pytest.mark.parametrize("dropout_p", [0.5, 0.1])
def test_dropout_masks_are_lora_linear_masks(dropout_p):
    """With A_i = I, xa_i is drop_i(x_i) itself: its zeros are exactly the Philox mask of a
    ``[M_i, in]`` input with seed seeds[i] (rows numbered inside the segment), and dx's low-rank
    term is masked the same way."""
    k, n = 16, 3
    index = torch.tensor([2, 0, 0, 1, -1, 2, 0] * 6)
    t = make_case(index.numel(), k, 8, (k,) * n, index)
    t["lora_A"] = [torch.eye(k, dtype=torch.float64)] * n
    seeds = adapter_seeds(99, n)
    p = [dropout_p, dropout_p / 2, dropout_p]
    _, xa, dx, _, _ = run_launchers(t, [1.0] * n, p, seeds)
    base_dx = t["grad_out"].float() @ t["weight"].float()
    for i in range(n):
        rows = (index == i).nonzero().squeeze(1)
        keep = dropout_keep_mask(int(seeds[i]), rows.numel(), k, p[i])
        assert torch.equal(xa[i] != 0, keep)
        low = dx[rows] - base_dx[rows]
        assert torch.equal(low.abs() > 1e-6, keep)


def test_no_active_rows(poison_uninitialized):
    """Every row of no adapter: the base output and dY W, empty xa, zero dA and dB."""
    t = make_case(9, 20, 11, (3, 1), [-1] * 9)
    seeds = adapter_seeds(3, 2)
    y, xa, dx, da, db = run_launchers(t, [1.0, 1.0], [0.1, 0.0], seeds)
    assert_close(y, F.linear(t["x"], t["weight"], t["bias"]), name="y")
    assert_close(dx, t["grad_out"] @ t["weight"], name="dx")
    assert [tuple(a.shape) for a in xa] == [(0, 3), (0, 1)]
    assert all(torch.equal(a, torch.zeros(r, 20)) for a, r in zip(da, (3, 1)))
    assert all(torch.equal(b, torch.zeros(11, r)) for b, r in zip(db, (3, 1)))


def test_no_rows_at_all():
    """M = 0: empty outputs of the right shapes and zero dA, dB."""
    t = make_case(0, 12, 7, (2,), torch.empty(0))
    y, xa, dx, da, db = run_launchers(t, [1.0], [0.2], adapter_seeds(0, 1))
    assert y.shape == (0, 7) and xa[0].shape == (0, 2) and dx.shape == (0, 12)
    assert torch.equal(da[0], torch.zeros(2, 12)) and torch.equal(db[0], torch.zeros(7, 2))


def test_many_adapters_and_unaligned_factors(poison_uninitialized):
    """17 adapters (a 32-lane segment search) of one or two rows, one of them empty, and factors
    that are not 16-byte aligned (table addresses in single elements instead of 16-byte units)."""
    n = 17
    shuffle = torch.randperm(23, generator=torch.Generator().manual_seed(1))
    index = torch.tensor([i % (n - 1) for i in range(23)])[shuffle]
    ranks = tuple(1 + i % 5 for i in range(n))
    t = make_case(index.numel(), 10, 9, ranks, index)
    seeds = adapter_seeds(5, n)
    scalings = [1.0 + 0.1 * i for i in range(n)]
    p = [0.2 * (i % 2) for i in range(n)]
    want = per_adapter_reference(t, scalings, p, seeds)
    # One element past an aligned allocation: 4-byte aligned fp32 tensors.
    unaligned = torch.empty(t["lora_A"][0].numel() + 1, dtype=torch.float32)[1:].view(t["lora_A"][0].shape)
    assert kernels._address_unit(4, [unaligned.data_ptr()]) == 1
    lora_A = [unaligned.copy_(t["lora_A"][0])] + [a.float() for a in t["lora_A"][1:]]
    order, offsets = segments(index, n)
    f = {k: t[k].float() for k in ("x", "weight", "bias", "grad_out")}
    lora_B = [b.float() for b in t["lora_B"]]
    y, xa = segmented_lora_linear_fwd(f["x"], f["weight"], f["bias"], lora_A, lora_B, scalings, p, order, offsets,
                                      seeds)
    dx, da, db = segmented_lora_linear_bwd(f["grad_out"], f["x"], f["weight"], lora_A, lora_B, xa, scalings, p,
                                           order, offsets, seeds)
    assert_matches((y, xa, dx, da, db), want)


def test_outputs_are_fresh():
    """No output shares memory with another output or with an input."""
    t = make_case(18, 16, 12, (2, 4), [0, 1, 1] * 6)
    f = {k: t[k].float() for k in ("x", "weight", "bias", "grad_out")}
    lora_A = [a.float() for a in t["lora_A"]]
    lora_B = [b.float() for b in t["lora_B"]]
    order, offsets = segments(t["index"], 2)
    seeds = adapter_seeds(1, 2)
    y, xa = segmented_lora_linear_fwd(f["x"], f["weight"], f["bias"], lora_A, lora_B, [1.0, 1.0], [0.0, 0.0], order,
                                      offsets, seeds)
    dx, da, db = segmented_lora_linear_bwd(f["grad_out"], f["x"], f["weight"], lora_A, lora_B, xa, [1.0, 1.0],
                                           [0.0, 0.0], order, offsets, seeds)
    outputs = [y, *xa, dx, *da, *db]
    inputs = [*f.values(), *lora_A, *lora_B, order]
    storages = [o.untyped_storage().data_ptr() for o in outputs]
    assert len(set(storages)) == len(storages)
    assert not set(storages) & {i.untyped_storage().data_ptr() for i in inputs}
