"""``adapter`` in ``deltakern bench``: a bottleneck adapter's providers, checked against fp64 math,
timed by the harness."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ...activations import activation_fn, check_activation
from ...ops.adapter import adapter
from ..harness import CHECK_TOLERANCES, BenchSuite, backward_modes, check_close, op_providers, saved_tensors_bytes, with_backend

@dataclass(frozen=True)
class AdapterShape:
    m: int
    d: int
    r: int
    activation: str = "gelu"

    def __post_init__(self):
        check_activation("AdapterShape", self.activation)

    def __str__(self) -> str:
        return f"M={self.m},d={self.d},r={self.r},{self.activation}"


# Houlsby's BERT-base setting (d=768, bottleneck 64) over 512 tokens, and a wider layer over 4096.
DEFAULT_SHAPES = (AdapterShape(512, 768, 64), AdapterShape(4096, 1024, 64))
QUICK_SHAPES = (AdapterShape(256, 128, 16),)


class AdapterCase:
    """Inputs of one shape and the providers that compute the same bottleneck adapter.

    Providers: ``reference`` (as adapter libraries run it: a Linear down, the activation, a Linear
    up, a scale, the residual add), ``torch.compile`` of it, and ``deltakern-<backend>``. All
    weights are trainable; the residual is h.
    """

    PARAMS = ("h", "w_down", "b_down", "w_up", "b_up")
    SCALING = 0.5

    def __init__(self, shape: AdapterShape, dtype: torch.dtype, device: str):
        g = torch.Generator(device="cpu").manual_seed(0)
        s = shape

        def randn(*size, scale=1.0):
            return (torch.randn(*size, generator=g) * scale).to(dtype=dtype, device=device).requires_grad_(True)

        self.shape, self.dtype, self.device = shape, dtype, device
        self.h = randn(s.m, s.d)
        self.w_down = randn(s.r, s.d, scale=s.d**-0.5)
        self.b_down = randn(s.r)
        self.w_up = randn(s.d, s.r, scale=s.r**-0.5)
        self.b_up = randn(s.d)
        self.grad_out = torch.randn(s.m, s.d, generator=g).to(dtype=dtype, device=device)

    def inputs(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.PARAMS]

    def eager(self, h, w_down, b_down, w_up, b_up):
        F = torch.nn.functional
        up = F.linear(activation_fn(self.shape.activation)(F.linear(h, w_down, b_down)), w_up, b_up)
        return h + self.SCALING * up

    def deltakern(self, backend: str):
        return with_backend(backend, lambda *inputs: adapter(*inputs, activation=self.shape.activation,
                                                             scaling=self.SCALING))

    def providers(self, backends: Iterable[str], with_compile: bool = True) -> dict[str, Callable]:
        return op_providers({}, self.eager, self.deltakern, backends, with_compile)

    def check(self, provider: str, fn: Callable) -> tuple[bool, float]:
        params = self.inputs()
        for t in params:
            t.grad = None
        out = fn(*params)
        out.backward(self.grad_out)
        results = {"out": out.detach(), **{f"d{name}": t.grad.detach().clone() for name, t in zip(self.PARAMS, params)}}
        for t in params:
            t.grad = None
        leaves = [t.detach().double().requires_grad_(True) for t in params]
        expected_out = self.eager(*leaves)
        expected_out.backward(self.grad_out.double())
        expected = {"out": expected_out.detach(), **{f"d{name}": t.grad for name, t in zip(self.PARAMS, leaves)}}
        return check_close(results, expected, *CHECK_TOLERANCES[self.dtype])

    def run_mode(self, provider: str, fn: Callable, mode: str) -> tuple[Callable, Callable | None]:
        return backward_modes(lambda: fn(*self.inputs()), self.inputs(), self.grad_out, mode)

    def saved_bytes(self, fn: Callable) -> int:
        return saved_tensors_bytes(lambda: fn(*self.inputs()), exclude=self.inputs()[1:])


SUITE = BenchSuite("adapter", AdapterShape, DEFAULT_SHAPES, QUICK_SHAPES, AdapterCase)
