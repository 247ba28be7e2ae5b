"""The prefix_attention CUDA kernels, run on the CPU, against the fp64 reference.

What this proves: the index math, tiling, masking (prefix always visible, padding, bottom-right
causal, rows with no visible key), online softmax and FlashAttention-2 backward (delta, dQ,
dK/dV with the prefix gradients added into zeroed fp32 accumulators and summed over the batch
for a shared prefix) of ``csrc/cuda/prefix_attention.cu`` give the results of
``deltakern.reference.prefix_attention`` for fp32, fp16 and bf16, on a machine without a GPU.

How: the kernels' per-block bodies (``forward_block``, ``delta_block``, ``dq_block``,
``dkdv_block``) are ``__host__ __device__`` templates over an execution context. The harness
``prefix_attention_cuda_host.cu`` includes the very source the GPU build compiles and runs
those bodies with ``HostCtx``: one CUDA block is 128 OS threads standing in for the lanes
(``__syncthreads`` / ``__syncwarp`` are ``std::barrier`` s of the block / warp, warp reductions
go through a per-warp scratch buffer, ``atomicAdd`` is ``std::atomic_ref::fetch_add``), and the
threads grid-stride over the tiles as the kernels do (gridDim 1, or several concurrent blocks).
The backward runs delta, dQ, dK/dV in the order ``bwd_typed`` launches them. nvcc builds the
harness once per session with torch's nvcc flags (no half operators or conversions, relaxed
constexpr), for one device arch; it is loaded with ctypes and called on contiguous CPU tensors.
Like ``prefix_attention_cuda.cpp`` (the torch glue on GPU), the helpers here zero the fp32
prefix-gradient accumulators before the call and cast them to the input dtype after it; every
other output is filled with NaN first, so an element the kernels fail to write fails the test.
The emulated shared memory starts as NaN too and is followed by a guard that must stay
untouched: a read of shared memory nothing staged gives NaN, a write past it fails the call.

Not covered: what only a GPU shows (the real warp shuffles and atomics, shared-memory bank
layout, register pressure, launch configuration and the > 48 KB shared-memory opt-in).
"""

import ctypes
import math
from pathlib import Path

import pytest
import torch

from deltakern.reference.prefix_attention import prefix_attention as reference_prefix_attention
from deltakern.reference.prefix_attention import visible_mask
from tests.csrc.nvcc import DTYPE_CODE, NVCC, build_harness
from tests.ops.test_prefix_attention import CASES, GRADS, Case, make_inputs, run
from tests.tolerances import assert_close

HARNESS = Path(__file__).resolve().with_name("prefix_attention_cuda_host.cu")

if NVCC is None:
    pytest.skip("nvcc not found", allow_module_level=True)

# Return codes of the harness's entry points.
RC_MEANING = {1: "the problem was rejected (valid_problem)", 2: "a block wrote past its dynamic shared memory"}

_I64, _INT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
_PROBLEM = [_PTR] * 6 + [_I64] * 7 + [_INT, _INT, ctypes.c_float, _INT]


@pytest.fixture(scope="session")
def lib(tmp_path_factory):
    so = tmp_path_factory.mktemp("prefix_attention_cuda_host") / "prefix_attention_cuda_host.so"
    lib = ctypes.CDLL(str(build_harness(HARNESS, so)))
    lib.dk_pa_host_fwd.argtypes = [*_PROBLEM, _PTR, _PTR, _I64]
    lib.dk_pa_host_fwd.restype = _INT
    lib.dk_pa_host_bwd.argtypes = [*_PROBLEM] + [_PTR] * 9 + [_I64]
    lib.dk_pa_host_bwd.restype = _INT
    return lib


def _problem(q, k, v, prefix_k, prefix_v, mask, causal, scale):
    """The PrefixAttentionProblem arguments; mask is the uint8 [B, Lk] tensor or None."""
    for t in (q, k, v, prefix_k, prefix_v):
        assert t.is_contiguous() and t.dtype == q.dtype and t.device.type == "cpu"
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    return [
        q.data_ptr(), k.data_ptr(), v.data_ptr(), prefix_k.data_ptr(), prefix_v.data_ptr(),
        None if mask is None else mask.data_ptr(),
        B, Hq, Hkv, Lq, Lk, prefix_k.shape[-2], D,
        int(prefix_k.dim() == 3), int(causal), scale, DTYPE_CODE[q.dtype],
    ]  # fmt: skip


def _mask_bytes(key_padding_mask):
    return None if key_padding_mask is None else key_padding_mask.to(torch.uint8).contiguous()


def cuda_host_fwd(lib, q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, n_blocks=1):
    """prefix_attention_fwd_cuda on the host emulation: (out, lse)."""
    mask = _mask_bytes(key_padding_mask)
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), dtype=torch.float32)
    rc = lib.dk_pa_host_fwd(*_problem(q, k, v, prefix_k, prefix_v, mask, causal, scale), out.data_ptr(), lse.data_ptr(), n_blocks)
    assert rc == 0, RC_MEANING.get(rc, f"forward returned {rc}")
    return out, lse


def cuda_host_bwd(lib, grad_out, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, scale, n_blocks=1):
    """prefix_attention_bwd_cuda on the host emulation: the gradients by GRADS name."""
    mask = _mask_bytes(key_padding_mask)
    grad_out = grad_out.contiguous()
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    # As the glue: zeroed fp32 accumulators of the prefix's shape, cast to the dtype afterwards.
    dpk_acc = torch.zeros(prefix_k.shape, dtype=torch.float32)
    dpv_acc = torch.zeros(prefix_v.shape, dtype=torch.float32)
    delta = torch.full(q.shape[:3], float("nan"), dtype=torch.float32)
    rc = lib.dk_pa_host_bwd(
        *_problem(q, k, v, prefix_k, prefix_v, mask, causal, scale),
        grad_out.data_ptr(), out.data_ptr(), lse.data_ptr(), delta.data_ptr(),
        dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), dpk_acc.data_ptr(), dpv_acc.data_ptr(),
        n_blocks,
    )  # fmt: skip
    assert rc == 0, RC_MEANING.get(rc, f"backward returned {rc}")
    return {"q": dq, "k": dk, "v": dv, "prefix_k": dpk_acc.to(q.dtype), "prefix_v": dpv_acc.to(q.dtype)}


def reference_lse(inputs, dtype, causal):
    """fp64 logsumexp over the visible scaled scores of the inputs rounded to dtype (-inf for a
    row with no visible key): what the kernels' fp32 lse approximates."""
    x = {name: inputs[name].to(dtype).double() for name in ("q", "k", "prefix_k")}
    B, Hq, Lq, D = x["q"].shape
    Hkv, Lk, P = x["k"].shape[1], x["k"].shape[2], x["prefix_k"].shape[-2]
    prefix_k = x["prefix_k"].expand(B, Hkv, P, D) if x["prefix_k"].dim() == 3 else x["prefix_k"]
    keys = torch.cat([prefix_k, x["k"]], dim=2).repeat_interleave(Hq // Hkv, dim=1)
    scores = x["q"] @ keys.transpose(-2, -1) / math.sqrt(D)
    visible = visible_mask(B, Lq, Lk, P, causal, inputs["mask"])
    return scores.masked_fill(~visible, float("-inf")).logsumexp(dim=-1)


def check(lib, case: Case, dtype, n_blocks=1):
    inputs = make_inputs(case)
    t = {name: inputs[name].to(dtype).contiguous() for name in GRADS}
    scale = 1.0 / math.sqrt(case.D)  # the reference's default
    args = (t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], inputs["mask"])
    out, lse = cuda_host_fwd(lib, *args, case.causal, scale, n_blocks)
    grads = cuda_host_bwd(lib, inputs["grad_out"].to(dtype), *args, out, lse, case.causal, scale, n_blocks)

    ref_out, ref_grads = run(reference_prefix_attention, inputs, torch.float64, case.causal)
    eager_out, eager_grads = None, {}
    if dtype != torch.float32:
        eager_out, eager_grads = run(reference_prefix_attention, inputs, dtype, case.causal)
    assert_close(out, ref_out, eager_out, name="cuda-host out")
    assert_close(lse, reference_lse(inputs, dtype, case.causal).float(), name="cuda-host lse")
    for name in GRADS:
        assert_close(grads[name], ref_grads[name], eager_grads.get(name), name=f"cuda-host d{name}")

    # A row with no visible key: out exactly 0, lse -inf, no gradient.
    has_key = visible_mask(case.B, case.Lq, case.Lk, case.P, case.causal, inputs["mask"]).any(dim=-1)
    empty = ~has_key.expand(case.B, case.Hq, case.Lq)
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    assert torch.equal(lse[empty], torch.full_like(lse[empty], float("-inf")))
    assert torch.equal(grads["q"][empty], torch.zeros_like(grads["q"][empty]))
    return empty


# kD = 128 (D = 80 pads to 128; D = 128 fills it), P > 32 (two prefix tiles, the second
# partial), Lq and Lk not multiples of 32, a 3-element batch sharing one prefix. Lk = Lq + 1
# with causal masking: input key 32 (first of its tile) is seen from query 31 on, the last of
# the first query tile, so dK/dV's skipping of query tiles no query of the tile sees is tested
# at its boundary.
WIDE_CASES = [
    Case(2, 4, 2, 39, 40, 40, 80, True, "left", False),
    Case(3, 2, 1, 40, 33, 33, 128, False, "right", True),
]
# One of CASES: GQA, a prefix shared by 2 batch elements, causal, left padding.
SHARED_GQA_CASE = Case(2, 2, 1, 17, 17, 1, 16, True, "left", True)
# Sizes at the edges beyond those of CASES (which has no input key, no query, D = 1): D = 65 (the
# smallest that takes kD = 128), and Lq > Lk over two query tiles whose first rows see no key.
EDGE_CASES = [
    Case(1, 2, 1, 33, 65, 31, 65, True, "right", True),
    Case(1, 2, 2, 64, 31, 0, 32, True, "none", False),
]


@pytest.mark.parametrize("case", CASES + WIDE_CASES + EDGE_CASES, ids=str)
def test_fp32_matches_reference(lib, case):
    check(lib, case, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [SHARED_GQA_CASE, WIDE_CASES[0]], ids=str)
def test_low_precision_matches_reference(lib, case, dtype):
    check(lib, case, dtype)


@pytest.mark.parametrize("case", [SHARED_GQA_CASE, WIDE_CASES[1]], ids=str)
def test_concurrent_blocks_match_reference(lib, case):
    """Three blocks at once grid-striding over the tiles: the B blocks of a shared prefix tile
    add into the same fp32 accumulators concurrently."""
    check(lib, case, torch.float32, n_blocks=3)


def test_rows_without_visible_keys_are_zero(lib):
    """P = 0 with every input key of batch element 0 padded: its rows are empty."""
    case = Case(2, 2, 1, 17, 17, 0, 16, True, "all", True)
    empty = check(lib, case, torch.float32)
    assert empty[0].all() and not empty[1].any()


def test_rejects_what_the_launchers_reject(lib):
    """valid_problem: D above 128, or Hq not a multiple of Hkv, is refused before any work."""
    for shape, kv_heads in (((1, 1, 2, 129), 1), ((1, 3, 2, 16), 2)):
        q = torch.randn(shape)
        k = torch.randn(1, kv_heads, 2, shape[-1])
        pk = torch.randn(kv_heads, 1, shape[-1])
        out = torch.zeros_like(q)
        lse = torch.zeros(shape[:3])
        assert lib.dk_pa_host_fwd(*_problem(q, k, k, pk, pk, None, True, 1.0), out.data_ptr(), lse.data_ptr(), 1) == 1
        assert out.abs().sum() == 0
