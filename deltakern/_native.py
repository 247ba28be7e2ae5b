"""Loads the optional native extension ``deltakern._C`` and remembers why it is missing."""

from __future__ import annotations

import importlib
from types import ModuleType

C: ModuleType | None
LOAD_ERROR: str | None

try:
    C = importlib.import_module("deltakern._C")
    LOAD_ERROR = None
except (ImportError, OSError) as error:  # not built, or built against another torch
    C = None
    LOAD_ERROR = f"deltakern._C could not be loaded ({type(error).__name__}: {error})"


def has_cpu_kernels() -> bool:
    return C is not None and bool(C.has_cpu_kernels)


def has_cuda_kernels() -> bool:
    return C is not None and bool(C.has_cuda_kernels)


def cuda_archs() -> list[str]:
    return [a for a in C.cuda_archs.split(",") if a] if C is not None else []
