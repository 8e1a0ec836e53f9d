"""Bit packing (moequant/quantizers/packing.py): bit-exact round trips and agreement with hand-written references."""

from __future__ import annotations

import pytest
import torch
from helpers import direct_dequant, random_codes

from moequant.quantizers.packing import dequantize, pack, packed_rows, unpack

WIDTHS = (2, 3, 4, 8)


def _stream_words(codes_col: list[int], bits: int) -> list[int]:
    """Hand-written reference: one little-endian bit stream, cut into unsigned 32-bit words."""
    stream = 0
    for k, c in enumerate(codes_col):
        stream |= c << (k * bits)
    return [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(packed_rows(len(codes_col), bits))]


def _gptq_v1_pack(intweight: list[int], bits: int) -> list[int]:
    """GPTQ v1 / AutoGPTQ `pack` loop for one column (K a multiple of 32), including its 3-bit straddles."""
    words = [0] * (len(intweight) * bits // 32)
    i = row = 0
    while row < len(words):
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                words[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # bits == 3: 32 codes over 3 words, codes 10 and 21 straddle
            for j in range(i, i + 10):
                words[row] |= intweight[j] << (3 * (j - i))
            i += 10
            words[row] |= (intweight[i] << 30) & 0xFFFFFFFF
            row += 1
            words[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                words[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            words[row] |= (intweight[i] << 31) & 0xFFFFFFFF
            row += 1
            words[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                words[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return words


def _unsigned(qweight: torch.Tensor) -> torch.Tensor:
    return qweight.to(torch.int64) & 0xFFFFFFFF


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("k", [1, 2, 5, 10, 11, 21, 31, 32, 33, 64, 100, 129, 256])
def test_round_trip_bit_exact(bits, k):
    codes = random_codes(k, 7, bits=bits, seed=k)  # [K, N]
    qweight = pack(codes, bits)
    assert qweight.dtype == torch.int32
    assert qweight.shape == (packed_rows(k, bits), 7) == ((k * bits + 31) // 32, 7)
    assert torch.equal(unpack(qweight, bits, k), codes)


@pytest.mark.parametrize("bits", WIDTHS)
def test_round_trip_batched_leading_dims(bits):
    codes = random_codes(2, 3, 45, 5, bits=bits, seed=bits)  # [2, 3, K, N]
    qweight = pack(codes, bits)
    assert qweight.shape == (2, 3, packed_rows(45, bits), 5)
    assert torch.equal(unpack(qweight, bits, 45), codes)
    for a in range(2):  # batching is only a leading dimension: each slice packs the same alone
        for b in range(3):
            assert torch.equal(qweight[a, b], pack(codes[a, b], bits))


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("k", [1, 3, 11, 32, 37, 96])
def test_matches_hand_written_bit_stream(bits, k):
    codes = random_codes(k, 4, bits=bits, seed=100 + k)  # [K, N]
    words = _unsigned(pack(codes, bits))  # [Kw, N]
    for n in range(4):
        assert words[:, n].tolist() == _stream_words(codes[:, n].tolist(), bits)


def test_three_bit_codes_straddle_words():
    # code 10 occupies stream bits 30..32 (word 0 bits 30-31, word 1 bit 0); code 21 bits 63..65
    codes = torch.zeros(32, 1, dtype=torch.uint8)
    codes[10, 0] = 0b101
    codes[21, 0] = 0b011
    words = _unsigned(pack(codes, 3))[:, 0].tolist()
    assert words == [0b01 << 30, (0b1) | (0b1 << 31), 0b01]
    assert torch.equal(unpack(pack(codes, 3), 3, 32), codes)
    # all ones: every bit of the 3 words set, straddles included
    ones = torch.full((32, 1), 7, dtype=torch.uint8)
    assert _unsigned(pack(ones, 3))[:, 0].tolist() == [0xFFFFFFFF] * 3


@pytest.mark.parametrize("bits", WIDTHS)
def test_matches_gptq_v1_packing(bits):
    codes = random_codes(96, 6, bits=bits, seed=7)  # [K, N], K a multiple of 32
    words = _unsigned(pack(codes, bits))
    for n in range(6):
        assert words[:, n].tolist() == _gptq_v1_pack(codes[:, n].tolist(), bits)


def test_gptq_v1_four_bit_nibble_order():
    codes = torch.arange(8, dtype=torch.uint8)[:, None]  # [8, 1]: codes 0..7
    assert _unsigned(pack(codes, 4)).item() == 0x76543210


@pytest.mark.parametrize("bits", WIDTHS)
def test_out_of_range_codes_raise(bits):
    bad = torch.zeros(8, 2, dtype=torch.int64)
    bad[3, 1] = 1 << bits
    with pytest.raises(ValueError):
        pack(bad, bits)
    bad[3, 1] = -1
    with pytest.raises(ValueError):
        pack(bad, bits)
    with pytest.raises(ValueError):
        pack(torch.zeros(8, dtype=torch.int64), bits)


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_dequantize_matches_direct_formula(bits, sym, act_order):
    k, n, gs = 20, 5, 8  # 3 groups, the last partial
    g = torch.Generator().manual_seed(bits)
    codes = random_codes(k, n, bits=bits, seed=bits)
    scales = (torch.rand(3, n, generator=g) + 0.01).to(torch.float16)
    zeros = None if sym else random_codes(3, n, bits=bits, seed=bits + 1)
    g_idx = torch.randint(0, 3, (k,), generator=g, dtype=torch.int32) if act_order else None
    got = dequantize(pack(codes, bits), scales, zeros, bits, k, gs, g_idx)
    assert got.shape == (n, k)
    assert torch.equal(got, direct_dequant(codes, scales, zeros, bits, gs, g_idx))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_column_slicing_changes_no_bit(bits, monkeypatch):
    """Large matrices are packed/unpacked/dequantized in column slices to bound temporaries: same bits."""
    import moequant.quantizers.packing as P

    torch.manual_seed(bits)
    codes = torch.randint(0, 2**bits, (2, 300, 500))  # [E, K, N]
    scales = torch.rand(2, 3, 500) + 0.1  # [E, G, N], group size 128 -> 3 groups
    zeros = torch.randint(0, 2**bits, (2, 3, 500), dtype=torch.uint8)
    whole = P.pack(codes, bits)
    deq = P.dequantize(whole, scales, zeros, bits, 300, 128)
    monkeypatch.setattr(P, "_SLICE_ELEMS", 7 * 300)  # slices of 3 columns (E=2 x K=300 per column)
    assert torch.equal(P.pack(codes, bits), whole)
    assert torch.equal(P.unpack(whole, bits, 300).long(), codes)
    assert torch.equal(P.dequantize(whole, scales, zeros, bits, 300, 128), deq)


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64])
def test_pack_leaves_its_codes_unchanged(bits, dtype):
    """The word-row packers accumulate into copies: codes of any integer dtype come back as they went in."""
    codes = random_codes(2, 64, 9, bits=bits, seed=3).to(dtype)  # [E, K, N], K a multiple of 32
    before = codes.clone()
    assert torch.equal(unpack(pack(codes, bits), bits, 64).to(dtype), before)
    assert torch.equal(codes, before)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_transposed_dequantize_gives_the_same_values_in_the_packed_order(bits, sym, act_order):
    """dequantize_t (what project() multiplies by) gives (code - zero) * scale of every weight, in float32, in
    the codes' own [K, N] order, and dequantize the same transposed; also into a buffer and across the column
    slices that bound the unpack temporaries (1200 columns x K 1024 > 2^20)."""
    from moequant.quantizers.packing import dequantize_t

    g = torch.Generator().manual_seed(bits)
    K, N, gs = 1024, 1200, 64
    codes = torch.randint(0, 2**bits, (2, K, N), dtype=torch.uint8, generator=g)
    q = pack(codes, bits)
    scales = (torch.rand(2, K // gs, N, generator=g) + 0.01).half()
    zeros = None if sym else torch.randint(0, 2**bits, (2, K // gs, N), dtype=torch.uint8, generator=g)
    g_idx = (torch.randperm(K, generator=g) % (K // gs)).int() if act_order else None
    group = (torch.arange(K) // gs) if g_idx is None else g_idx.long()  # [K]
    z = torch.full_like(scales, 2.0 ** (bits - 1), dtype=torch.float32) if sym else zeros.float()
    want_t = (codes.float() - z[:, group]) * scales.float()[:, group]  # [2, K, N] from the codes, no packing
    assert torch.equal(dequantize_t(q, scales, zeros, bits, K, gs, g_idx), want_t)
    assert torch.equal(dequantize(q, scales, zeros, bits, K, gs, g_idx), want_t.transpose(-1, -2))
    out = torch.full((2, K, N), float("nan"))
    assert dequantize_t(q, scales, zeros, bits, K, gs, g_idx, out=out) is out
    assert torch.equal(out, want_t)
