"""prefix_attention on a real GPU (marked gpu; skipped without one). CPU twins:
test_prefix_attention.py (triton under its interpreter) and
tests/csrc/test_prefix_attention_cuda_host.py (the CUDA kernels on host threads)."""

import pytest
import torch

import deltakern
from deltakern.reference.prefix_attention import prefix_attention as reference_prefix_attention
from tests.ops.test_prefix_attention import CASES, GRADS, Case, make_inputs
from tests.tolerances import assert_close

pytestmark = pytest.mark.gpu

# CASES plus the head dims the kernels specialise for (80 and 96 pad to 128) at longer sequences.
GPU_CASES = CASES + [
    Case(2, 8, 2, 300, 300, 32, 80, True, "left", True),
    Case(2, 4, 4, 257, 513, 20, 96, True, "right", False),
    Case(1, 4, 1, 1, 700, 64, 128, True, "left", True),
]


def run_on(device, fn, inputs, dtype, causal):
    t = {n: inputs[n].detach().to(device=device, dtype=dtype, copy=True).requires_grad_(True) for n in GRADS}
    mask = None if inputs["mask"] is None else inputs["mask"].to(device)
    out = fn(*(t[n] for n in GRADS), causal=causal, key_padding_mask=mask)
    out.backward(inputs["grad_out"].to(device=device, dtype=dtype))
    return [out.detach().cpu()] + [t[n].grad.cpu() for n in GRADS]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_matches_reference(backend, case, dtype):
    inputs = make_inputs(case)

    def kernel(*args, **kwargs):
        with deltakern.use_backend(backend):
            return deltakern.prefix_attention(*args, **kwargs)

    got = run_on("cuda", kernel, inputs, dtype, case.causal)
    expected = run_on("cpu", reference_prefix_attention, inputs, torch.float64, case.causal)
    eager = run_on("cuda", reference_prefix_attention, inputs, dtype, case.causal) if dtype != torch.float32 else [None] * 6
    for name, g, e, lp in zip(("out", *(f"d{n}" for n in GRADS)), got, expected, eager):
        assert_close(g, e, lp, name=f"{backend} {name}")
