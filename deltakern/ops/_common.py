"""Input checks, seeds and custom-op registration shared by the ops: every error names the op and
the argument."""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch

from .. import _native
from ..backend import BACKEND_DTYPES



@functools.cache
def _dtensor_type() -> type | None:
    """torch's DTensor class, or None in a build without torch.distributed."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (a parameter of a module sharded with FSDP2's ``fully_shard``)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def check_tensor(op: str, name: str, t, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"deltakern.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if is_dtensor(t):
        # A DTensor passes every other check (global shape, dtype, device) and would reach the
        # kernels, whose custom ops have no sharding rule: the op would fail inside torch's
        # dispatcher, or run on a shard.
        raise ValueError(
            f"deltakern.{op}: {name} is a DTensor (placements {tuple(t.placements)}); deltakern ops take "
            f"plain tensors. Pass {name}.full_tensor(), or wrap the module with FSDP2's fully_shard, which "
            "unshards its parameters before its forward runs")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"deltakern.{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_same(op: str, ref_name: str, ref: torch.Tensor, named: dict[str, torch.Tensor | None]) -> None:
    """All tensors in ``named`` have ``ref``'s dtype and device."""
    for name, t in named.items():
        if t is None:
            continue
        if t.dtype != ref.dtype:
            raise ValueError(f"deltakern.{op}: {name} has dtype {t.dtype}, expected {ref.dtype} like {ref_name}")
        if t.device != ref.device:
            raise ValueError(f"deltakern.{op}: {name} is on {t.device}, expected {ref.device} like {ref_name}")


def check_backend_dtype(op: str, backend: str, dtype: torch.dtype) -> None:
    """A forced backend that does not compute in ``dtype`` is an error (the automatic choice
    never picks one: :func:`deltakern.backend.select_backend`)."""
    if dtype not in BACKEND_DTYPES[backend]:
        names = ", ".join(str(d).removeprefix("torch.") for d in BACKEND_DTYPES[backend])
        raise ValueError(f"deltakern.{op}: backend {backend!r} computes in {names}; got {dtype}")


def check_probability(op: str, name: str, p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"deltakern.{op}: {name} must be a float in [0, 1), got {p!r}")
    return float(p)


def check_finite(op: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"deltakern.{op}: {name} must be a finite number, got {value!r}")
    return float(value)


SEED_LIMIT = 2**63


def draw_seed() -> torch.Tensor:
    """A fresh seed from torch's default generator (so ``torch.manual_seed`` repeats runs), as a
    0-d int64 CPU tensor: no ``.item()``, so torch.compile traces it without a graph break."""
    return torch.randint(0, SEED_LIMIT - 1, (), dtype=torch.int64)


def check_seed(op: str, seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"deltakern.{op}: seed must be an int in [0, 2**63) or None, got {seed!r}")
    return seed


def seed_tensor(seed: int | None, dropout_p: float) -> torch.Tensor:
    """The dropout seed as the 0-d int64 CPU tensor the custom ops take: ``seed`` itself, or one
    drawn from torch's default generator; without dropout the seed is unused, and torch's
    generator is left untouched, as PEFT leaves it."""
    if seed is not None:
        return torch.tensor(seed, dtype=torch.int64)
    return draw_seed() if dropout_p > 0.0 else torch.zeros((), dtype=torch.int64)


def check_low_rank_factors(op: str, in_features: int, out_features: int, bias, lora_A: torch.Tensor,
                           lora_B: torch.Tensor) -> None:
    """A LoRA layer's shapes: lora_A ``[r >= 1, in]``, lora_B ``[out, r]``, bias ``[out]`` or None."""
    r = lora_A.shape[0]
    if lora_A.shape[1] != in_features:
        raise ValueError(f"deltakern.{op}: lora_A must be [r, in={in_features}], got {tuple(lora_A.shape)}")
    if r == 0:
        raise ValueError(f"deltakern.{op}: lora_A has rank r=0; r must be at least 1")
    if tuple(lora_B.shape) != (out_features, r):
        raise ValueError(f"deltakern.{op}: lora_B must be [out={out_features}, r={r}], got {tuple(lora_B.shape)}")
    if bias is not None and bias.shape[0] != out_features:
        raise ValueError(f"deltakern.{op}: bias must be [out={out_features}], got {tuple(bias.shape)}")


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t [..., n]`` as ``[rows, n]`` (a view where the layout allows); not ``reshape(-1, n)``,
    which is ambiguous when n = 0."""
    return t.reshape(t.shape[:-1].numel(), t.shape[-1])

def register_backends(op: str, triton_fwd, triton_bwd, fwd_fake: Callable, bwd_fake: Callable,
                      make_backward: Callable, setup_context: Callable) -> dict:
    """Fake kernels (so torch.compile traces them) and the autograd formula of the custom-op pairs
    ``deltakern::{op}_fwd_triton`` / ``_bwd_triton`` and, when the extension has its kernels,
    ``deltakern::{op}_fwd`` / ``_bwd``; ``make_backward(bwd_op)`` is the forward's backward calling
    ``bwd_op``. Returns the forward op of each backend but the reference."""
    fwd_ops = {"triton": triton_fwd}
    pairs = [(f"deltakern::{op}_fwd_triton", f"deltakern::{op}_bwd_triton", triton_bwd)]
    # An extension built before the op was added lacks its kernels: the registry test names them.
    if _native.has_cpu_kernels() and hasattr(torch.ops.deltakern, f"{op}_fwd"):
        fwd_ops["cpu"] = fwd_ops["cuda"] = getattr(torch.ops.deltakern, f"{op}_fwd").default
        pairs.append((f"deltakern::{op}_fwd", f"deltakern::{op}_bwd", getattr(torch.ops.deltakern, f"{op}_bwd").default))
    for fwd_name, bwd_name, bwd_op in pairs:
        torch.library.register_fake(fwd_name)(fwd_fake)
        torch.library.register_fake(bwd_name)(bwd_fake)
        torch.library.register_autograd(fwd_name, make_backward(bwd_op), setup_context=setup_context)
    return fwd_ops
