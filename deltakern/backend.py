"""Which backend runs an op: forced by ``use_backend``/``DELTAKERN_BACKEND``, else chosen per call.

| backend     | runs on                                                        |
|-------------|----------------------------------------------------------------|
| ``triton``  | CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``    |
| ``cuda``    | CUDA tensors, through the C++/CUDA extension ``deltakern._C``  |
| ``cpu``     | CPU tensors, through the C++ extension ``deltakern._C``        |
| ``reference`` | anything: the pure-PyTorch ground truth                      |

The automatic choice is triton, then cuda, then reference for CUDA tensors, and cpu, then
reference for CPU tensors, skipping a backend that cannot run the call: one that is not
available here, or that does not compute in the call's dtype (:data:`BACKEND_DTYPES`: fp16 on
the CPU runs on ``reference``, as a PEFT model cast to fp16 does in eager PyTorch). A forced
backend that cannot run a call raises (:class:`BackendUnavailableError`, or a ``ValueError``
naming the dtypes it computes in); only the automatic choice falls back.

Under ``torch.compile`` the choice is a trace-time constant, and a change of forced backend
recompiles rather than raising: dynamo guards on the forced backend, so the first call of a
compiled function after ``use_backend(...)`` is entered or left, or ``DELTAKERN_BACKEND`` is
changed, fails its guards and is traced again with the new backend, while calls with an
unchanged backend reuse the graph. Recompiling was chosen over an error because both reads are
guardable (torch 2.14), so compiled code follows the forced backend just as eager code does.
Each distinct forced backend is one more cache entry of the compiled function, counted against
``torch._dynamo.config.recompile_limit``. How:

- :func:`select_backend` reads the forced backend in code dynamo traces and passes it to the
  ``assume_constant_result`` function :func:`_choose`; only the availability probes (the
  native extension, ``importlib.util.find_spec``) are baked in as constants.
- ``use_backend`` sets a :class:`contextvars.ContextVar`. Dynamo traces ``ContextVar.get()``
  and guards on its value, in the calling thread's context, like the variable itself.
- ``DELTAKERN_BACKEND``: dynamo installs no guard when ``os.environ.get`` misses (the
  ``KeyError`` inside ``os._Environ``), but guards ``dict.get`` on a missing key, so while
  compiling :func:`_env_value` reads the dict behind ``os.environ`` with ``.get``.
- A forced backend that cannot run, or an unknown ``DELTAKERN_BACKEND``, raises
  :class:`BackendUnavailableError` or ``ValueError`` from the compiled call as in eager code
  (see :func:`_passed_by_dynamo`), with or without ``fullgraph``; nothing is cached for it.

Where dynamo cannot trace ``ContextVar.get()`` (torch before its ContextVar support), the whole
choice is baked in at trace time as before, and a change of forced backend after compiling
takes effect only after ``torch.compiler.reset()``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from collections.abc import Iterator

import torch

from . import _native

BACKENDS = ("triton", "cuda", "cpu", "reference")
ENV_VAR = "DELTAKERN_BACKEND"
# Dtypes each backend computes in (DESIGN.md, "Op contracts"); reference takes any float dtype.
BACKEND_DTYPES = {
    "triton": (torch.float32, torch.float16, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
    "cpu": (torch.float32, torch.bfloat16, torch.float64),
    "reference": (torch.float64, torch.float32, torch.float16, torch.bfloat16),
}

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


def _env_value() -> str:
    """The raw value of ``DELTAKERN_BACKEND`` ("" if unset), read so that dynamo guards on it."""
    if torch.compiler.is_compiling():
        data = getattr(os.environ, "_data", None)
        if isinstance(data, dict):
            raw = data.get(os.environ.encodekey(ENV_VAR))
            return "" if raw is None else os.environ.decodevalue(raw)
    return os.environ.get(ENV_VAR, "")


def _forced_from(context_name: str | None, env: str) -> str | None:
    if context_name is not None:
        return context_name
    env = env.strip()
    return _check_name(env, ENV_VAR) if env else None


def forced_backend() -> str | None:
    """The backend forced by ``use_backend`` (innermost wins) or ``DELTAKERN_BACKEND``, if any."""
    return _forced_from(_forced.get(), _env_value())


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


def select_backend(op: str, device_type: str, dtype: torch.dtype | None = None) -> str:
    """The backend that runs ``op`` on ``device_type`` tensors of ``dtype`` (None: any dtype; the
    automatic choice then ignores what dtypes a backend computes in).

    Under torch.compile the result is a trace-time constant guarded on the forced backend:
    changing ``use_backend``/``DELTAKERN_BACKEND`` recompiles (see the module docstring).
    """
    if torch.compiler.is_compiling() and not _dynamo_guards_context_vars():
        return _choose_unguarded(op, device_type, dtype)
    # Read here, where dynamo traces the reads and guards on their values; only _choose is
    # assumed constant. The raw values are passed rather than forced_backend()'s result so that
    # an unknown DELTAKERN_BACKEND raises its ValueError from _choose, a plain call at trace
    # time. The environment is not read (so not guarded on) while use_backend overrides it.
    context_name = _forced.get()
    env = _env_value() if context_name is None else ""
    return _choose(op, device_type, dtype, context_name, env, torch.compiler.is_compiling())


@torch.compiler.assume_constant_result
def _dynamo_guards_context_vars() -> bool:
    """Whether dynamo traces ``ContextVar.get()`` and guards on its value (torch 2.14 does;
    earlier versions graph-break on it). Called only while compiling."""
    import torch._dynamo.source  # loaded already: only called while dynamo traces

    return hasattr(torch._dynamo.source, "ContextVarGetSource")


@torch.compiler.assume_constant_result
def _choose_unguarded(op: str, device_type: str, dtype: torch.dtype | None) -> str:
    """select_backend under a dynamo without ContextVar support: all of it a constant."""
    return _choose(op, device_type, dtype, _forced.get(), os.environ.get(ENV_VAR, ""), True)


def _op_unavailable_reason(op: str, name: str, device_type: str) -> str | None:
    """unavailable_reason, and for the extension's backends whether it has ``op``'s kernels: an
    extension built before the op was added loads but lacks them."""
    reason = unavailable_reason(name, device_type)
    if reason is None and name in ("cpu", "cuda") and not hasattr(torch.ops.deltakern, f"{op}_fwd"):
        return (f"deltakern._C has no {op} kernels (built before the op was added); rebuild it: "
                f"pip install --no-build-isolation -e .")
    return reason


@torch.compiler.assume_constant_result
def _choose(op: str, device_type: str, dtype: torch.dtype | None, context_name: str | None, env: str,
            compiling: bool) -> str:
    """select_backend's choice for a given forced backend; a constant under torch.compile."""
    try:
        forced = _forced_from(context_name, env)
        if forced is not None:
            reason = _op_unavailable_reason(op, forced, device_type)
            if reason is not None:
                raise BackendUnavailableError(f"deltakern.{op}: backend {forced!r} is forced but unavailable: {reason}")
            return forced
    except (BackendUnavailableError, ValueError) as error:
        if not compiling:
            raise
        raise _passed_by_dynamo(type(error))(str(error)) from None
    for name in _AUTO_ORDER.get(device_type, ("reference",)):
        if dtype is not None and dtype not in BACKEND_DTYPES[name]:
            continue
        if _op_unavailable_reason(op, name, device_type) is None:
            return name
    return "reference"


@functools.cache
def _passed_by_dynamo(error_type: type[Exception]) -> type[Exception]:
    """A subclass of ``error_type`` (same name) that torch.compile raises to the caller as is.

    Dynamo wraps an exception raised while it traces (as ``_choose`` runs then) in an
    ``InternalTorchDynamoError`` ("please report to PyTorch") unless it is one of a few types of
    its own. ``TorchRuntimeError``, its error for user code that fails while traced, is one; it
    is also not a "soft" failure, which dynamo would answer by graph-breaking (with
    ``fullgraph=False``) and keep graph-breaking there in later compiles of the function.
    """
    try:
        from torch._dynamo.exc import TorchRuntimeError
    except ImportError:  # another torch: the error comes out wrapped, its message unchanged
        return error_type

    class Passed(error_type, TorchRuntimeError):
        def __init__(self, message: str) -> None:
            TorchRuntimeError.__init__(self, message)

    Passed.__name__, Passed.__qualname__ = error_type.__name__, error_type.__qualname__
    Passed.__module__ = error_type.__module__
    return Passed


def availability(device_type: str) -> dict[str, str]:
    """``{backend: "available" or the reason it is not}`` for tensors on ``device_type``."""
    return {name: unavailable_reason(name, device_type) or "available" for name in BACKENDS}
