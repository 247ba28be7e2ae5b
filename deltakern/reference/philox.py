"""Philox4x32-10 dropout masks in pure PyTorch: the ground truth for every backend.

The mapping is DESIGN.md's: element ``e`` of the 2-D ``[M, in]`` view is kept when lane
``e % 4`` of ``philox(seed, counter=e // 4)``, turned into a uniform float as ``tl.rand``
does, is at least ``p``. The 64-bit counter fills Philox's words ``(c0, c1)`` and the
64-bit seed its key ``(k0, k1)``, as ``tl.randint4x`` does for an int64 offset.

uint32 arithmetic is emulated in int64 tensors (products are split in 16-bit halves so
they never overflow), which makes this independent of the C++ and Triton ports it checks.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_UNIFORM_SCALE = 4.6566127342e-10


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of the 64-bit product of constant ``a`` and uint32 ``b``."""
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    prod_lo = a * b_lo  # < 2**48
    prod_hi = a * b_hi  # < 2**48
    hi = (prod_hi + (prod_lo >> 16)) >> 16
    lo = (((prod_hi & 0xFFFF) << 16) + prod_lo) & _MASK32
    return hi, lo


def philox4x32_10(seed: int | torch.Tensor, counter: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Four uint32 words (as int64 tensors) of Philox4x32-10 for each int64 ``counter``. ``seed``
    is an int or a 0-d int64 tensor in [0, 2**63) (the ops' seed tensor, read without ``.item()``
    so torch.compile keeps it in the graph)."""
    if isinstance(seed, int):
        seed &= (1 << 64) - 1
    counter = counter.to(torch.int64)
    c0 = counter & _MASK32
    c1 = (counter >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, seed >> 32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox_uniform(bits: torch.Tensor) -> torch.Tensor:
    """``tl.rand``'s map of uint32 words (int64 tensor) to float32 in [0, 1)."""
    signed = torch.where(bits >= 2**31, bits - 2**32, bits)
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def dropout_keep_mask(seed: int | torch.Tensor, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Bool ``[rows, cols]`` keep-mask of deltakern's dropout for ``seed`` and probability ``p``."""
    numel = rows * cols
    counter = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    # words[c, lane] is element 4c + lane, so the flattened words are in element order.
    bits = torch.stack(philox4x32_10(seed, counter), dim=-1).reshape(-1)[:numel]
    p32 = torch.tensor(p, dtype=torch.float32, device=device)
    return (philox_uniform(bits) >= p32).reshape(rows, cols)
