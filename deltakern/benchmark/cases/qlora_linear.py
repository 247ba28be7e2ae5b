"""``qlora_linear`` in ``deltakern bench``: one LoRA layer over an NF4 base weight, its providers
checked against fp64 math on the dequantised weight and the same dropout mask.

Providers: ``frozen-linear`` (the dense base ``F.linear`` alone on the same, dequantised, values:
the floor), ``dequantize-matmul`` (plain torch: dequantise the whole weight, then LoRA's eager
formula), ``reference`` (PEFT's way over bitsandbytes: ``bnb.matmul_4bit`` on its ``Params4bit``,
then the LoRA branch; dequantise-then-matmul when bitsandbytes is not installed) and
``deltakern-<backend>``. torch.compile is left out: it does not trace bitsandbytes' 4-bit matmul
as one graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ...nf4 import portable_bnb_cpu_dequantize, quantize_nf4
from ...ops.qlora_linear import qlora_linear
from ..harness import BenchSuite, op_providers, saved_tensors_bytes, with_backend
from .lora_linear import LoraCase, LoraShape

# Decoding-sized (M=16, where the weight read dominates), a BERT-sized batch and a long one; the
# layer of the lora_linear suite (in=out=1024, r=16, p=0.1).
DEFAULT_SHAPES = (LoraShape(16, 1024, 1024, 16, 0.1), LoraShape(512, 1024, 1024, 16, 0.1),
                  LoraShape(2048, 1024, 1024, 16, 0.1))
QUICK_SHAPES = (LoraShape(64, 256, 256, 8, 0.1),)
BLOCKSIZE = 64


def _bnb_weight(dense: torch.Tensor, blocksize: int):
    """bitsandbytes' NF4 ``Params4bit`` of ``dense``, or None without bitsandbytes."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    portable_bnb_cpu_dequantize()  # bitsandbytes' AVX-512 kernel misreads rows that are not whole blocks
    param = bnb.nn.Params4bit(dense.detach().clone(), requires_grad=False, quant_type="nf4", blocksize=blocksize,
                              compress_statistics=False)
    return param.to(dense.device)


class QLoraCase(LoraCase):
    """A :class:`LoraCase` whose base weight is NF4: ``self.weight`` is the dequantised weight (what
    every provider computes with), ``self.nf4`` deltakern's NF4 weight, ``self.bnb_weight``
    bitsandbytes' (the same bytes)."""

    def __init__(self, shape: LoraShape, dtype: torch.dtype, device: str, scaling: float = 2.0):
        super().__init__(shape, dtype, device, scaling)
        self.nf4 = quantize_nf4(self.weight, BLOCKSIZE)
        self.weight = self.nf4.dequantize(dtype)
        self.bnb_weight = _bnb_weight(self.weight, BLOCKSIZE)

    def dequantize_matmul(self, x):
        F = torch.nn.functional
        weight = self.nf4.dequantize(x.dtype)
        return F.linear(x, weight, self.bias) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def peft_bnb_way(self, x):
        import bitsandbytes as bnb

        F = torch.nn.functional
        result = bnb.matmul_4bit(x, self.bnb_weight.t(), bias=self.bias, quant_state=self.bnb_weight.quant_state)
        return result + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def deltakern(self, backend: str, seed: int | None = None):
        return with_backend(backend, lambda x: qlora_linear(x, self.nf4, self.bias, self.lora_A, self.lora_B,
                                                            self.scaling, self.shape.dropout_p, seed))

    def providers(self, backends: Iterable[str], with_compile: bool = True) -> dict[str, Callable]:
        baselines = {"frozen-linear": self.frozen_linear}
        if self.bnb_weight is None:
            reference = self.dequantize_matmul
        else:
            baselines["dequantize-matmul"] = self.dequantize_matmul
            reference = self.peft_bnb_way
        return op_providers(baselines, reference, self.deltakern, backends, with_compile=False)

    def weight_bytes(self, provider: str) -> int:
        if provider == "frozen-linear":
            return self.weight.numel() * self.weight.element_size()
        return self.nf4.nbytes

    def saved_bytes(self, fn: Callable) -> int:
        return saved_tensors_bytes(lambda: fn(self.x), exclude=(self.weight, self.bias, self.lora_A, self.lora_B,
                                                                 self.nf4.packed, self.nf4.absmax))


SUITE = BenchSuite("qlora_linear", LoraShape, DEFAULT_SHAPES, QUICK_SHAPES, QLoraCase)
