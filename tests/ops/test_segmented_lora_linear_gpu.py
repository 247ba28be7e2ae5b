"""segmented_lora_linear on a real GPU (marked gpu; skipped without one). CPU twins:
test_segmented_lora_linear.py (the same cases on the cpu backend and the Triton interpreter)."""

import pytest
import torch

import deltakern
from tests.ops.test_segmented_lora_linear import CASES, SCALINGS, SEED, dropouts, make_inputs, reference_op
from tests.tolerances import assert_close

pytestmark = pytest.mark.gpu


def run_on(device, fn, inputs, dtype, dropout_p):
    """Output and the gradients of x and every adapter's A and B, back on the CPU."""
    t = {k: (None if v is None else [u.detach().to(device=device, dtype=dtype, copy=True) for u in v]
             if isinstance(v, list) else v.to(device) if k == "index"
             else v.detach().to(device=device, dtype=dtype, copy=True)) for k, v in inputs.items()}
    leaves = [t["x"], *t["lora_A"], *t["lora_B"]]
    for leaf in leaves:
        leaf.requires_grad_(True)
    n = len(t["lora_A"])
    out = fn(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], list(SCALINGS[:n]), t["index"], dropout_p,
             seed=SEED)
    out.backward(t["grad_out"])
    return [out.detach().cpu()] + [leaf.grad.cpu() for leaf in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_dropout", [False, True], ids=["p0", "p-mixed"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_matches_reference(backend, case, with_dropout, dtype):
    k, n, ranks, index = CASES[case]
    inputs = make_inputs(k, n, ranks, index)
    p = dropouts(len(ranks), with_dropout)

    def kernel(*args, **kwargs):
        with deltakern.use_backend(backend):
            return deltakern.segmented_lora_linear(*args, **kwargs)

    got = run_on("cuda", kernel, inputs, dtype, p)
    expected = run_on("cpu", reference_op, inputs, torch.float64, p)
    eager = run_on("cuda", reference_op, inputs, dtype, p) if dtype != torch.float32 else [None] * len(got)
    for i, (g, e, lp) in enumerate(zip(got, expected, eager)):
        assert_close(g, e, lp, name=f"{backend} {case} output/grad {i}")
