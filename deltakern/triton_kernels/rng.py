"""Dropout keep-masks from Philox4x32-10, bit-identical to ``deltakern.reference.philox``.

Element ``e`` (its linear index ``m * cols + k`` in the 2-D view, int64) is kept when lane
``e % 4`` of ``tl.randint4x(seed, e // 4)``, mapped to [0, 1) the way ``tl.rand`` maps
uint32 words, is at least ``p``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# tl.rand's scale for 31-bit magnitudes: the largest float32 with (2**31 - 1) * scale < 1.
_UNIFORM_SCALE = tl.constexpr(4.6566127342e-10)


def philox_seed(seed: int) -> int:
    """The Philox key as the reference reads a Python int seed: its low 64 bits, unsigned."""
    return seed & 0xFFFF_FFFF_FFFF_FFFF


@triton.jit
def dropout_keep(seed, element, p):
    """Bool block: True where ``element`` (int64 block of linear indices) is kept.

    ``seed`` is an integer scalar, ``p`` the float32 drop probability.
    """
    # One Philox call per element, then pick the lane: the mask stays a pure function of the
    # element index whatever the tile shape, which is what makes the backends agree.
    r0, r1, r2, r3 = tl.randint4x(seed, element // 4)
    lane = element % 4
    bits = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    bits = bits.to(tl.int32, bitcast=True)
    folded = tl.where(bits < 0, ~bits, bits)
    uniform = folded.to(tl.float32) * _UNIFORM_SCALE
    return uniform >= p


@triton.jit
def _dropout_keep_mask_kernel(out_ptr, numel, seed, p, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    element = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    tl.store(out_ptr + element, dropout_keep(seed, element, p), mask=element < numel)


def dropout_keep_mask(rows: int, cols: int, p: float, seed: int, device) -> torch.Tensor:
    """Bool ``[rows, cols]`` keep-mask the kernels with dropout draw for ``seed`` and probability ``p``."""
    out = torch.empty(rows, cols, dtype=torch.bool, device=device)
    numel = rows * cols
    block = 1024
    _dropout_keep_mask_kernel[(triton.cdiv(numel, block),)](out, numel, philox_seed(seed), p, BLOCK=block)
    return out
