"""Which backend runs an op: forced by ``use_backend``/``DELTAKERN_BACKEND``, else chosen per call.

| backend     | runs on                                                        |
|-------------|----------------------------------------------------------------|
| ``triton``  | CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``    |
| ``cuda``    | CUDA tensors, through the C++/CUDA extension ``deltakern._C``  |
| ``cpu``     | CPU tensors, through the C++ extension ``deltakern._C``        |
| ``reference`` | anything: the pure-PyTorch ground truth                      |

The automatic choice is triton, then cuda, then reference for CUDA tensors, and cpu, then
reference for CPU tensors. A forced backend that cannot run a call raises
:class:`BackendUnavailableError` naming the backend and the reason; only the automatic choice
falls back.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from collections.abc import Iterator

import torch

from . import _native

BACKENDS = ("triton", "cuda", "cpu", "reference")
ENV_VAR = "DELTAKERN_BACKEND"

_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("deltakern_backend", default=None)


class BackendUnavailableError(NotImplementedError):
    """A forced backend cannot run the call; the message names the backend and why."""


def _check_name(name: str, origin: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{origin}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force backend ``name`` for every deltakern op called inside the ``with`` block."""
    token = _forced.set(_check_name(name, "deltakern.use_backend"))
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> str | None:
    """The backend forced by ``use_backend`` (innermost wins) or ``DELTAKERN_BACKEND``, if any."""
    name = _forced.get()
    if name is not None:
        return name
    env = os.environ.get(ENV_VAR, "").strip()
    return _check_name(env, ENV_VAR) if env else None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(name: str, device_type: str) -> str | None:
    """Why backend ``name`` cannot run tensors on ``device_type`` here, or None if it can."""
    _check_name(name, "deltakern.backend")
    if name == "reference":
        return None
    if name == "cpu":
        if device_type != "cpu":
            return f"it runs CPU tensors only, got {device_type} tensors"
        return None if _native.has_cpu_kernels() else _native.LOAD_ERROR
    if name == "cuda":
        if device_type != "cuda":
            return f"it runs CUDA tensors only, got {device_type} tensors"
        if not _native.has_cuda_kernels():
            return _native.LOAD_ERROR or "deltakern._C was built without CUDA kernels"
        return None
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device_type == "cpu" and not triton_interpreting():
        return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
    if device_type not in ("cpu", "cuda"):
        return f"it runs CUDA tensors, got {device_type} tensors"
    return None


@torch.compiler.assume_constant_result
def select_backend(op: str, device_type: str) -> str:
    """The backend that runs ``op`` on ``device_type`` tensors (a constant under torch.compile)."""
    forced = forced_backend()
    if forced is not None:
        reason = unavailable_reason(forced, device_type)
        if reason is not None:
            raise BackendUnavailableError(f"deltakern.{op}: backend {forced!r} is forced but unavailable: {reason}")
        return forced
    for name in _AUTO_ORDER.get(device_type, ("reference",)):
        if unavailable_reason(name, device_type) is None:
            return name
    return "reference"


def availability(device_type: str) -> dict[str, str]:
    """``{backend: "available" or the reason it is not}`` for tensors on ``device_type``."""
    return {name: unavailable_reason(name, device_type) or "available" for name in BACKENDS}
