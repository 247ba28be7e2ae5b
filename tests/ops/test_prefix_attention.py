"""prefix_attention on every backend that runs here against the fp64 reference."""

import math
from dataclasses import dataclass

import pytest
import torch

import deltakern
from deltakern.benchmark.harness import saved_tensors_bytes
from deltakern.ops.prefix_attention import prefix_attention
from deltakern.reference.prefix_attention import prefix_attention as reference_prefix_attention
from tests.compile_check import assert_compiled_step_matches_eager
from tests.tolerances import assert_close

GRADS = ("q", "k", "v", "prefix_k", "prefix_v")


@dataclass(frozen=True)
class Case:
    B: int
    Hq: int
    Hkv: int
    Lq: int
    Lk: int
    P: int
    D: int
    causal: bool
    padding: str  # none | left | right | all (one batch element has every input key padded)
    shared: bool

    def __str__(self):
        return (f"B{self.B}-H{self.Hq}/{self.Hkv}-Lq{self.Lq}-Lk{self.Lk}-P{self.P}-D{self.D}-"
                f"{'causal' if self.causal else 'full'}-{self.padding}-{'shared' if self.shared else 'perbatch'}")


# The grid, covered case by case (every value of every axis appears): P in {0, 1, 16};
# Lq = Lk in {1, 17, 128}; decode (Lq = 1 and 3 with Lk = 40); Hq/Hkv in {1, 2, 4}; D in {16, 64};
# causal and not; left and right padding; shared and per-batch prefixes; rows whose input keys
# are all padded; rows with no visible key at all (P = 0 with all keys padded, or Lq > Lk);
# and a padded head dim.
CASES = [
    Case(1, 1, 1, 1, 1, 0, 16, True, "none", True),
    Case(2, 2, 1, 17, 17, 1, 16, True, "left", True),
    Case(2, 4, 1, 17, 17, 16, 64, False, "right", False),
    Case(2, 2, 2, 128, 128, 16, 16, True, "left", True),
    Case(2, 4, 2, 1, 40, 1, 64, True, "left", True),
    Case(2, 2, 1, 3, 40, 16, 16, True, "right", False),
    Case(2, 2, 2, 17, 17, 16, 16, True, "all", True),
    Case(2, 2, 1, 17, 17, 0, 16, True, "all", True),
    Case(1, 2, 2, 5, 3, 0, 16, True, "none", True),
    Case(1, 1, 1, 128, 128, 1, 64, False, "none", False),
    # A head dim that is no power of two: the Triton kernels pad it to BLOCK_D = 64 with masks.
    Case(1, 2, 1, 9, 12, 3, 40, True, "left", True),
    # Empty and tiny extents: no input key (the prefix only), no query, a head dim of 1.
    Case(2, 2, 1, 5, 0, 3, 16, True, "none", True),
    Case(2, 2, 1, 0, 5, 3, 16, True, "left", True),
    Case(1, 1, 1, 4, 4, 2, 1, True, "none", False),
]
SMALL_CASES = [c for c in CASES if c.Lq * c.Lk <= 17 * 40]  # for the Triton interpreter


def make_inputs(case: Case, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    c, d = case, torch.float64
    prefix_shape = (c.Hkv, c.P, c.D) if c.shared else (c.B, c.Hkv, c.P, c.D)
    mask = None
    if c.padding != "none":
        mask = torch.ones(c.B, c.Lk, dtype=torch.bool)
        for b in range(c.B):
            n = (b + 1) * c.Lk // (2 * c.B)  # a different amount of padding per batch element
            if c.padding == "left":
                mask[b, :n] = False
            elif c.padding == "right":
                mask[b, c.Lk - n:] = False
        if c.padding == "all":
            mask[0] = False
    return {
        "q": torch.randn(c.B, c.Hq, c.Lq, c.D, generator=g, dtype=d),
        "k": torch.randn(c.B, c.Hkv, c.Lk, c.D, generator=g, dtype=d),
        "v": torch.randn(c.B, c.Hkv, c.Lk, c.D, generator=g, dtype=d),
        "prefix_k": torch.randn(prefix_shape, generator=g, dtype=d),
        "prefix_v": torch.randn(prefix_shape, generator=g, dtype=d),
        "grad_out": torch.randn(c.B, c.Hq, c.Lq, c.D, generator=g, dtype=d),
        "mask": mask,
    }


def run(fn, inputs, dtype, causal):
    t = {k: inputs[k].detach().to(dtype, copy=True).requires_grad_(True) for k in GRADS}
    out = fn(t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], causal=causal, key_padding_mask=inputs["mask"])
    out.backward(inputs["grad_out"].to(dtype))
    return out.detach(), {k: t[k].grad for k in GRADS}


def check(backend, case, dtype):
    inputs = make_inputs(case)
    with deltakern.use_backend(backend):
        out, grads = run(prefix_attention, inputs, dtype, case.causal)
    ref_out, ref_grads = run(reference_prefix_attention, inputs, torch.float64, case.causal)
    eager_out, eager_grads = (None, {})
    if dtype not in (torch.float32, torch.float64):
        eager_out, eager_grads = run(reference_prefix_attention, inputs, dtype, case.causal)
    assert_close(out, ref_out, eager_out, name=f"{backend} out")
    for name in GRADS:
        assert_close(grads[name], ref_grads[name], eager_grads.get(name), name=f"{backend} d{name}")


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_fp32_matches_reference(backend, case, poison_uninitialized):
    check(backend, case, torch.float32)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cpu_bf16_matches_reference(case, poison_uninitialized):
    check("cpu", case, torch.bfloat16)


@pytest.mark.parametrize("case", SMALL_CASES, ids=str)
def test_triton_fp32_matches_reference(case, poison_uninitialized):
    check("triton", case, torch.float32)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_rows_without_visible_keys_are_zero(backend):
    case = Case(2, 2, 1, 17, 17, 0, 16, True, "all", True)
    inputs = make_inputs(case)
    with deltakern.use_backend(backend):
        out, grads = run(prefix_attention, inputs, torch.float32, case.causal)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(grads["q"][0], torch.zeros_like(grads["q"][0]))
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_fp64(backend):
    case = Case(2, 2, 1, 3, 4, 2, 3, True, "left", True)
    inputs = make_inputs(case)
    tensors = tuple(inputs[k].requires_grad_(True) for k in GRADS)

    def fn(*t):
        return prefix_attention(*t, causal=True, key_padding_mask=inputs["mask"])

    with deltakern.use_backend(backend):
        assert torch.autograd.gradcheck(fn, tensors)


def opcheck_args(case):
    inputs = make_inputs(case)
    t = [inputs[k].float().requires_grad_(True) for k in GRADS]
    scale = 1.0 / math.sqrt(case.D)
    return t, inputs["mask"], scale


@pytest.mark.parametrize("op", ["prefix_attention_fwd", "prefix_attention_fwd_triton"])
def test_opcheck(op):
    case = Case(2, 2, 1, 5, 6, 3, 16, True, "left", True)
    t, mask, scale = opcheck_args(case)
    fwd = getattr(torch.ops.deltakern, op).default
    torch.library.opcheck(fwd, (*t, mask, True, scale))
    out, lse = fwd(*[x.detach() for x in t], mask, True, scale)
    bwd = getattr(torch.ops.deltakern, op.replace("fwd", "bwd")).default
    torch.library.opcheck(bwd, (torch.randn_like(out), *[x.detach() for x in t], mask, out, lse, True, scale))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_saves_nothing_of_size_keys_or_scores(backend):
    """Saved for backward: q, k, v, out and the lse (the prefix is kept by reference)."""
    case = Case(2, 2, 2, 32, 32, 8, 16, True, "left", True)
    inputs = make_inputs(case)
    t = {k: inputs[k].float().requires_grad_(True) for k in GRADS}
    with deltakern.use_backend(backend):
        saved = saved_tensors_bytes(
            lambda: prefix_attention(t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], key_padding_mask=inputs["mask"]),
            exclude=(t["prefix_k"], t["prefix_v"]),
        )
    qkvo = sum(t[k].nbytes for k in ("q", "k", "v")) + t["q"].nbytes
    lse = case.B * case.Hq * case.Lq * 4
    assert saved == qkvo + lse + inputs["mask"].nbytes


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i: i.update(prefix_k=i["prefix_k"][:1], prefix_v=i["prefix_v"][:1]), "prefix_k must be [Hkv=2, P, D=16] or [B=2, Hkv=2, P, D=16], got (1, 3, 16)"),
        (lambda i: i.update(prefix_k=i["prefix_k"][..., :8], prefix_v=i["prefix_v"][..., :8]), "prefix_k must be [Hkv=2, P, D=16]"),
        (lambda i: i.update(k=i["k"][..., :8], v=i["v"][..., :8]), "k must be [B=2, Hkv, Lk, D=16] like q"),
        (lambda i: i.update(q=torch.randn(2, 3, 5, 16, dtype=torch.float64)), "the query heads Hq=3 must be a multiple of the key/value heads Hkv=2"),
        (lambda i: i.update(mask=i["mask"][:, :5]), "key_padding_mask must be [B=2, Lk=6], got (2, 5)"),
        (lambda i: i.update(mask=i["mask"].float()), "key_padding_mask must be bool"),
        (lambda i: i.update(v=i["v"][:, :, :5]), "k and v must have one shape"),
        (lambda i: i.update(k=i["k"].float()), "k has dtype torch.float32, expected torch.float64 like q"),
    ],
    ids=["prefix-heads", "prefix-dim", "head-dim", "gqa", "mask-shape", "mask-dtype", "kv-shape", "dtype"],
)
def test_bad_inputs_name_the_argument(change, message):
    inputs = make_inputs(Case(2, 4, 2, 5, 6, 3, 16, True, "left", True))
    change(inputs)
    with pytest.raises(ValueError, match=r"deltakern\.prefix_attention: " + __import__("re").escape(message)):
        prefix_attention(inputs["q"], inputs["k"], inputs["v"], inputs["prefix_k"], inputs["prefix_v"], key_padding_mask=inputs["mask"])


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_explicit_scale_and_hf_layout(backend):
    """A non-default scale, and q/k/v as Hugging Face models produce them: [B, L, H, D] projections
    viewed as [B, H, L, D] (non-contiguous), with a prefix sliced out of PrefixEncoder's flat rows."""
    case = Case(2, 4, 2, 9, 9, 5, 16, True, "left", True)
    inputs = make_inputs(case)
    t = {k: inputs[k].float() for k in GRADS}
    q, k, v = (t[n].transpose(1, 2).contiguous().transpose(1, 2) for n in ("q", "k", "v"))
    flat = torch.cat([t["prefix_k"], t["prefix_v"]], dim=-1)  # [Hkv, P, 2D]
    prefix_k, prefix_v = flat[..., :16], flat[..., 16:]
    assert not any(x.is_contiguous() for x in (q, k, v, prefix_k, prefix_v))
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v, prefix_k, prefix_v)]
    with deltakern.use_backend(backend):
        out = prefix_attention(*leaves, key_padding_mask=inputs["mask"], scale=0.3)
    out.backward(inputs["grad_out"].float())
    ref = [inputs[n].detach().requires_grad_(True) for n in GRADS]
    ref_out = reference_prefix_attention(*ref, key_padding_mask=inputs["mask"], scale=0.3)
    ref_out.backward(inputs["grad_out"])
    assert_close(out.detach(), ref_out.detach(), name=f"{backend} out")
    for name, x, r in zip(GRADS, leaves, ref):
        assert_close(x.grad, r.grad, name=f"{backend} d{name}")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_torch_compile_fullgraph(backend):
    """The op traces into one graph (fake kernels registered), forward and backward."""
    case = Case(2, 2, 1, 7, 7, 3, 16, True, "right", True)
    inputs = make_inputs(case)

    def step(q, k, v, pk, pv):
        return prefix_attention(q, k, v, pk, pv, key_padding_mask=inputs["mask"]).square().sum()

    assert_compiled_step_matches_eager(step, [inputs[n] for n in GRADS], backend)


def test_backend_dtype_and_scale_errors():
    inputs = make_inputs(Case(1, 1, 1, 3, 3, 2, 16, True, "none", True))
    half = [inputs[n].half() for n in GRADS]
    with deltakern.use_backend("cpu"), pytest.raises(ValueError, match=r"deltakern\.prefix_attention: backend 'cpu' computes in float32, bfloat16, float64; got torch.float16"):
        prefix_attention(*half)
    with pytest.raises(ValueError, match=r"deltakern\.prefix_attention: scale must be a finite number, got nan"):
        prefix_attention(*[inputs[n] for n in GRADS], scale=float("nan"))
