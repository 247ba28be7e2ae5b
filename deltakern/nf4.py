"""4-bit NormalFloat (NF4) weights, bit-compatible with bitsandbytes.

The format (bitsandbytes' ``quantize_4bit(..., quant_type="nf4")``): the weight ``[out, in]`` is
flattened row-major and cut into blocks of ``blocksize`` values (32 ... 4096; the last block may be
short, and a block may span two rows). Each block keeps its absolute maximum ``absmax`` (fp32);
each value becomes the index of the nearest entry of :data:`NF4_CODE` after division by its
block's absmax. Two indices share a byte, the even element in the high nibble; an odd element
count pads the last low nibble with the code of 0. Element ``i`` reads back as the fp32 product
``NF4_CODE[nibble(i)] * absmax[i // blocksize]``, rounded to the compute dtype.

With nested ("double") quantisation the absmax vector is itself stored in 8 bits: its mean
``offset`` is subtracted and the rest quantised blockwise (blocks of 256) on bitsandbytes'
dynamic 8-bit map (:func:`dynamic_map`), with one fp32 scale per block.

:class:`NF4Weight` holds one such weight; :func:`quantize_nf4` makes one without bitsandbytes
(byte-identical to ``bitsandbytes.functional.quantize_4bit`` on the CPU), and
:meth:`NF4Weight.from_bnb` reads a bitsandbytes ``Params4bit`` without requantising it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# The 16 NF4 levels: quantiles of N(0, 1) normalised to [-1, 1], with an exact 0 (QLoRA,
# Dettmers et al. 2023, appendix E), as fp32. tests/test_nf4.py checks them against bitsandbytes'.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
NF4_CODE = torch.tensor(NF4_LEVELS, dtype=torch.float32)

# bitsandbytes' 4-bit block sizes; 64 is its default.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# Block size of the nested quantisation of absmax (bitsandbytes' choice).
NESTED_BLOCKSIZE = 256


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (``create_dynamic_map()``): 256 sorted fp32 values.

    For each decade ``10**(e - 6)``, e = 0..6, the midpoints of ``2**e + 1`` evenly spaced points
    on [0.1, 1] scaled by the decade, with both signs; then 0 and 1, zero-padded to 256 entries.
    """
    values: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        decade = 10 ** (e - 6)
        values += (decade * mids).tolist() + (-decade * mids).tolist()  # products in fp32, as bitsandbytes
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def _check_blocksize(blocksize) -> int:
    if isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
        raise ValueError(f"deltakern.nf4: blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    return int(blocksize)


@dataclass
class NF4Weight:
    """An NF4-quantised ``[out, in]`` weight (see the module docstring for the format).

    packed: uint8 ``[ceil(out * in / 2)]``, two codes a byte, high nibble first.
    absmax: fp32 ``[ceil(out * in / blocksize)]``; or, nested, uint8 codes of ``absmax - offset``
        on :func:`dynamic_map` in blocks of 256.
    shape: ``(out, in)``. blocksize: values per absmax block. dtype: the dtype it was quantised
        from (what :meth:`dequantize` returns by default).
    offset, nested_absmax, nested_code: the nested quantisation's fp32 mean, per-256-block scales
        ``[ceil(blocks / 256)]`` and 256-value map; None when absmax is stored in fp32.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, int]
    blocksize: int = 64
    dtype: torch.dtype = torch.float32
    offset: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        self.blocksize = _check_blocksize(self.blocksize)
        if len(self.shape) != 2 or min(self.shape) < 1:
            raise ValueError(f"deltakern.nf4: shape must be (out, in) with both >= 1, got {self.shape}")
        numel = self.shape[0] * self.shape[1]
        if not isinstance(self.packed, torch.Tensor) or self.packed.dtype != torch.uint8:
            got = self.packed.dtype if isinstance(self.packed, torch.Tensor) else type(self.packed).__name__
            raise ValueError(f"deltakern.nf4: packed must be a uint8 tensor of NF4 codes, got {got}")
        if self.packed.numel() != (numel + 1) // 2:
            raise ValueError(
                f"deltakern.nf4: packed holds {self.packed.numel()} bytes, a {self.shape} weight needs "
                f"{(numel + 1) // 2}"
            )
        blocks = math.ceil(numel / self.blocksize)
        if self.absmax.numel() != blocks:
            raise ValueError(
                f"deltakern.nf4: absmax has {self.absmax.numel()} values, a {self.shape} weight in blocks of "
                f"{self.blocksize} has {blocks} (blocksize mismatch?)"
            )
        nested = (self.offset, self.nested_absmax, self.nested_code)
        if any(t is None for t in nested) and any(t is not None for t in nested):
            raise ValueError("deltakern.nf4: a nested quant state needs offset, nested_absmax and nested_code together")
        want = torch.uint8 if self.nested else torch.float32
        if self.absmax.dtype != want:
            raise ValueError(
                f"deltakern.nf4: absmax must be {want} {'(nested codes)' if self.nested else ''}, got {self.absmax.dtype}"
            )
        if self.nested and self.nested_absmax.numel() != math.ceil(blocks / NESTED_BLOCKSIZE):
            raise ValueError(
                f"deltakern.nf4: nested_absmax has {self.nested_absmax.numel()} values, {blocks} absmax codes in "
                f"blocks of {NESTED_BLOCKSIZE} need {math.ceil(blocks / NESTED_BLOCKSIZE)}"
            )
        self.packed = self.packed.reshape(-1)

    @property
    def nested(self) -> bool:
        return self.offset is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def absmax_fp32(self) -> torch.Tensor:
        """The fp32 absmax per block ``[blocks]``, decoded when nested exactly as bitsandbytes
        decodes it (``nested_code[c] * nested_absmax[i // 256]``, then ``+ offset``, in fp32)."""
        if not self.nested:
            return self.absmax
        codes = self.absmax.reshape(-1).long()
        scales = self.nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[: codes.numel()]
        return self.nested_code.to(codes.device)[codes] * scales + self.offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``[out, in]`` weight in ``dtype`` (default: the dtype it came from), equal
        bit for bit to ``bitsandbytes.functional.dequantize_4bit``."""
        return dequantize_nf4(self.packed, self.absmax_fp32(), self.blocksize, self.shape, dtype or self.dtype)

    def to(self, device) -> NF4Weight:
        """A copy on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4Weight(move(self.packed), move(self.absmax), self.shape, self.blocksize, self.dtype,
                         move(self.offset), move(self.nested_absmax), move(self.nested_code))

    @property
    def nbytes(self) -> int:
        """Bytes the quantised weight occupies (codes, scales and the nested state)."""
        tensors = (self.packed, self.absmax, self.offset, self.nested_absmax, self.nested_code)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @classmethod
    def from_bnb(cls, weight, quant_state=None) -> NF4Weight:
        """The NF4 weight of a bitsandbytes ``Params4bit`` (or ``Linear4bit.weight``), sharing its
        storage (no requantisation, no copy of the codes). ``quant_state``: the state to read
        instead of ``weight.quant_state``, for a weight that lost it (FSDP2 makes the packed codes
        a plain parameter; ``Linear4bit.quant_state`` keeps a copy).

        Raises ValueError when it is not NF4 (FP4, or not quantised yet) or lacks its quant state.
        """
        state = quant_state if quant_state is not None else getattr(weight, "quant_state", None)
        if state is None:
            raise ValueError(
                f"deltakern.nf4: expected a quantised bitsandbytes Params4bit with a quant_state, got "
                f"{type(weight).__name__} without one (is the model on the device that quantises it?)"
            )
        if state.quant_type != "nf4":
            raise NotImplementedError(f"deltakern.nf4: only quant_type 'nf4' is supported, got {state.quant_type!r}")
        if getattr(state, "packing_format_for_cpu", False):
            raise ValueError(
                "deltakern.nf4: this Params4bit is in bitsandbytes' AVX512-BF16 CPU inference layout "
                "(quant_state.packing_format_for_cpu), not the NF4 format; bitsandbytes restores the format "
                "when it saves the layer (Linear4bit.state_dict()), and deltakern.patch does so for the "
                "layers it routes")
        data = weight.data if isinstance(weight, torch.Tensor) else weight
        packed = data.view(torch.uint8).reshape(-1) if data.dtype != torch.uint8 else data.reshape(-1)
        shape = tuple(state.shape)
        if len(shape) != 2:
            raise ValueError(f"deltakern.nf4: expected a 2-D [out, in] quantised weight, got shape {shape}")
        if state.nested:
            s2 = state.state2
            if s2.blocksize != NESTED_BLOCKSIZE:
                raise NotImplementedError(
                    f"deltakern.nf4: nested absmax in blocks of {s2.blocksize}; bitsandbytes writes {NESTED_BLOCKSIZE}"
                )
            return cls(packed, state.absmax, shape, state.blocksize, state.dtype,
                       offset=state.offset.float(), nested_absmax=s2.absmax.float(), nested_code=s2.code.float())
        return cls(packed, state.absmax.float(), shape, state.blocksize, state.dtype)


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, shape, dtype: torch.dtype) -> torch.Tensor:
    """Dense ``[out, in]`` weight of packed NF4 codes ``[ceil(out*in/2)]`` and fp32 ``absmax``
    ``[ceil(out*in/blocksize)]``: ``NF4_CODE[nibble] * absmax`` in fp32, rounded to ``dtype``.

    The reference every backend's dequantisation is tested against (byte-identical to
    bitsandbytes' ``dequantize_4bit``)."""
    out_features, in_features = shape
    numel = out_features * in_features
    flat = packed.reshape(-1)
    nibbles = torch.stack((flat >> 4, flat & 0xF), dim=1).reshape(-1)[:numel].long()
    values = NF4_CODE.to(packed.device)[nibbles]
    scales = absmax.reshape(-1).repeat_interleave(blocksize)[:numel]
    return (values * scales).reshape(out_features, in_features).to(dtype)


def _nearest_nf4(scaled: torch.Tensor) -> torch.Tensor:
    """Index of the nearest NF4 level of each value in [-1, 1]; a tie goes to the lower level."""
    code = NF4_CODE.to(scaled.device)
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints, out_int32=True)


def _quantize_blockwise_8bit(values: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantisation of a 1-D fp32 tensor on a sorted 256-value map: per block,
    divide by the block's absolute maximum and take the nearest map entry (the lower one on a
    tie). Returns (uint8 codes, fp32 scales).

    NOTE bitsandbytes' CPU ``quantize_blockwise`` finds the entry with an approximate bucketed
    search and picks a neighbour of the nearest entry for about 0.15% of values (measured on
    100k normal values; one to three entries away, where the map is densest). Scales and offset are
    identical; those codes are the one place this quantiser's output differs from bitsandbytes'.
    Reading and dequantising a bitsandbytes nested state is exact."""
    n = values.numel()
    blocks = math.ceil(n / blocksize)
    padded = torch.nn.functional.pad(values, (0, blocks * blocksize - n))
    scales = padded.reshape(blocks, blocksize).abs().amax(dim=1)
    normed = (padded.reshape(blocks, blocksize) / scales[:, None]).reshape(-1)[:n]
    below = (torch.searchsorted(code, normed, right=True) - 1).clamp(0, code.numel() - 1)
    above = (below + 1).clamp(max=code.numel() - 1)
    closer_above = (normed - code[above]).abs() < (normed - code[below]).abs()
    nearest = torch.where(closer_above, above, below)
    # An all-zero block (0 / 0) gets code 0, as bitsandbytes gives it; it decodes to 0 either way.
    return torch.where(normed.isnan(), 0, nearest).to(torch.uint8), scales


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, nested: bool = False) -> NF4Weight:
    """Quantise a dense ``[out, in]`` weight to NF4, byte for byte as bitsandbytes'
    ``quantize_4bit(weight, blocksize, compress_statistics=nested, quant_type="nf4")`` does on
    the CPU (codes, absmax and, nested, the absmax codes, scales and offset).

    Args:
        weight: ``[out, in]`` fp32, bf16 or fp16 (any device).
        blocksize: values per absmax block, one of :data:`BLOCKSIZES`.
        nested: also quantise absmax to 8 bits (bitsandbytes' ``compress_statistics``).
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"deltakern.quantize_nf4: weight must be a 2-D [out, in] tensor, got {getattr(weight, 'shape', type(weight))}")
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"deltakern.quantize_nf4: weight must be fp32, bf16 or fp16, got {weight.dtype}")
    blocksize = _check_blocksize(blocksize)
    flat = weight.detach().reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    # bitsandbytes scales full blocks by the fp32 reciprocal of absmax (clamped away from 0) and
    # a short last block by division; the rounding differs, so the two paths are kept.
    absmax = flat[:full].reshape(-1, blocksize).abs().amax(dim=1)
    scaled = (flat[:full].reshape(-1, blocksize) * (1.0 / absmax.clamp(min=1e-38))[:, None]).reshape(-1)
    if full < n:
        tail_absmax = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax[None]])
        scaled = torch.cat([scaled, flat[full:] / tail_absmax])
    if n % 2:  # the pad nibble encodes the value 0 (code 7), as bitsandbytes writes it
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    codes = _nearest_nf4(scaled.clamp(-1, 1)).to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    if not nested:
        return NF4Weight(packed, absmax, tuple(weight.shape), blocksize, weight.dtype)
    offset = absmax.mean()
    code = dynamic_map().to(weight.device)
    absmax_codes, nested_absmax = _quantize_blockwise_8bit(absmax - offset, code, NESTED_BLOCKSIZE)
    return NF4Weight(packed, absmax_codes, tuple(weight.shape), blocksize, weight.dtype,
                     offset=offset, nested_absmax=nested_absmax, nested_code=code)


def bnb_linear4bit(dense: torch.nn.Linear, compute_dtype: torch.dtype | None = None,
                   compress_statistics: bool = False):
    """bitsandbytes' NF4 ``Linear4bit`` holding ``dense``'s weight (``[out, in]``) and bias,
    quantised on ``dense``'s device: the reference layer QLoRA is compared against.

    ``compress_statistics=False`` keeps absmax in fp32, so the bytes are :func:`quantize_nf4`'s
    (bitsandbytes' nested absmax may differ in its last bit). bitsandbytes' repacking of the weight
    for its AVX512-BF16 CPU inference kernel is turned off: that path rounds absmax to bf16 and
    asserts shapes in multiples of 32 rows and one block per row, so the reference stays the NF4
    format on every CPU (it only runs in eval mode on inputs without grad). On AVX-512 CPUs the
    process's bitsandbytes dequantises on the CPU with its portable code from then on (see
    :func:`portable_bnb_cpu_dequantize`).
    """
    import bitsandbytes as bnb

    portable_bnb_cpu_dequantize()
    layer = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=dense.bias is not None,
                              compute_dtype=compute_dtype or dense.weight.dtype, quant_type="nf4",
                              compress_statistics=compress_statistics)
    layer.support_avx512bf16_for_cpu = False
    layer.load_state_dict(dense.state_dict())
    return layer.to(dense.weight.device)  # .to quantises


_bnb_cpu_dequantize_is_portable = False


def portable_bnb_cpu_dequantize() -> None:
    """On AVX-512 CPUs, route bitsandbytes' ``dequantize_4bit`` on the CPU to its own portable
    implementation (plain torch, run eagerly), once per process.

    bitsandbytes 0.50's native AVX-512 kernel counts blocks per row (``in // blocksize``), so it
    misreads a weight whose rows are not a whole number of blocks: at blocksize 64, a 64x176 or a
    32x32 layer comes back with errors up to 1.9 against 0.4 for the format (CPUs without AVX-512
    run a scalar kernel that is right). The end-to-end shapes have such rows (FFN 1376 and 176),
    and so do the tests' tiny models, so the references built by :func:`bnb_linear4bit` would
    compute with wrong weights there. bitsandbytes' portable path is the format bit for bit
    (tests/test_nf4.py).
    """
    global _bnb_cpu_dequantize_is_portable
    if _bnb_cpu_dequantize_is_portable or torch.backends.cpu.get_cpu_capability() != "AVX512":
        return
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.functional import get_4bit_type

    # Its torch.compile wrapper (dynamic=False) would compile once per weight shape.
    eager = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)

    def dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype):
        packed = packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)
        return eager(packed.reshape(-1), absmax.float(), get_4bit_type(quant_type, packed.device), blocksize, shape,
                     dtype)

    torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", dequantize_4bit)
    _bnb_cpu_dequantize_is_portable = True
