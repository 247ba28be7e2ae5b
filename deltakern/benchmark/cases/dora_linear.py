"""``dora_linear`` in ``deltakern bench``: one DoRA layer, PEFT's own against deltakern's, each
provider checked against fp64 math on the mask it drew, timed by the harness.

Providers, in table order:

- ``lora-floor``: deltakern's ``lora_linear`` (automatic backend) on the same x, W, b, A, B and
  dropout: the same layer without DoRA's magnitude, so the table's ``x base`` column reads as
  what the magnitude costs over fused LoRA. Checked against fp64 LoRA math, not DoRA's.
- ``reference``: PEFT's DoRA layer itself (``peft.get_peft_model`` with ``use_dora=True`` over an
  ``nn.Linear``; a ``lora.Linear`` whose ``DoraLinearLayer`` forms ``W + s·B A`` and its norms
  every call, as PEFT does in training), with its own ``nn.Dropout``.
- ``torch.compile`` of that PEFT layer.
- ``deltakern-<backend>``: ``deltakern.dora_linear`` forced to each backend, with ``‖W‖²`` of the
  frozen weight cached between calls (:class:`RowSqNormCache`, as deltakern's layers keep it).

Every provider trains x, lora_A, lora_B and the magnitude (the floor has none); W and b are frozen.
The fp64 expectation of the DoRA providers is a float64 copy of the PEFT layer whose dropout
applies a fixed mask: deltakern's Philox mask of the check's seed for ``deltakern-*``, the mask
torch's RNG drew for PEFT's eager and compiled runs. deltakern is thus checked against PEFT's
own code on the very mask deltakern used.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch

from ...ops.dora_linear import RowSqNormCache, dora_linear
from ...ops.lora_linear import lora_linear
from ...reference.philox import dropout_keep_mask
from ..harness import (
    CHECK_TOLERANCES,
    BenchSuite,
    backward_modes,
    check_close,
    op_providers,
    saved_tensors_bytes,
    with_backend,
)
from .lora_linear import LoraShape

# The layer of the DoRA performance targets (M=2048, in=out=1024, r=16), with dropout on
# (PEFT's slow branch: a second base GEMM on the dropped input) and off.
DEFAULT_SHAPES = (LoraShape(2048, 1024, 1024, 16, 0.1), LoraShape(2048, 1024, 1024, 16, 0.0))
# Both PEFT branches, small: the dropout one and the base-result one.
QUICK_SHAPES = (LoraShape(256, 256, 256, 8, 0.1), LoraShape(256, 256, 256, 8, 0.0))
_CHECK_SEED = 20240917
_ADAPTER = "default"


class _FixedMaskDropout(torch.nn.Module):
    """Stands in for PEFT's ``nn.Dropout`` in the fp64 copy: ``x ⊙ keep / (1 − p)``, keep ``[M, in]``."""

    def __init__(self, keep: torch.Tensor, p: float):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.keep.to(x.dtype) / (1.0 - self.p)


def peft_dora_layer(shape: LoraShape, dtype: torch.dtype, device: str, scaling: float, generator: torch.Generator):
    """PEFT's DoRA ``lora.Linear`` over an ``nn.Linear(in, out)`` (bias on), its base frozen.

    Weights are drawn from ``generator`` so that every path matters: W ``[out, in]`` and A
    ``[r, in]`` ~ N(0, 1/in), b ``[out]`` ~ N(0, 1), B ``[out, r]`` ~ N(0, 1/r) (not PEFT's zero
    init), and the magnitude ``[out]`` PEFT's ``‖W + s·B A‖`` of those times 1 ± 20%, so the
    scale ``magnitude / norm`` is not 1.
    """
    import peft

    s = shape
    base = torch.nn.Sequential(torch.nn.Linear(s.in_features, s.out_features))
    config = peft.LoraConfig(r=s.r, lora_alpha=scaling * s.r, target_modules=["0"], lora_dropout=s.dropout_p,
                             use_dora=True)
    layer = peft.get_peft_model(base, config, autocast_adapter_dtype=False).base_model.model[0]
    with torch.no_grad():
        for param, std in ((layer.base_layer.weight, s.in_features**-0.5), (layer.base_layer.bias, 1.0),
                           (layer.lora_A[_ADAPTER].weight, s.in_features**-0.5),
                           (layer.lora_B[_ADAPTER].weight, s.r**-0.5)):
            param.copy_(torch.randn(param.shape, generator=generator) * std)
        norm = torch.linalg.vector_norm(layer.base_layer.weight + scaling * layer.lora_B[_ADAPTER].weight
                                        @ layer.lora_A[_ADAPTER].weight, dim=1)
        layer.lora_magnitude_vector[_ADAPTER].weight.copy_(norm * (1.0 + 0.2 * torch.randn(s.out_features, generator=generator)))
    layer.to(dtype=dtype, device=device).train()
    if layer.scaling[_ADAPTER] != scaling:
        raise AssertionError(f"PEFT scaling {layer.scaling[_ADAPTER]} != {scaling}")
    return layer


class DoraCase:
    """Inputs of one shape and the providers that compute the same DoRA layer (see the module
    docstring). The trained tensors are PEFT's own parameters, shared by every provider."""

    def __init__(self, shape: LoraShape, dtype: torch.dtype, device: str, scaling: float = 2.0):
        g = torch.Generator(device="cpu").manual_seed(0)
        s = shape
        self.shape, self.dtype, self.device, self.scaling = shape, dtype, device, scaling
        self.peft_layer = peft_dora_layer(shape, dtype, device, scaling, g)
        self.weight = self.peft_layer.base_layer.weight
        self.bias = self.peft_layer.base_layer.bias
        self.lora_A = self.peft_layer.lora_A[_ADAPTER].weight
        self.lora_B = self.peft_layer.lora_B[_ADAPTER].weight
        self.magnitude = self.peft_layer.lora_magnitude_vector[_ADAPTER].weight
        self.x = torch.randn(s.m, s.in_features, generator=g).to(dtype=dtype, device=device).requires_grad_(True)
        self.grad_out = torch.randn(s.m, s.out_features, generator=g).to(dtype=dtype, device=device)
        self.weight_sqnorm = RowSqNormCache()

    # providers: callables x -> y that read the layer's weights from the case
    def lora_floor(self, x, seed: int | None = None):
        return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, self.shape.dropout_p, seed)

    def deltakern(self, backend: str, seed: int | None = None):
        return with_backend(backend, lambda x: dora_linear(
            x, self.weight, self.bias, self.lora_A, self.lora_B, self.magnitude, self.scaling, self.shape.dropout_p,
            seed, weight_sqnorm=self.weight_sqnorm(self.weight)))

    def providers(self, backends: Iterable[str], with_compile: bool = True) -> dict[str, Callable]:
        if with_compile:
            # fallback_random: inductor draws dropout with eager's RNG, so the check below can
            # rebuild the mask the compiled graph used.
            import torch._inductor.config as inductor_config

            inductor_config.fallback_random = True
        return op_providers({"lora-floor": self.lora_floor}, self.peft_layer, self.deltakern, backends, with_compile)

    def params(self, provider: str) -> list[torch.Tensor]:
        lora = [self.x, self.lora_A, self.lora_B]
        return lora if provider == "lora-floor" else [*lora, self.magnitude]

    def check(self, provider: str, fn: Callable) -> tuple[bool, float]:
        """Run ``fn`` once and compare output and gradients with fp64 math on the same mask."""
        params = self.params(provider)
        for p in params:
            p.grad = None
        p = self.shape.dropout_p
        philox = provider.startswith("deltakern-") or provider == "lora-floor"
        if provider.startswith("deltakern-"):
            fn = self.deltakern(provider.removeprefix("deltakern-"), seed=_CHECK_SEED)
        elif provider == "lora-floor":
            fn = lambda x: self.lora_floor(x, seed=_CHECK_SEED)
        torch.manual_seed(_CHECK_SEED)
        out = fn(self.x)
        out.backward(self.grad_out)
        results = {"out": out.detach(), **{f"d{i}": t.grad.detach().clone() for i, t in enumerate(params)}}
        for t in params:
            t.grad = None
        if not p:
            keep = None
        elif philox:
            keep = dropout_keep_mask(_CHECK_SEED, self.shape.m, self.shape.in_features, p, device=self.device)
        else:  # PEFT's nn.Dropout is the first draw of its forward: replay it
            torch.manual_seed(_CHECK_SEED)
            keep = torch.nn.functional.dropout(torch.ones_like(self.x), p) != 0
        expected = self._lora_expected64(keep) if provider == "lora-floor" else self._dora_expected64(keep)
        return check_close(results, expected, *CHECK_TOLERANCES[self.dtype])

    def _dora_expected64(self, keep: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Output and gradients of x, A, B, magnitude from a float64 copy of the PEFT layer."""
        layer = copy.deepcopy(self.peft_layer).double()
        if keep is not None:
            layer.lora_dropout[_ADAPTER] = _FixedMaskDropout(keep, self.shape.dropout_p)
        x = self.x.detach().double().requires_grad_(True)
        out = layer(x)
        out.backward(self.grad_out.double())
        trained = (x, layer.lora_A[_ADAPTER].weight, layer.lora_B[_ADAPTER].weight,
                   layer.lora_magnitude_vector[_ADAPTER].weight)
        return {"out": out.detach(), **{f"d{i}": t.grad for i, t in enumerate(trained)}}

    def _lora_expected64(self, keep: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Output and gradients of x, A, B of plain LoRA on the same weights, in float64."""
        F = torch.nn.functional
        x, a, b = (t.detach().double().requires_grad_(True) for t in (self.x, self.lora_A, self.lora_B))
        dropped = x if keep is None else x * keep / (1.0 - self.shape.dropout_p)
        out = F.linear(x, self.weight.double(), self.bias.double()) + self.scaling * F.linear(F.linear(dropped, a), b)
        out.backward(self.grad_out.double())
        return {"out": out.detach(), "d0": x.grad, "d1": a.grad, "d2": b.grad}

    def run_mode(self, provider: str, fn: Callable, mode: str) -> tuple[Callable, Callable | None]:
        return backward_modes(lambda: fn(self.x), self.params(provider), self.grad_out, mode)

    def saved_bytes(self, fn: Callable) -> int:
        return saved_tensors_bytes(lambda: fn(self.x), exclude=(self.weight, self.bias, self.lora_A, self.lora_B,
                                                                 self.magnitude))


SUITE = BenchSuite("dora_linear", LoraShape, DEFAULT_SHAPES, QUICK_SHAPES, DoraCase)
