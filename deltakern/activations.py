"""The adapter activations by name and by code: the one table that Python, Triton and C++ follow.

A code is the index of its name in :data:`ACTIVATIONS` and travels as an int through the op
schemas. The Triton kernels compare their ``ACTIVATION`` constexpr with :data:`CODES`; the C++
``enum class Activation`` (``csrc/include/deltakern/activations.h``) lists the same names in the
same order and exports them as ``deltakern._C.activations``; ``tests/test_activations.py`` fails
when the three disagree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "tanh")
CODES = {name: code for code, name in enumerate(ACTIVATIONS)}


def check_activation(where: str, name) -> str:
    """``name`` if it is one of :data:`ACTIVATIONS`, else a ``ValueError`` naming ``where``."""
    if name not in CODES:
        raise ValueError(f"{where}: unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}")
    return name


def activation_fn(name: str):
    """The eager function of activation ``name`` (one of :data:`ACTIVATIONS`)."""
    return {
        "relu": F.relu,
        "gelu": F.gelu,  # exact: x Φ(x) with the error function
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "silu": F.silu,
        "tanh": torch.tanh,
    }[name]
