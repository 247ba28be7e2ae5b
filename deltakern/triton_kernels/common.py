"""What the Triton kernels of every op share: the launcher, the grouped tile walk of the GEMMs,
the padded dot blocks, the dot precision, and :class:`AotSpec`, the form in which each op's module
declares its kernels for ahead-of-time compilation (its ``AOT``, read by ``triton_kernels.aot``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import torch
import triton
import triton.language as tl


def interpreted() -> bool:
    """Whether Triton runs under its interpreter (``TRITON_INTERPRET=1``: CPU tensors, the tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def launch(kernel, grid, *args, interpreter_config: dict, **constexprs):
    """Autotuned launch of ``kernel`` (a ``triton.autotune`` around a JIT function) on a GPU.

    Under TRITON_INTERPRET=1 the JIT function runs once with ``interpreter_config`` instead: the
    interpreter runs each program in numpy, so one small config keeps the tests fast and still
    exercises multi-tile loops and edges.
    """
    if interpreted():
        kernel.fn[grid](*args, **constexprs, **interpreter_config)
    else:
        kernel[grid](*args, **constexprs)


@triton.jit
def grouped_tile(rows, cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of this program, walking GROUP_M row tiles per column sweep."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(rows, BLOCK_ROWS)
    tiles_n = tl.cdiv(cols, BLOCK_COLS)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m.to(tl.int64), pid_n.to(tl.int64)


def block_r(rank: int) -> int:
    """The padded rank block: a power of two, at least 16 (tl.dot's smallest dimension)."""
    return max(16, triton.next_power_of_2(rank))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: TF32 for fp32 only when PyTorch allows it now; 16-bit ignore it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


@dataclasses.dataclass(frozen=True)
class AotSpec:
    """How to compile the kernels of one op ahead of time (``triton_kernels.aot``).

    kernels: name -> (autotuner, flag domains). A flag domain is every value the op's launchers
    pass for one constexpr (``{"CAUSAL": (True, False)}``), the heaviest first (the value with
    the most live state): the autotune-config sweep compiles the first value of every domain.
    signatures: (dtype, flags) -> kernel name -> runtime argument types (``"*fp16"``, ``"i32"``,
    ...); the flags matter where an argument's type depends on one (a per-batch prefix's
    gradient is in the input dtype, a shared one's in fp32).
    variants: every size that changes a kernel's tiles (a rank's padded block, a head dim, ...).
    sweep_variants: the common ones among them (ranks 16 and 64, head dims 64, 96 and 128), at
    which every autotune config is compiled in fp16 and bf16.
    variant_tag: how job ids and report rows name the variant (``r16``, ``d64``).
    variant_constexprs: (kernel name, variant) -> the constexprs the variant sets.
    divisible: a kernel's signature -> the runtime arguments the JIT specialises as multiples of
    16 when a layer's sizes and pointers are aligned (the caching allocator's pointers, sizes
    that are multiples of 16).
    layout_constexprs: (kernel name, dtype, aligned) -> constexprs a launcher derives from the
    element size and the alignment of its tensors (none for most ops).
    """

    kernels: dict
    signatures: Callable[[str, dict], dict]
    variants: tuple
    sweep_variants: tuple
    variant_tag: str
    variant_constexprs: Callable[[str, int], dict]
    divisible: Callable[[dict], tuple]
    layout_constexprs: Callable[[str, str, bool], dict] = lambda kernel, dtype, aligned: {}
