"""The prefix_attention reference against an independent formulation and hand-checked cases.

The independent formulation is the way PEFT and Hugging Face compute prefix tuning today: expand
the prefix over the batch, concatenate it in front of K/V, build a dense additive float mask
(bottom-right causal via ``tril``, not via index comparisons) and call
``torch.nn.functional.scaled_dot_product_attention`` with ``enable_gqa``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from deltakern.reference.prefix_attention import prefix_attention, visible_mask
from tests.tolerances import assert_close

F64 = torch.float64


def randn(gen: torch.Generator, *shape: int, dtype=F64) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()


def padding_mask(B: int, Lk: int, side: str | None) -> torch.Tensor | None:
    """Batch b has 0, Lk // 3, Lk - 1 padded keys (cycling); side "left" or "right"."""
    if side is None:
        return None
    n_pad = [(0, Lk // 3, Lk - 1)[b % 3] for b in range(B)]
    keep = torch.ones(B, Lk, dtype=torch.bool)
    for b, n in enumerate(n_pad):
        if n:
            if side == "left":
                keep[b, :n] = False
            else:
                keep[b, Lk - n :] = False
    return keep


def peft_style_attention(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale):
    """Independent formulation; rows with no visible key are left NaN (SDPA does not define them).

    Returns (out, rows): out ``[B, Hq, Lq, D]`` and rows bool ``[B, Lq]``, the rows computed.
    """
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    P = prefix_k.shape[-2]
    if prefix_k.dim() == 3:
        prefix_k = prefix_k.unsqueeze(0).expand(B, *prefix_k.shape)
        prefix_v = prefix_v.unsqueeze(0).expand(B, *prefix_v.shape)
    K = torch.cat([prefix_k, k], dim=2)
    V = torch.cat([prefix_v, v], dim=2)

    allowed = torch.ones(Lq, Lk, dtype=torch.bool)
    if causal:
        allowed = allowed.tril(diagonal=Lk - Lq)  # bottom-right aligned
    allowed = allowed.expand(B, 1, Lq, Lk)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    allowed = torch.cat([torch.ones(B, 1, Lq, P, dtype=torch.bool), allowed], dim=-1)
    additive = torch.zeros(allowed.shape, dtype=q.dtype).masked_fill(~allowed, float("-inf"))

    rows = allowed.any(dim=-1)[:, 0]  # [B, Lq]
    out = torch.full((B, Hq, Lq, V.shape[-1]), float("nan"), dtype=q.dtype)
    for b in range(B):
        idx = rows[b].nonzero().flatten()
        if idx.numel() == 0:
            continue
        out[b : b + 1, :, idx] = F.scaled_dot_product_attention(
            q[b : b + 1, :, idx],
            K[b : b + 1],
            V[b : b + 1],
            attn_mask=additive[b : b + 1, :, idx],
            scale=scale,
            enable_gqa=Hq != k.shape[1],
        )
    return out, rows


@dataclass(frozen=True)
class Case:
    P: int
    Lq: int
    Lk: int
    Hq: int
    Hkv: int
    D: int
    causal: bool
    pad: str | None  # None, "left", "right"
    shared: bool  # prefix [Hkv, P, D] shared by the batch, else [B, Hkv, P, D]
    B: int = 2
    scale: float | None = None

    @property
    def id(self) -> str:
        parts = [
            f"P{self.P}",
            f"Lq{self.Lq}" if self.Lq == self.Lk else f"Lq{self.Lq}-Lk{self.Lk}",
            f"H{self.Hq}-{self.Hkv}",
            f"D{self.D}",
            "causal" if self.causal else "full",
            f"{self.pad}pad" if self.pad else "nopad",
            "shared" if self.shared else "perbatch",
            f"B{self.B}",
        ]
        if self.scale is not None:
            parts.append(f"scale{self.scale}")
        return "-".join(parts)


# A covering set, not the full product: every value of each factor appears, mostly in pairs.
CASES = [
    # Lq = Lk = 1
    Case(P=0, Lq=1, Lk=1, Hq=2, Hkv=2, D=16, causal=True, pad=None, shared=True),
    Case(P=1, Lq=1, Lk=1, Hq=4, Hkv=1, D=64, causal=False, pad=None, shared=True),
    Case(P=16, Lq=1, Lk=1, Hq=2, Hkv=1, D=16, causal=True, pad=None, shared=False),
    # Lq = Lk = 17
    Case(P=0, Lq=17, Lk=17, Hq=2, Hkv=2, D=16, causal=True, pad="left", shared=True, B=3),
    Case(P=0, Lq=17, Lk=17, Hq=4, Hkv=1, D=16, causal=False, pad="right", shared=False, B=3),
    Case(P=1, Lq=17, Lk=17, Hq=4, Hkv=2, D=64, causal=True, pad="right", shared=False, B=3),
    Case(P=16, Lq=17, Lk=17, Hq=4, Hkv=1, D=16, causal=False, pad="left", shared=True, B=3),
    Case(P=16, Lq=17, Lk=17, Hq=2, Hkv=2, D=64, causal=True, pad=None, shared=True, scale=0.3),
    # Lq = Lk = 128 (small D, B, H)
    Case(P=0, Lq=128, Lk=128, Hq=2, Hkv=2, D=16, causal=True, pad=None, shared=True),
    Case(P=16, Lq=128, Lk=128, Hq=2, Hkv=1, D=16, causal=True, pad="left", shared=True, B=3),
    Case(P=1, Lq=128, Lk=128, Hq=2, Hkv=2, D=16, causal=False, pad="right", shared=False, B=3),
    # decoding with a KV cache: Lq < Lk
    Case(P=16, Lq=1, Lk=40, Hq=4, Hkv=1, D=64, causal=True, pad="left", shared=True, B=3),
    Case(P=0, Lq=1, Lk=40, Hq=2, Hkv=2, D=16, causal=True, pad="right", shared=True, B=3),
    Case(P=16, Lq=3, Lk=40, Hq=4, Hkv=2, D=16, causal=True, pad="right", shared=False, B=3),
    Case(P=1, Lq=3, Lk=40, Hq=2, Hkv=1, D=64, causal=False, pad="left", shared=True, B=3),
    Case(P=0, Lq=3, Lk=40, Hq=4, Hkv=4, D=16, causal=True, pad=None, shared=True),
    # Lq > Lk, causal: the first Lq - Lk queries see only the prefix (or nothing when P = 0)
    Case(P=0, Lq=7, Lk=3, Hq=2, Hkv=1, D=16, causal=True, pad=None, shared=True),
    Case(P=1, Lq=7, Lk=3, Hq=2, Hkv=1, D=16, causal=True, pad="right", shared=False, B=3),
]


def make_inputs(c: Case, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = randn(gen, c.B, c.Hq, c.Lq, c.D)
    k = randn(gen, c.B, c.Hkv, c.Lk, c.D)
    v = randn(gen, c.B, c.Hkv, c.Lk, c.D)
    prefix_shape = (c.Hkv, c.P, c.D) if c.shared else (c.B, c.Hkv, c.P, c.D)
    prefix_k = randn(gen, *prefix_shape)
    prefix_v = randn(gen, *prefix_shape)
    grad_out = torch.randn(c.B, c.Hq, c.Lq, c.D, generator=gen, dtype=F64)
    return (q, k, v, prefix_k, prefix_v), padding_mask(c.B, c.Lk, c.pad), grad_out


def grads(out: torch.Tensor, inputs, grad_out: torch.Tensor, rows: torch.Tensor | None = None):
    """Gradients of ``sum(out * grad_out)`` (over the given rows only) for all five inputs."""
    prod = out * grad_out
    loss = prod.sum() if rows is None else prod[rows[:, None, :].expand(prod.shape[:3])].sum()
    return torch.autograd.grad(loss, inputs, allow_unused=False)


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_matches_sdpa_with_concatenated_prefix(c: Case):
    inputs, kpm, grad_out = make_inputs(c)
    out = prefix_attention(*inputs, causal=c.causal, key_padding_mask=kpm, scale=c.scale)
    expected, rows = peft_style_attention(*inputs, c.causal, kpm, c.scale)
    scale = c.scale if c.scale is not None else 1.0 / math.sqrt(c.D)
    assert out.shape == (c.B, c.Hq, c.Lq, c.D) and out.dtype == F64

    # Rows with no visible key: exactly 0 in the reference, undefined (excluded) in SDPA.
    assert rows.shape == (c.B, c.Lq)
    empty = ~rows[:, None, :].expand(c.B, c.Hq, c.Lq)
    assert torch.equal(out[empty], torch.zeros_like(out[empty])), "rows without visible key must be 0"
    if c.P > 0:
        assert rows.all(), "with a prefix every row sees a key"
    assert rows.any(), "the case must compute something"
    assert_close(out[~empty], expected[~empty], name=f"out (scale {scale})")

    names = ["dq", "dk", "dv", "dprefix_k", "dprefix_v"]
    got = grads(out, inputs, grad_out)
    want = grads(expected, inputs, grad_out, rows)
    for name, g, w, x in zip(names, got, want, inputs):
        assert g.shape == x.shape, f"{name}: shape {tuple(g.shape)} != input {tuple(x.shape)}"
        assert torch.isfinite(g).all(), f"{name}: non-finite gradient"
        assert_close(g, w, name=name)
    # Queries that see nothing get no gradient.
    dq = got[0]
    assert torch.equal(dq[empty], torch.zeros_like(dq[empty]))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_all_input_keys_padded_still_sees_the_prefix(causal: bool):
    gen = torch.Generator().manual_seed(1)
    B, Hq, Hkv, Lq, Lk, P, D = 2, 4, 2, 5, 5, 3, 16
    q, k, v = randn(gen, B, Hq, Lq, D), randn(gen, B, Hkv, Lk, D), randn(gen, B, Hkv, Lk, D)
    pk, pv = randn(gen, Hkv, P, D), randn(gen, Hkv, P, D)
    kpm = torch.ones(B, Lk, dtype=torch.bool)
    kpm[1] = False  # batch element 1: every input key padded

    out = prefix_attention(q, k, v, pk, pv, causal=causal, key_padding_mask=kpm)
    # By hand: query head h of batch 1 attends over prefix head h // 2 only.
    pk_h, pv_h = pk.repeat_interleave(Hq // Hkv, dim=0), pv.repeat_interleave(Hq // Hkv, dim=0)
    by_hand = torch.softmax(q[1] @ pk_h.transpose(-2, -1) / math.sqrt(D), dim=-1) @ pv_h
    assert_close(out[1], by_hand, name="batch 1 = prefix-only attention")
    # Batch 0 is untouched by batch 1's padding.
    alone = prefix_attention(q[:1], k[:1], v[:1], pk, pv, causal=causal)
    assert_close(out[:1], alone, name="batch 0")

    dk, dv = torch.autograd.grad(out.pow(2).sum(), (k, v))
    assert torch.equal(dk[1], torch.zeros_like(dk[1])) and torch.equal(dv[1], torch.zeros_like(dv[1]))
    assert dk[0].abs().sum() > 0 and dv[0].abs().sum() > 0


def _check_no_visible_key_rows(q, k, v, pk, pv, empty_rows, **kwargs):
    """empty_rows: bool [B, Lq], the query rows that see no key. Output 0 there, all finite."""
    # Anomaly mode raises if any backward node makes a NaN, even one masked away later.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Anomaly Detection has been enabled")
        with torch.autograd.detect_anomaly(check_nan=True):
            out = prefix_attention(q, k, v, pk, pv, **kwargs)
            gen = torch.Generator().manual_seed(7)
            grad_out = torch.randn(out.shape, generator=gen, dtype=out.dtype)
            dq, dk, dv = torch.autograd.grad((out * grad_out).sum(), (q, k, v))
    assert torch.isfinite(out).all(), "NaN/inf in output"
    sel = empty_rows[:, None, :].expand(out.shape[:3])
    assert torch.equal(out[sel], torch.zeros_like(out[sel])), "rows without visible key must be 0"
    assert out[~sel].abs().min() > 0, "rows with visible keys must be computed"
    for name, g in [("dq", dq), ("dk", dk), ("dv", dv)]:
        assert torch.isfinite(g).all(), f"{name}: non-finite gradient"
    assert torch.equal(dq[sel], torch.zeros_like(dq[sel])), "empty rows must give dq = 0"
    return out, (dq, dk, dv)


def test_no_visible_key_all_padded_without_prefix():
    gen = torch.Generator().manual_seed(2)
    B, H, L, D = 2, 2, 6, 16
    q, k, v = randn(gen, B, H, L, D), randn(gen, B, H, L, D), randn(gen, B, H, L, D)
    pk, pv = randn(gen, H, 0, D), randn(gen, H, 0, D)
    kpm = torch.ones(B, L, dtype=torch.bool)
    kpm[0] = False
    empty = torch.zeros(B, L, dtype=torch.bool)
    empty[0] = True
    for causal in (True, False):
        out, (dq, dk, dv) = _check_no_visible_key_rows(q, k, v, pk, pv, empty, causal=causal, key_padding_mask=kpm)
        assert torch.equal(dk[0], torch.zeros_like(dk[0])) and torch.equal(dv[0], torch.zeros_like(dv[0]))
        # Batch element 1 is plain attention.
        assert_close(out[1:], prefix_attention(q[1:], k[1:], v[1:], pk, pv, causal=causal), name="batch 1")


def test_no_visible_key_causal_more_queries_than_keys():
    gen = torch.Generator().manual_seed(3)
    B, Hq, Hkv, Lq, Lk, D = 2, 4, 2, 5, 3, 16
    q, k, v = randn(gen, B, Hq, Lq, D), randn(gen, B, Hkv, Lk, D), randn(gen, B, Hkv, Lk, D)
    # Query i sees key j when j <= i + Lk - Lq = i - 2: queries 0 and 1 see nothing.
    empty = torch.zeros(B, Lq, dtype=torch.bool)
    empty[:, :2] = True
    pk0, pv0 = randn(gen, Hkv, 0, D), randn(gen, Hkv, 0, D)
    out, _ = _check_no_visible_key_rows(q, k, v, pk0, pv0, empty, causal=True)
    # Query 2 sees key 0 only: its output is v[:, kv head, 0].
    assert_close(out[:, :, 2], v[:, :, 0].repeat_interleave(Hq // Hkv, dim=1), name="query 2")

    # With a prefix, the same early queries attend over the prefix alone.
    P = 4
    pk, pv = randn(gen, Hkv, P, D), randn(gen, Hkv, P, D)
    out = prefix_attention(q, k, v, pk, pv, causal=True)
    pk_h, pv_h = pk.repeat_interleave(Hq // Hkv, dim=0), pv.repeat_interleave(Hq // Hkv, dim=0)
    by_hand = torch.softmax(q[:, :, :2] @ pk_h.transpose(-2, -1) / math.sqrt(D), dim=-1) @ pv_h
    assert_close(out[:, :, :2], by_hand, name="early queries = prefix-only attention")


def test_gradcheck_with_prefix_padding_and_empty_rows():
    gen = torch.Generator().manual_seed(4)
    B, Hq, Hkv, Lq, Lk, D = 2, 2, 1, 4, 3, 5
    q, k, v = randn(gen, B, Hq, Lq, D), randn(gen, B, Hkv, Lk, D), randn(gen, B, Hkv, Lk, D)
    kpm = torch.tensor([[False, True, True], [True, True, False]])
    for P in (0, 2):  # P = 0 has rows with no visible key
        pk, pv = randn(gen, Hkv, P, D), randn(gen, Hkv, P, D)

        def fn(q, k, v, pk, pv):
            return prefix_attention(q, k, v, pk, pv, causal=True, key_padding_mask=kpm)

        assert torch.autograd.gradcheck(fn, (q, k, v, pk, pv))


def test_visible_mask_bottom_right_alignment():
    # Lq = 2, Lk = 4, causal: query 0 sees keys 0..2, query 1 sees keys 0..3.
    m = visible_mask(1, 2, 4, 0, True, None, "cpu")
    assert m.shape == (1, 1, 2, 4) and m.dtype == torch.bool
    assert m[0, 0].tolist() == [[True, True, True, False], [True, True, True, True]]

    # The prefix (P = 2) is visible to every query, ahead of the input keys.
    m = visible_mask(1, 2, 4, 2, True, None, "cpu")
    assert m[0, 0].tolist() == [[True, True, True, True, True, False], [True, True, True, True, True, True]]

    # Lq > Lk: Lq = 4, Lk = 2: queries 0 and 1 see no input key.
    m = visible_mask(1, 4, 2, 0, True, None, "cpu")
    assert m[0, 0].tolist() == [[False, False], [False, False], [True, False], [True, True]]

    # Not causal: everything; Lq = Lk: ordinary lower triangle.
    assert visible_mask(1, 2, 4, 1, False, None, "cpu").all()
    assert torch.equal(visible_mask(1, 3, 3, 0, True, None, "cpu")[0, 0], torch.ones(3, 3, dtype=torch.bool).tril())

    # Padding hides input keys per batch element, never the prefix.
    kpm = torch.tensor([[False, True, True, True], [True, True, True, False]])
    m = visible_mask(2, 2, 4, 1, True, kpm, "cpu")
    assert m.shape == (2, 1, 2, 5)
    assert m[0, 0].tolist() == [[True, False, True, True, False], [True, False, True, True, True]]
    assert m[1, 0].tolist() == [[True, True, True, True, False], [True, True, True, True, False]]


@pytest.mark.parametrize("Hq, Hkv", [(4, 2), (4, 1)], ids=["gqa", "mqa"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "perbatch"])
def test_gqa_equals_repeated_kv_heads(Hq: int, Hkv: int, shared: bool):
    c = Case(P=3, Lq=6, Lk=9, Hq=Hq, Hkv=Hkv, D=16, causal=True, pad="left", shared=shared, B=3)
    inputs, kpm, grad_out = make_inputs(c, seed=5)
    q, k, v, pk, pv = inputs
    out = prefix_attention(q, k, v, pk, pv, key_padding_mask=kpm)
    g = Hq // Hkv
    # Query head h uses kv head h // g: repeat_interleave, and the prefix's head dim is -3.
    repeated = prefix_attention(
        q,
        k.repeat_interleave(g, dim=1),
        v.repeat_interleave(g, dim=1),
        pk.repeat_interleave(g, dim=-3),
        pv.repeat_interleave(g, dim=-3),
        key_padding_mask=kpm,
    )
    assert_close(out, repeated, name="out")
    names = ["dq", "dk", "dv", "dprefix_k", "dprefix_v"]
    for name, a, b in zip(names, grads(out, inputs, grad_out), grads(repeated, inputs, grad_out)):
        assert_close(a, b, name=name)
    if Hkv > 1:
        # Not a vacuous check: mapping query head h to kv head h % Hkv (tiling) gives another result.
        tile = [1] * (pk.dim() - 3) + [g, 1, 1]
        tiled = prefix_attention(
            q, k.repeat(1, g, 1, 1), v.repeat(1, g, 1, 1), pk.repeat(*tile), pv.repeat(*tile), key_padding_mask=kpm
        )
        assert (tiled - out).abs().max() > 1e-3


def test_shared_prefix_equals_expanded_prefix_and_dtype_kept():
    gen = torch.Generator().manual_seed(6)
    B, H, L, P, D = 3, 2, 7, 4, 16
    q, k, v = randn(gen, B, H, L, D), randn(gen, B, H, L, D), randn(gen, B, H, L, D)
    pk, pv = randn(gen, H, P, D), randn(gen, H, P, D)
    out = prefix_attention(q, k, v, pk, pv)
    expanded = prefix_attention(q, k, v, pk.expand(B, H, P, D), pv.expand(B, H, P, D))
    assert_close(out, expanded, name="shared vs expanded")
    # The prefix changes the result (not silently ignored).
    assert (out - prefix_attention(q, k, v, pk[:, :0], pv[:, :0])).abs().max() > 1e-3
    # fp32 in, fp32 out, close to fp64.
    out32 = prefix_attention(q.float(), k.float(), v.float(), pk.float(), pv.float())
    assert out32.dtype == torch.float32
    assert_close(out32, out.detach(), name="fp32")
