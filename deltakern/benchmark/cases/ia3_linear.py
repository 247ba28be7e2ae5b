"""``ia3_linear`` in ``deltakern bench``: one layer's providers (weight frozen, x and the scale
trained), checked against fp64 math, timed by the harness."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ...ops.ia3_linear import ia3_linear
from ..harness import CHECK_TOLERANCES, BenchSuite, backward_modes, check_close, op_providers, saved_tensors_bytes, with_backend

@dataclass(frozen=True)
class Ia3Shape:
    m: int
    in_features: int
    out_features: int
    scale_input: bool

    def __str__(self) -> str:
        where = "input" if self.scale_input else "output"
        return f"M={self.m},in={self.in_features},out={self.out_features},{where} scale"


# A Llama-style layer over 2048 tokens: the key/value projection with an output scale, and the
# FFN's down projection (intermediate 2816 = 2.75 x 1024) with an input scale.
DEFAULT_SHAPES = (Ia3Shape(2048, 1024, 1024, False), Ia3Shape(2048, 2816, 1024, True))
QUICK_SHAPES = (Ia3Shape(256, 256, 128, False), Ia3Shape(256, 256, 128, True))


class Ia3Case:
    """Inputs of one shape and the providers that compute the same (IA)³ layer, weight frozen.

    Providers: ``frozen-linear`` (the base ``F.linear`` alone: the floor), ``reference`` (PEFT's
    way: the linear, then ``* l`` as a pass of its own; or ``x * l`` before the linear),
    ``torch.compile`` of that reference, and ``deltakern-<backend>``. x and the scale train.
    """

    def __init__(self, shape: Ia3Shape, dtype: torch.dtype, device: str):
        g = torch.Generator(device="cpu").manual_seed(0)
        s = shape

        def randn(*size, scale=1.0, shift=0.0):
            return (torch.randn(*size, generator=g) * scale + shift).to(dtype=dtype, device=device)

        self.shape, self.dtype, self.device = shape, dtype, device
        self.x = randn(s.m, s.in_features).requires_grad_(True)
        self.weight = randn(s.out_features, s.in_features, scale=s.in_features**-0.5)
        self.bias = randn(s.out_features)
        size = s.in_features if s.scale_input else s.out_features
        self.scale = randn(size, scale=0.1, shift=1.0).requires_grad_(True)
        self.grad_out = randn(s.m, s.out_features)

    def frozen_linear(self, x, scale):
        return torch.nn.functional.linear(x, self.weight, self.bias)

    def peft_way(self, x, scale):
        F = torch.nn.functional
        if self.shape.scale_input:
            return F.linear(x * scale, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias) * scale

    def deltakern(self, backend: str):
        return with_backend(backend, lambda x, scale: ia3_linear(x, self.weight, self.bias, scale,
                                                                 scale_input=self.shape.scale_input))

    def providers(self, backends: Iterable[str], with_compile: bool = True) -> dict[str, Callable]:
        return op_providers({"frozen-linear": self.frozen_linear}, self.peft_way, self.deltakern, backends, with_compile)

    def params(self, provider: str) -> list[torch.Tensor]:
        return [self.x] if provider == "frozen-linear" else [self.x, self.scale]

    def check(self, provider: str, fn: Callable) -> tuple[bool, float]:
        """Run ``fn`` once and compare output and gradients with fp64 math."""
        params = self.params(provider)
        for p in params:
            p.grad = None
        out = fn(self.x, self.scale)
        out.backward(self.grad_out)
        results = {"out": out.detach(), **{f"d{i}": p.grad.detach().clone() for i, p in enumerate(params)}}
        for p in params:
            p.grad = None
        leaves = [p.detach().double().requires_grad_(True) for p in params]
        x64 = leaves[0]
        scale64 = leaves[1] if len(leaves) > 1 else None
        F = torch.nn.functional
        weight64, bias64 = self.weight.double(), self.bias.double()
        if scale64 is None:
            expected_out = F.linear(x64, weight64, bias64)
        elif self.shape.scale_input:
            expected_out = F.linear(x64 * scale64, weight64, bias64)
        else:
            expected_out = F.linear(x64, weight64, bias64) * scale64
        expected_out.backward(self.grad_out.double())
        expected = {"out": expected_out.detach(), **{f"d{i}": p.grad for i, p in enumerate(leaves)}}
        return check_close(results, expected, *CHECK_TOLERANCES[self.dtype])

    def run_mode(self, provider: str, fn: Callable, mode: str) -> tuple[Callable, Callable | None]:
        return backward_modes(lambda: fn(self.x, self.scale), self.params(provider), self.grad_out, mode)

    def saved_bytes(self, fn: Callable) -> int:
        return saved_tensors_bytes(lambda: fn(self.x, self.scale), exclude=(self.weight, self.bias, self.scale))


SUITE = BenchSuite("ia3_linear", Ia3Shape, DEFAULT_SHAPES, QUICK_SHAPES, Ia3Case)
