"""``lora_linear`` in ``deltakern bench``: one layer's providers, checked against fp64 math on the
same dropout mask, timed by the harness."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ...ops.lora_linear import lora_linear
from ...reference.philox import dropout_keep_mask
from ..harness import CHECK_TOLERANCES, BenchSuite, backward_modes, check_close, op_providers, saved_tensors_bytes, with_backend

@dataclass(frozen=True)
class LoraShape:
    m: int
    in_features: int
    out_features: int
    r: int
    dropout_p: float

    def __post_init__(self):
        if not 0.0 <= self.dropout_p < 1.0:
            raise ValueError(f"LoraShape: dropout_p must be in [0, 1), got {self.dropout_p}")

    def __str__(self) -> str:
        return f"M={self.m},in={self.in_features},out={self.out_features},r={self.r},p={self.dropout_p:g}"


# A small layer (a BERT-base projection over 512 tokens), where per-call overhead shows, and a
# large one with dropout on and off (the dropout mask is LoRA's largest cost after the GEMMs).
DEFAULT_SHAPES = (LoraShape(512, 768, 768, 16, 0.1), LoraShape(2048, 1024, 1024, 16, 0.1),
                       LoraShape(2048, 1024, 1024, 16, 0.0))
QUICK_SHAPES = (LoraShape(256, 256, 256, 8, 0.1),)
_CHECK_SEED = 20240917


class LoraCase:
    """Inputs of one shape and the providers that compute the same LoRA layer.

    Providers: ``frozen-linear`` (the base ``F.linear`` alone, dx only in backward: the floor the
    LoRA overhead is measured against), ``reference`` (PEFT's way: a Dropout module, two linears,
    a scale, an add), ``torch.compile`` of that reference, and ``deltakern-<backend>``.
    """

    def __init__(self, shape: LoraShape, dtype: torch.dtype, device: str, scaling: float = 2.0):
        g = torch.Generator(device="cpu").manual_seed(0)
        s = shape

        def randn(*size, scale=1.0):
            return (torch.randn(*size, generator=g) * scale).to(dtype=dtype, device=device)

        self.shape, self.dtype, self.device, self.scaling = shape, dtype, device, scaling
        self.x = randn(s.m, s.in_features).requires_grad_(True)
        self.weight = randn(s.out_features, s.in_features, scale=s.in_features**-0.5)
        self.bias = randn(s.out_features)
        self.lora_A = randn(s.r, s.in_features, scale=s.in_features**-0.5).requires_grad_(True)
        self.lora_B = randn(s.out_features, s.r, scale=s.r**-0.5).requires_grad_(True)
        self.grad_out = randn(s.m, s.out_features)
        self.dropout = torch.nn.Dropout(s.dropout_p)

    # providers: callables x -> y that read the layer's weights from the case
    def frozen_linear(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)

    def peft_way(self, x):
        F = torch.nn.functional
        result = F.linear(x, self.weight, self.bias)
        return result + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def deltakern(self, backend: str, seed: int | None = None):
        return with_backend(backend, lambda x: lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B,
                                                           self.scaling, self.shape.dropout_p, seed))

    def providers(self, backends: Iterable[str], with_compile: bool = True) -> dict[str, Callable]:
        if with_compile:
            # fallback_random: inductor draws dropout with eager's RNG, so the check below can
            # rebuild the mask the compiled graph used.
            import torch._inductor.config as inductor_config

            inductor_config.fallback_random = True
        return op_providers({"frozen-linear": self.frozen_linear}, self.peft_way, self.deltakern, backends, with_compile)

    def params(self, provider: str) -> list[torch.Tensor]:
        return [self.x] if provider == "frozen-linear" else [self.x, self.lora_A, self.lora_B]

    def check(self, provider: str, fn: Callable) -> tuple[bool, float]:
        """Run ``fn`` once and compare output and gradients with fp64 math on the same mask."""
        params = self.params(provider)
        for p in params:
            p.grad = None
        if provider.startswith("deltakern-"):
            fn = self.deltakern(provider.removeprefix("deltakern-"), seed=_CHECK_SEED)
            mask = None
        else:
            torch.manual_seed(_CHECK_SEED)
        out = fn(self.x)
        out.backward(self.grad_out)
        results = {"out": out.detach(), **{f"d{i}": p.grad.detach().clone() for i, p in enumerate(params)}}
        for p in params:
            p.grad = None
        if provider.startswith("deltakern-"):
            mask = dropout_keep_mask(_CHECK_SEED, self.shape.m, self.shape.in_features, self.shape.dropout_p, device=self.device) if self.shape.dropout_p else None
        elif self.shape.dropout_p and provider != "frozen-linear":
            torch.manual_seed(_CHECK_SEED)
            mask = self.dropout(torch.ones_like(self.x)) != 0
        else:
            mask = None
        expected = self._expected64(params, mask, lora=provider != "frozen-linear")
        return check_close(results, expected, *CHECK_TOLERANCES[self.dtype])

    def _expected64(self, params, mask, lora: bool) -> dict[str, torch.Tensor]:
        leaves = {id(p): p.detach().double().requires_grad_(True) for p in params}
        x, a, b = (leaves.get(id(t), t.detach().double()) for t in (self.x, self.lora_A, self.lora_B))
        F = torch.nn.functional
        out = F.linear(x, self.weight.double(), self.bias.double())
        if lora:
            dropped = x if mask is None else x * mask / (1.0 - self.shape.dropout_p)
            out = out + self.scaling * F.linear(F.linear(dropped, a), b)
        out.backward(self.grad_out.double())
        return {"out": out.detach(), **{f"d{i}": leaves[id(p)].grad for i, p in enumerate(params)}}

    def run_mode(self, provider: str, fn: Callable, mode: str) -> tuple[Callable, Callable | None]:
        return backward_modes(lambda: fn(self.x), self.params(provider), self.grad_out, mode)

    def saved_bytes(self, fn: Callable) -> int:
        return saved_tensors_bytes(lambda: fn(self.x), exclude=(self.weight, self.bias, self.lora_A, self.lora_B))


SUITE = BenchSuite("lora_linear", LoraShape, DEFAULT_SHAPES, QUICK_SHAPES, LoraCase)
