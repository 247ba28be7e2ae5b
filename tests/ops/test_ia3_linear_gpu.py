"""ia3_linear on a real GPU (marked gpu; skipped without one). CPU twins: test_ia3_linear.py
(triton under its interpreter, the cpu kernels)."""

import pytest
import torch

import deltakern
from deltakern.reference.ia3_linear import ia3_linear as reference_ia3_linear
from tests.ops.test_ia3_linear import COVERING, MODES, make_inputs, run
from tests.tolerances import assert_close

pytestmark = pytest.mark.gpu


def on_cuda(inputs):
    return {k: (None if v is None else v.cuda()) for k, v in inputs.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [*COVERING, (1000, 1024, 520), (0, 13, 5), (7, 0, 5)], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_matches_reference(backend, shape, mode, dtype):
    inputs = make_inputs(*shape, MODES[mode])
    with deltakern.use_backend(backend):
        out, grads = run(deltakern.ia3_linear, on_cuda(inputs), dtype, MODES[mode])
    ref_out, ref_grads = run(reference_ia3_linear, inputs, torch.float64, MODES[mode])
    eager_out, eager_grads = None, {}
    if dtype != torch.float32:
        eager_out, eager_grads = run(reference_ia3_linear, on_cuda(inputs), dtype, MODES[mode])
        eager_out, eager_grads = eager_out.cpu(), {k: g.cpu() for k, g in eager_grads.items()}
    assert_close(out.cpu(), ref_out, eager_out, name=f"{backend} out")
    for name, g in grads.items():
        assert_close(g.cpu(), ref_grads[name], eager_grads.get(name), name=f"{backend} d{name}")
