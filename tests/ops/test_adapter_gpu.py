"""adapter on a real GPU (marked gpu; skipped without one). CPU twins: test_adapter.py (triton
under its interpreter; the activation math of the CUDA kernels, activations.h, through the CPU
kernels)."""

import pytest
import torch

import deltakern
from deltakern.activations import ACTIVATIONS
from deltakern.reference.adapter import adapter as reference_adapter
from tests.ops.test_adapter import COVERING, make_inputs, run
from tests.tolerances import assert_close

pytestmark = pytest.mark.gpu


def on_cuda(inputs):
    return {k: (None if v is None else v.cuda()) for k, v in inputs.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("m, d, r, _activation, residual", COVERING, ids=lambda v: str(v))
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_matches_reference(backend, m, d, r, _activation, residual, activation, dtype):
    inputs = make_inputs(m, d, r, residual=residual)
    with deltakern.use_backend(backend):
        out, grads = run(deltakern.adapter, on_cuda(inputs), dtype, activation)
    ref_out, ref_grads = run(reference_adapter, inputs, torch.float64, activation)
    eager_out, eager_grads = None, {}
    if dtype != torch.float32:
        eager_out, eager_grads = run(reference_adapter, on_cuda(inputs), dtype, activation)
        eager_out, eager_grads = eager_out.cpu(), {k: g.cpu() for k, g in eager_grads.items()}
    assert_close(out.cpu(), ref_out, eager_out, name=f"{backend} out")
    for name, g in grads.items():
        assert_close(g.cpu(), ref_grads[name], eager_grads.get(name), name=f"{backend} d{name}")
