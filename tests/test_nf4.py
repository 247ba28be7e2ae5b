"""deltakern.nf4 against bitsandbytes: the code table, the quantiser's bytes, reading a
bitsandbytes weight in place, and dequantisation bit for bit."""

from __future__ import annotations

import pytest
import torch

from deltakern.nf4 import BLOCKSIZES, NF4_CODE, NF4Weight, bnb_linear4bit, dequantize_nf4, dynamic_map, quantize_nf4

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional

# in = 100 and 1000 (blocks span rows), out = 1, 7, 129 (odd numbers of values), and a square layer.
SHAPES = [(7, 100), (1, 1000), (129, 1000), (33, 17), (64, 64)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05).to(dtype)


def test_code_table_is_bitsandbytes_value_by_value():
    theirs = F.get_4bit_type("nf4", device="cpu")
    assert NF4_CODE.dtype == theirs.dtype == torch.float32
    for i in range(16):
        assert NF4_CODE[i].item() == theirs[i].item(), i


def test_dynamic_map_is_bitsandbytes():
    assert torch.equal(dynamic_map(), F.create_dynamic_map())


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantiser_bytes_and_absmax_equal_bitsandbytes(shape, dtype, blocksize):
    w = weight(shape, dtype)
    packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    ours = quantize_nf4(w, blocksize)
    assert torch.equal(ours.packed, packed.reshape(-1))
    assert torch.equal(ours.absmax, state.absmax)
    assert ours.shape == shape and ours.blocksize == blocksize and ours.dtype == dtype


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dequantise_bitsandbytes_weight_bit_for_bit(shape, blocksize, out_dtype):
    for nested in (False, True):
        w = weight(shape, torch.float32, seed=blocksize)
        packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=nested)
        state.dtype = out_dtype
        param = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, bnb_quantized=True)
        ours = NF4Weight.from_bnb(param)
        assert ours.nested == nested
        assert ours.packed.data_ptr() == packed.data_ptr(), "read in place, not copied"
        assert torch.equal(ours.dequantize(out_dtype), portable_dequantize(packed, state)), (nested, out_dtype)
        if shape[1] >= blocksize or not has_avx512():
            assert torch.equal(ours.dequantize(out_dtype), F.dequantize_4bit(packed, state)), (nested, out_dtype)


def portable_dequantize(packed, state):
    """bitsandbytes' own dequantisation in plain torch, the one ``dequantize_4bit`` runs on CPUs
    without AVX-512. On AVX-512 CPUs bitsandbytes 0.50 runs a native kernel that misreads rows
    shorter than a block (64x64 at blocksize 128: 3540 of 4096 values differ, max error 1.65
    against 0.44 for this reading), so the test compares against this path there."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return _dequantize_4bit_compute(packed.reshape(-1), absmax.float(), state.code, state.blocksize, state.shape,
                                    state.dtype)


def has_avx512() -> bool:
    from bitsandbytes.backends.cpu.ops import _has_avx512

    return _has_avx512


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nested_quantiser_matches_bitsandbytes_but_for_its_approximate_search(dtype):
    """Scales and offset are identical; an absmax code may differ by a few entries of the 8-bit
    map where bitsandbytes' bucketed search misses the nearest entry (documented in nf4.py)."""
    w = weight((128, 1000), dtype)  # whole blocks of 32 (4000 of them: 16 nested blocks)
    packed, state = F.quantize_4bit(w, blocksize=32, quant_type="nf4", compress_statistics=True)
    ours = quantize_nf4(w, 32, nested=True)
    assert torch.equal(ours.packed, packed.reshape(-1))
    assert torch.equal(ours.offset, state.offset)
    assert torch.equal(ours.nested_absmax, state.state2.absmax)
    assert torch.equal(ours.nested_code, state.state2.code)
    differ = ours.absmax != state.absmax
    assert differ.float().mean() < 0.005
    assert ((ours.absmax.int() - state.absmax.int())[differ].abs() <= 3).all()
    # and ours is the nearest code: never further from the value than bitsandbytes' choice
    raw = w.float().reshape(-1, 32).abs().amax(1)
    centred = raw - raw.mean()
    scale = ours.nested_absmax.repeat_interleave(256)[: centred.numel()]
    mine = (ours.nested_code[ours.absmax.long()] * scale - centred).abs()
    theirs = (ours.nested_code[state.absmax.long()] * scale - centred).abs()
    assert (mine <= theirs).all()


def test_dequantise_round_trip_error_is_within_half_a_step():
    w = weight((129, 1000), torch.float32)
    q = quantize_nf4(w, 64)
    err = (q.dequantize(torch.float32) - w).abs().reshape(-1)
    steps = (NF4_CODE[1:] - NF4_CODE[:-1]).max()
    absmax = q.absmax.repeat_interleave(64)[: err.numel()]
    assert (err <= steps / 2 * absmax + 1e-7).all()


def test_dequantize_nf4_function_matches_the_class():
    q = quantize_nf4(weight((7, 100), torch.float32), 32)
    assert torch.equal(dequantize_nf4(q.packed, q.absmax, 32, (7, 100), torch.bfloat16), q.dequantize(torch.bfloat16))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda q: NF4Weight(q.packed.float(), q.absmax, q.shape, 64), "packed must be a uint8 tensor"),
        (lambda q: NF4Weight(q.packed, q.absmax, q.shape, 128), "absmax has 11 values, a (7, 100) weight in blocks of 128 has 6 (blocksize mismatch?)"),
        (lambda q: NF4Weight(q.packed, q.absmax, q.shape, 48), "blocksize must be one of"),
        (lambda q: NF4Weight(q.packed[:-1], q.absmax, q.shape, 64), "packed holds 349 bytes, a (7, 100) weight needs 350"),
        (lambda q: NF4Weight(q.packed, q.absmax.half(), q.shape, 64), "absmax must be torch.float32"),
        (lambda q: NF4Weight(q.packed, q.absmax, q.shape, 64, offset=torch.tensor(0.0)), "nested quant state needs offset"),
        (lambda q: NF4Weight.from_bnb(torch.zeros(7, 100)), "expected a quantised bitsandbytes Params4bit with a quant_state"),
        (lambda q: quantize_nf4(torch.zeros(3, 4, 5)), "weight must be a 2-D"),
        (lambda q: quantize_nf4(torch.zeros(3, 4, dtype=torch.float64)), "weight must be fp32, bf16 or fp16"),
    ],
    ids=["packed-dtype", "blocksize-mismatch", "blocksize", "packed-size", "absmax-dtype", "nested-partial",
         "not-quantised", "3d", "fp64"],
)
def test_bad_weights_raise_naming_what_is_wrong(make, message):
    q = quantize_nf4(weight((7, 100), torch.float32), 64)
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        make(q)


def test_fp4_is_refused():
    packed, state = F.quantize_4bit(weight((7, 100), torch.float32), quant_type="fp4")
    param = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, bnb_quantized=True)
    with pytest.raises(NotImplementedError, match="only quant_type 'nf4'"):
        NF4Weight.from_bnb(param)


def test_every_bitsandbytes_blocksize_is_accepted():
    assert BLOCKSIZES == (32, 64, 128, 256, 512, 1024, 2048, 4096)


@pytest.mark.parametrize("in_features", [176, 32])
def test_reference_linear4bit_computes_with_the_nf4_weight(in_features):
    """bnb_linear4bit, the QLoRA reference, on rows that are not whole blocks of 64 (where
    bitsandbytes' AVX-512 kernel misreads them): its output is x @ W_nf4.T + b."""
    torch.manual_seed(0)
    dense = torch.nn.Linear(in_features, 64)
    layer = bnb_linear4bit(dense)
    x = torch.randn(3, in_features)
    expected = x @ NF4Weight.from_bnb(layer.weight).dequantize(torch.float32).t() + dense.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
