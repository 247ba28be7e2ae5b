"""``prefix_attention`` in ``deltakern bench``: attention over a batch-shared prefix, its providers
checked against the fp64 reference, timed by the harness."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ...ops.prefix_attention import prefix_attention
from ...reference.prefix_attention import prefix_attention as reference
from ..harness import CHECK_TOLERANCES, BenchSuite, backward_modes, check_close, op_providers, saved_tensors_bytes, with_backend

@dataclass(frozen=True)
class PrefixShape:
    b: int
    hq: int
    hkv: int
    length: int
    p: int
    d: int
    causal: bool = True

    def __post_init__(self):
        if self.hq % self.hkv:
            raise ValueError(f"PrefixShape: hq ({self.hq}) must be a multiple of hkv ({self.hkv})")

    def __str__(self) -> str:
        return f"B={self.b},H={self.hq}/{self.hkv},L={self.length},P={self.p},D={self.d}{',causal' if self.causal else ''}"


# A short grouped-query case (4 query heads per key/value head) and a longer multi-head one.
DEFAULT_SHAPES = (PrefixShape(2, 8, 2, 128, 16, 64), PrefixShape(4, 8, 8, 512, 64, 64))
QUICK_SHAPES = (PrefixShape(2, 4, 2, 64, 8, 32),)


class PrefixCase:
    """Inputs of one shape and the providers that compute attention over a shared prefix.

    Providers: ``sdpa-no-prefix`` (``F.scaled_dot_product_attention`` with ``is_causal`` over the
    input alone: a lower bound that ignores the prefix), ``reference`` (PEFT's way: the prefix
    expanded over the batch, concatenated into K/V, a dense bool mask, SDPA), ``torch.compile`` of
    that reference, and ``deltakern-<backend>``.
    """

    GRADS = ("q", "k", "v", "prefix_k", "prefix_v")

    def __init__(self, shape: PrefixShape, dtype: torch.dtype, device: str):
        g = torch.Generator(device="cpu").manual_seed(0)
        s = shape

        def randn(*size):
            return torch.randn(*size, generator=g).to(dtype=dtype, device=device).requires_grad_(True)

        self.shape, self.dtype, self.device = shape, dtype, device
        self.q = randn(s.b, s.hq, s.length, s.d)
        self.k = randn(s.b, s.hkv, s.length, s.d)
        self.v = randn(s.b, s.hkv, s.length, s.d)
        self.prefix_k = randn(s.hkv, s.p, s.d)
        self.prefix_v = randn(s.hkv, s.p, s.d)
        self.grad_out = torch.randn(s.b, s.hq, s.length, s.d, generator=g).to(dtype=dtype, device=device)

    def inputs(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.GRADS]

    def sdpa_no_prefix(self, q, k, v, prefix_k, prefix_v):
        F = torch.nn.functional
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.shape.causal, enable_gqa=self.shape.hq != self.shape.hkv)

    def peft_way(self, q, k, v, prefix_k, prefix_v):
        b, length, p = self.shape.b, self.shape.length, self.shape.p
        keys = torch.cat([prefix_k.unsqueeze(0).expand(b, -1, -1, -1), k], dim=2)
        values = torch.cat([prefix_v.unsqueeze(0).expand(b, -1, -1, -1), v], dim=2)
        mask = torch.ones(b, 1, length, p + length, dtype=torch.bool, device=q.device)
        if self.shape.causal:
            mask[..., p:] = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        return torch.nn.functional.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, enable_gqa=self.shape.hq != self.shape.hkv)

    def deltakern(self, backend: str):
        return with_backend(backend, lambda *inputs: prefix_attention(*inputs, causal=self.shape.causal))

    def providers(self, backends: Iterable[str], with_compile: bool = True) -> dict[str, Callable]:
        return op_providers({"sdpa-no-prefix": self.sdpa_no_prefix}, self.peft_way, self.deltakern, backends, with_compile)

    def params(self, provider: str) -> list[torch.Tensor]:
        return self.inputs()[:3] if provider == "sdpa-no-prefix" else self.inputs()

    def check(self, provider: str, fn: Callable) -> tuple[bool, float]:
        params = self.params(provider)
        for t in params:
            t.grad = None
        out = fn(*self.inputs())
        out.backward(self.grad_out)
        results = {"out": out.detach(), **{f"d{i}": t.grad.detach().clone() for i, t in enumerate(params)}}
        for t in params:
            t.grad = None
        leaves = [t.detach().double().requires_grad_(True) for t in self.inputs()]
        if provider == "sdpa-no-prefix":  # the same attention with an empty prefix
            leaves[3], leaves[4] = leaves[3][:, :0], leaves[4][:, :0]
        expected_out = reference(*leaves, causal=self.shape.causal)
        expected_out.backward(self.grad_out.double())
        expected = {"out": expected_out.detach(), **{f"d{i}": leaves[i].grad for i in range(len(params))}}
        return check_close(results, expected, *CHECK_TOLERANCES[self.dtype])

    def run_mode(self, provider: str, fn: Callable, mode: str) -> tuple[Callable, Callable | None]:
        return backward_modes(lambda: fn(*self.inputs()), self.params(provider), self.grad_out, mode)

    def saved_bytes(self, fn: Callable) -> int:
        return saved_tensors_bytes(lambda: fn(*self.inputs()), exclude=(self.prefix_k, self.prefix_v))


SUITE = BenchSuite("prefix_attention", PrefixShape, DEFAULT_SHAPES, QUICK_SHAPES, PrefixCase)
