"""``segmented_lora_linear`` in ``deltakern bench``: one layer whose rows belong to n LoRA adapters,
its providers checked against fp64 math on the same dropout masks, timed by the harness.

Providers (every one trains x and all adapters' A and B; W and b are frozen):

- ``single-adapter``: deltakern's ``lora_linear`` (automatic backend) with ONE adapter over all
  rows: the floor a mixed batch is measured against (the issue's target: 16 adapters within
  1.10× of it, forward and backward).
- ``reference``: PEFT's mixed batch (``LoraLayer._mixed_batch_forward``): the base linear, then per
  adapter a gather of its rows, ``B(A(dropout(x_i))) · s_i`` and an indexed write back.
- ``deltakern-<backend>``: ``segmented_lora_linear`` with the batch's :class:`LoraSegments`,
  built once (as a model's layers share it) outside the timed call.

torch.compile is left out: the per-adapter row indices make its graph depend on the batch.

Rows: the batch is sequences of 128 rows, sequence j on adapter ``j mod n``, so with 16 adapters
over 2048 rows each adapter holds one contiguous run (16 sequences), with 4 adapters four runs
apart (the gathered path).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ...ops.lora_linear import lora_linear
from ...ops.segmented_lora_linear import adapter_seeds, lora_segments, segmented_lora_linear
from ...reference.segmented_lora_linear import segmented_lora_linear as reference_segmented
from ..harness import CHECK_TOLERANCES, BenchSuite, backward_modes, check_close, op_providers, saved_tensors_bytes, with_backend

SEQUENCE_ROWS = 128
_CHECK_SEED = 20261203


@dataclass(frozen=True)
class SegmentedLoraShape:
    m: int
    in_features: int
    out_features: int
    r: int
    adapters: int
    dropout_p: float

    def __post_init__(self):
        if not 0.0 <= self.dropout_p < 1.0:
            raise ValueError(f"SegmentedLoraShape: dropout_p must be in [0, 1), got {self.dropout_p}")
        if self.adapters < 1:
            raise ValueError(f"SegmentedLoraShape: adapters must be >= 1, got {self.adapters}")

    def __str__(self) -> str:
        return (f"M={self.m},in={self.in_features},out={self.out_features},r={self.r},"
                f"adapters={self.adapters},p={self.dropout_p:g}")


# The case: 2048 rows over 1, 4 and 16 adapters of a 1024² layer, r=16, no dropout; and
# 16 adapters with dropout.
DEFAULT_SHAPES = tuple(SegmentedLoraShape(2048, 1024, 1024, 16, n, 0.0) for n in (1, 4, 16)) + (
    SegmentedLoraShape(2048, 1024, 1024, 16, 16, 0.1),)
QUICK_SHAPES = (SegmentedLoraShape(256, 256, 256, 8, 4, 0.1),)


class SegmentedLoraCase:
    """Inputs of one shape and the providers that compute the same multi-adapter layer."""

    def __init__(self, shape: SegmentedLoraShape, dtype: torch.dtype, device: str, scaling: float = 2.0):
        g = torch.Generator(device="cpu").manual_seed(0)
        s = shape

        def randn(*size, scale=1.0):
            return (torch.randn(*size, generator=g) * scale).to(dtype=dtype, device=device)

        self.shape, self.dtype, self.device = shape, dtype, device
        self.x = randn(s.m, s.in_features).requires_grad_(True)
        self.weight = randn(s.out_features, s.in_features, scale=s.in_features**-0.5)
        self.bias = randn(s.out_features)
        self.lora_A = [randn(s.r, s.in_features, scale=s.in_features**-0.5).requires_grad_(True)
                       for _ in range(s.adapters)]
        self.lora_B = [randn(s.out_features, s.r, scale=s.r**-0.5).requires_grad_(True) for _ in range(s.adapters)]
        self.scalings = [scaling * (1.0 + 0.25 * i / s.adapters) for i in range(s.adapters)]
        self.grad_out = randn(s.m, s.out_features)
        sequence = torch.arange(s.m) // SEQUENCE_ROWS
        self.adapter_index = (sequence % s.adapters).to(device)
        self.segments = lora_segments(self.adapter_index, s.adapters)
        self.rows = [(self.adapter_index == i).nonzero().squeeze(1) for i in range(s.adapters)]
        self.dropout = torch.nn.Dropout(s.dropout_p)

    def single_adapter(self, x):
        return lora_linear(x, self.weight, self.bias, self.lora_A[0], self.lora_B[0], self.scalings[0],
                           self.shape.dropout_p)

    def peft_way(self, x):
        F = torch.nn.functional
        result = F.linear(x, self.weight, self.bias)
        for rows, a, b, s in zip(self.rows, self.lora_A, self.lora_B, self.scalings):
            x_i = x[rows]
            result[rows] += F.linear(F.linear(self.dropout(x_i), a), b) * s
        return result

    def deltakern(self, backend: str, seed: int | None = None):
        return with_backend(backend, lambda x: segmented_lora_linear(
            x, self.weight, self.bias, self.lora_A, self.lora_B, self.scalings, self.segments,
            self.shape.dropout_p, seed))

    def providers(self, backends: Iterable[str], with_compile: bool = True) -> dict[str, Callable]:
        return op_providers({"single-adapter": self.single_adapter}, self.peft_way, self.deltakern, backends,
                            with_compile=False)

    def params(self, provider: str) -> list[torch.Tensor]:
        if provider == "single-adapter":
            return [self.x, self.lora_A[0], self.lora_B[0]]
        return [self.x, *self.lora_A, *self.lora_B]

    def check(self, provider: str, fn: Callable) -> tuple[bool, float]:
        """Run ``fn`` once and compare output and gradients with fp64 math on the same masks."""
        params = self.params(provider)
        for p in params:
            p.grad = None
        if provider.startswith("deltakern-"):
            fn = self.deltakern(provider.removeprefix("deltakern-"), seed=_CHECK_SEED)
        torch.manual_seed(_CHECK_SEED)
        out = fn(self.x)
        out.backward(self.grad_out)
        results = {"out": out.detach(), **{f"d{i}": p.grad.detach().clone() for i, p in enumerate(params)}}
        for p in params:
            p.grad = None
        return check_close(results, self._expected64(provider, params), *CHECK_TOLERANCES[self.dtype])

    def _expected64(self, provider: str, params) -> dict[str, torch.Tensor]:
        s = self.shape
        leaves = {id(p): p.detach().double().requires_grad_(True) for p in params}
        x = leaves[id(self.x)]
        A = [leaves.get(id(a), a.detach().double()) for a in self.lora_A]
        B = [leaves.get(id(b), b.detach().double()) for b in self.lora_B]
        w, bias = self.weight.double(), self.bias.double()
        if provider == "single-adapter":
            # lora_linear without a seed draws one from torch's generator, seeded just before.
            torch.manual_seed(_CHECK_SEED)
            seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64)) if s.dropout_p else 0
            index = torch.zeros(s.m, dtype=torch.int64, device=self.device)
            out = reference_segmented(x, w, bias, A[:1], B[:1], self.scalings[:1], index, [s.dropout_p], [seed])
        elif provider.startswith("deltakern-"):
            seeds = adapter_seeds(torch.tensor(_CHECK_SEED), s.adapters).tolist()
            out = reference_segmented(x, w, bias, A, B, self.scalings, self.adapter_index,
                                      [s.dropout_p] * s.adapters, seeds)
        else:  # PEFT's loop: torch's dropout draws one mask per adapter, in adapter order
            torch.manual_seed(_CHECK_SEED)
            F = torch.nn.functional
            out = F.linear(x, w, bias)
            for rows, a, b, scaling in zip(self.rows, A, B, self.scalings):
                keep = self.dropout(torch.ones(rows.numel(), s.in_features, device=self.device)) != 0
                x_i = x[rows] * keep / (1.0 - s.dropout_p)
                out = out.index_add(0, rows, F.linear(F.linear(x_i, a), b) * scaling)
        out.backward(self.grad_out.double())
        return {"out": out.detach(), **{f"d{i}": leaves[id(p)].grad for i, p in enumerate(params)}}

    def run_mode(self, provider: str, fn: Callable, mode: str) -> tuple[Callable, Callable | None]:
        return backward_modes(lambda: fn(self.x), self.params(provider), self.grad_out, mode)

    def saved_bytes(self, fn: Callable) -> int:
        return saved_tensors_bytes(lambda: fn(self.x), exclude=(self.weight, self.bias, *self.lora_A, *self.lora_B))


SUITE = BenchSuite("segmented_lora_linear", SegmentedLoraShape, DEFAULT_SHAPES, QUICK_SHAPES, SegmentedLoraCase)
