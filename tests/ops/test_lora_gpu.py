"""lora_linear on a real GPU (marked gpu; skipped without one). CPU twins: test_lora.py."""

import pytest
import torch

import deltakern
from deltakern.reference.lora_linear import lora_linear as reference_lora_linear
from tests.ops.test_lora import COVERING_SHAPES, DROPOUTS, SEED, make_inputs, shape_id
from tests.tolerances import assert_close

pytestmark = pytest.mark.gpu


def run_on(device, fn, inputs, dtype, dropout_p):
    t = {k: (None if v is None else v.detach().to(device=device, dtype=dtype, copy=True)) for k, v in inputs.items()}
    for name in ("x", "lora_A", "lora_B"):
        t[name].requires_grad_(True)
    out = fn(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 0.75, dropout_p, SEED)
    out.backward(t["grad_out"])
    return [out.detach().cpu()] + [t[n].grad.cpu() for n in ("x", "lora_A", "lora_B")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dropout_p", DROPOUTS)
@pytest.mark.parametrize("shape", COVERING_SHAPES, ids=shape_id)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_matches_reference(backend, shape, dropout_p, dtype):
    m, k, n, r = shape
    inputs = make_inputs((m, k), n, r)

    def kernel(*args):
        with deltakern.use_backend(backend):
            return deltakern.lora_linear(*args)

    got = run_on("cuda", kernel, inputs, dtype, dropout_p)
    expected = run_on("cpu", reference_lora_linear, inputs, torch.float64, dropout_p)
    eager = run_on("cuda", reference_lora_linear, inputs, dtype, dropout_p) if dtype != torch.float32 else [None] * 4
    for name, g, e, lp in zip(("out", "dx", "dA", "dB"), got, expected, eager):
        assert_close(g, e, lp, name=f"{backend} {name}")
