"""One table of tolerances for comparing a backend with the fp64 reference.

fp32 and fp64 results must be close in absolute-plus-relative terms. Low-precision results
follow FlashAttention's rule: the kernel's error against fp64 is at most LOWP_FACTOR times the
error of PyTorch's own eager computation in that dtype, plus a floor of LOWP_FLOOR_ULPS ulps of
the output's largest magnitude (relative, never absolute: an output whose values are all small
gets a small floor), for outputs whose eager error happens to be ~0. tests/test_tolerances.py
proves the helpers reject zeros, a neighbouring row and a dropout mask one Philox lane off.
"""

import torch

import deltakern

# (atol, rtol) against the fp64 reference.
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-4, 1e-4),  # reductions here run over up to 257 x 129 terms
}
LOWP_FACTOR = 2.0
# Ulps (finfo.eps: 2^-7 for bf16, 2^-10 for fp16) of the reference's largest magnitude. It was
# 2^-6 / 2^-9 times max(max|ref|, 1), an absolute floor below magnitude 1 that let a bf16 output
# whose reference stays under 0.016 pass as zeros; for max|ref| >= 1 the two agree.
LOWP_FLOOR_ULPS = 2.0


def assert_close(actual: torch.Tensor, expected64: torch.Tensor, eager_lowp: torch.Tensor | None = None, name: str = "") -> None:
    """``actual`` against the fp64 ``expected64``; ``eager_lowp`` is PyTorch eager in actual's dtype."""
    assert actual.shape == expected64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    assert not torch.isnan(actual).any(), f"{name}: NaN in result (unwritten or invalid elements)"
    dtype = actual.dtype
    if dtype in TOLERANCES:
        atol, rtol = TOLERANCES[dtype]
        torch.testing.assert_close(actual.double(), expected64.double(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
        return
    assert eager_lowp is not None, f"{name}: {dtype} needs the eager result in that dtype"
    if actual.numel() == 0:  # e.g. the gradient of a P = 0 prefix: the shape check is the test
        return
    err = (actual.double() - expected64).abs().max().item()
    eager_err = (eager_lowp.double() - expected64).abs().max().item()
    scale = expected64.abs().max().item()
    bound = LOWP_FACTOR * eager_err + LOWP_FLOOR_ULPS * torch.finfo(dtype).eps * scale
    assert err <= bound, f"{name}: {dtype} error {err:.3g} > {LOWP_FACTOR} x eager error {eager_err:.3g} + floor ({bound:.3g})"


def assert_backend_matches_reference(backend: str, op, reference, run, inputs: dict, dtype: torch.dtype, *args) -> None:
    """``run(op, inputs, dtype, *args)`` under ``backend`` against ``run(reference, ...)`` in fp64
    (and in ``dtype``, eager's error for the low-precision bound): the output and every gradient
    ``run`` returns (a dict by input name), each in ``dtype``."""
    import deltakern

    with deltakern.use_backend(backend):
        out, grads = run(op, inputs, dtype, *args)
    ref_out, ref_grads = run(reference, inputs, torch.float64, *args)
    eager_out, eager_grads = None, {}
    if dtype not in TOLERANCES:
        eager_out, eager_grads = run(reference, inputs, dtype, *args)
    assert out.dtype == dtype
    assert_close(out, ref_out, eager_out, name=f"{backend} out")
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert grads[name].dtype == dtype
        assert_close(grads[name], ref_grads[name], eager_grads.get(name), name=f"{backend} d{name}")
