"""A check shared by the op tests: ``torch.compile(fullgraph=True)`` of a loss built on an op
gives the eager loss and gradients."""

import torch

import deltakern


def assert_compiled_step_matches_eager(step, tensors, backend: str) -> None:
    """Runs ``step(*leaves)`` (a scalar loss) eagerly and compiled with ``fullgraph=True`` on
    fresh fp32 leaves of ``tensors`` under ``backend``; the losses and all gradients agree."""
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        leaves = [t.float().requires_grad_(True) for t in tensors]
        with deltakern.use_backend(backend):
            loss = fn(*leaves)
        loss.backward()
        results.append((loss.detach(), [x.grad for x in leaves]))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    # fp32 rounding only: AOTAutograd may order the loss's own backward differently.
    torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-6, rtol=1e-6)
    for e, c in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(c, e, atol=1e-6, rtol=1e-5)
