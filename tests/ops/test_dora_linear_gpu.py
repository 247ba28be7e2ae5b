"""dora_linear on a real GPU (marked gpu; skipped without one). CPU twins: test_dora_linear.py."""

import pytest
import torch

import deltakern
from deltakern.reference.dora_linear import dora_linear as reference_dora_linear
from tests.ops.test_dora_linear import GRADS, SEED, SHAPES, make_inputs, shape_id
from tests.tolerances import assert_close

pytestmark = pytest.mark.gpu


def run_on(device, fn, inputs, dtype, dropout_p):
    t = {k: (None if v is None else v.detach().to(device=device, dtype=dtype, copy=True)) for k, v in inputs.items()}
    for name in GRADS:
        t[name].requires_grad_(True)
    out = fn(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["magnitude"], 1.5, dropout_p, SEED)
    out.backward(t["grad_out"])
    return [out.detach().cpu()] + [t[n].grad.cpu() for n in GRADS]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_matches_reference(backend, shape, dropout_p, dtype):
    inputs = make_inputs(*shape)

    def kernel(*args):
        with deltakern.use_backend(backend):
            return deltakern.dora_linear(*args)

    got = run_on("cuda", kernel, inputs, dtype, dropout_p)
    expected = run_on("cpu", reference_dora_linear, inputs, torch.float64, dropout_p)
    eager = run_on("cuda", reference_dora_linear, inputs, dtype, dropout_p) if dtype != torch.float32 else [None] * 5
    for name, g, e, lp in zip(("out", "dx", "dA", "dB", "dm"), got, expected, eager):
        assert_close(g, e, lp, name=f"{backend} {name}")
