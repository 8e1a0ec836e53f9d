"""Bit packing of group-wise integer weights (the storage format of GPTQ and RTN experts).

Layout, for one (out_features N, in_features K) matrix quantized at `bits` with groups along K:

    qweight [ceil(K * bits / 32), N] int32   K-packed: for each column n, the K codes form one
                                             little-endian bit stream; code k occupies stream bits
                                             [k*bits, (k+1)*bits), word w holds stream bits [32w, 32w+32).
                                             3-bit codes straddle words (identical to GPTQ v1 for 2/3/4/8).
    scales  [G, N] float16                   G = ceil(K / group_size)
    qzeros  [G, N] uint8                     asymmetric only; symmetric zero point is 2**(bits-1)
    g_idx   [K] int32                        only with act-order: group of input channel k
                                             (else group(k) = k // group_size)

    W[n, k] = (code[k, n] - zero[group(k), n]) * scale[group(k), n]

Leading batch dimensions (experts) are allowed everywhere: codes [..., K, N] -> qweight [..., Kw, N].
"""

from __future__ import annotations

import torch


def packed_rows(k: int, bits: int) -> int:
    """Number of int32 words per column for K codes of `bits` bits."""
    return (k * bits + 31) // 32


# Elements of one [..., K, n] column slice. Packing, unpacking and dequantizing work column slice by column
# slice (every output column depends on its input column only), so their int64/float32 temporaries stay
# near 8 MB instead of several copies of the whole matrix.
_SLICE_ELEMS = 1 << 20


def _column_slices(t: torch.Tensor, rows: int) -> list[torch.Tensor] | None:
    """Column slices of t [..., rows', N] bounding rows x n to _SLICE_ELEMS per slice; None when one fits."""
    per_column = max(t[..., :1].numel() // max(t.shape[-2], 1), 1) * rows
    n = t.shape[-1]
    if per_column * n <= _SLICE_ELEMS:
        return None
    width = max(1, _SLICE_ELEMS // per_column)
    return list(torch.split(t, width, dim=-1))


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., K, N] integers in [0, 2**bits) -> qweight [..., ceil(K*bits/32), N] int32."""
    if codes.dim() < 2:
        raise ValueError("pack expects codes of shape [..., K, N]")
    parts = _column_slices(codes, codes.shape[-2])
    if parts is not None:
        return torch.cat([_pack(c, bits) for c in parts], dim=-1)
    return _pack(codes, bits)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    k = codes.shape[-2]
    if int(codes.min()) < 0 or int(codes.max()) >= 1 << bits:
        raise ValueError(f"codes out of range for {bits} bits")
    if 32 % bits == 0 and k % (32 // bits) == 0:
        return _pack_whole_words(codes, bits)
    if bits == 3 and k % 32 == 0:
        return _pack3(codes, k)
    c = codes.to(torch.int64)  # [..., K, N]
    kw = packed_rows(k, bits)
    out = torch.zeros(*c.shape[:-2], kw + 1, c.shape[-1], dtype=torch.int64)  # one spare word for straddles
    pos = torch.arange(k, dtype=torch.int64) * bits  # [K] stream bit offset of each code
    word, shift = pos // 32, pos % 32  # [K]
    lo = (c << shift[:, None]) & 0xFFFFFFFF  # [..., K, N] bits landing in `word`
    hi = c >> (32 - shift[:, None])  # [..., K, N] bits spilling into `word + 1` (0 when none)
    out.index_add_(-2, word, lo)
    out.index_add_(-2, word + 1, hi)
    return _signed(out[..., :kw, :])  # [..., Kw, N]


def _signed(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words held in int64 -> the same bits as int32."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _pack_whole_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """2, 4, 8 bits, K a multiple of 32 / bits: code j of a word at bit j * bits, one word-row of codes at a
    time (temporaries of one [..., Kw, N] slice, not the int64 copies of every code the general path makes)."""
    per = 32 // bits
    c = codes.unflatten(-2, (codes.shape[-2] // per, per))  # [..., Kw, per, N]
    words = c[..., 0, :].to(torch.int64, copy=True)  # [..., Kw, N] (a copy: int64 codes are not written)
    for j in range(1, per):
        words |= c[..., j, :].to(torch.int64) << (j * bits)
    return _signed(words)


def _pack3(codes: torch.Tensor, k: int) -> torch.Tensor:
    """3 bits, K a multiple of 32: 32 codes per 3 words (the inverse of _unpack3); codes 10 and 21 straddle."""
    c = codes.unflatten(-2, (k // 32, 32))  # [..., K/32, 32, N]

    def code(j: int) -> torch.Tensor:
        return c[..., j, :].to(torch.int64, copy=True)  # [..., K/32, N] (int64 codes are not written)

    w0, w1, w2 = code(0), code(11) << 1, code(22) << 2
    for j in range(1, 10):
        w0 |= code(j) << (3 * j)  # codes 0..9: bits 0..29 of word 0
        w1 |= code(11 + j) << (3 * j + 1)  # codes 11..20: bits 1..30 of word 1
        w2 |= code(22 + j) << (3 * j + 2)  # codes 22..31: bits 2..31 of word 2
    w0 |= (code(10) & 3) << 30  # code 10: bits 30, 31 of word 0 and bit 0 of word 1
    w1 |= (code(10) >> 2) | ((code(21) & 1) << 31)  # code 21: bit 31 of word 1 and bits 0, 1 of word 2
    w2 |= code(21) >> 1
    return _signed(torch.stack([w0, w1, w2], dim=-2).flatten(-3, -2))  # [..., 3K/32, N]


def unpack(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """qweight [..., Kw, N] int32 -> codes [..., K, N] uint8 (inverse of `pack`)."""
    parts = _column_slices(qweight, k)
    if parts is not None:
        return torch.cat([_unpack(q, bits, k) for q in parts], dim=-1)
    return _unpack(qweight, bits, k)


def _unpack(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    if bits == 3 and k % 32 == 0 and qweight.shape[-2] * 32 == 3 * k:
        return _unpack3(qweight, k)
    if 32 % bits == 0:  # 2, 4, 8 bits: codes never straddle words, code j of a word sits at bit j * bits
        per, mask = 32 // bits, (1 << bits) - 1
        c = torch.empty(*qweight.shape[:-1], per, qweight.shape[-1], dtype=torch.uint8, device=qweight.device)
        for j in range(per):  # one word-row of codes at a time: int32 temporaries of [..., Kw, N] only
            c[..., j, :] = (qweight >> (j * bits)) & mask  # [..., Kw, N]; the mask drops the sign bits
        return c.flatten(-3, -2)[..., :k, :]  # [..., K, N] uint8
    w = qweight.to(torch.int64) & 0xFFFFFFFF  # [..., Kw, N] unsigned words
    w = torch.cat([w, torch.zeros_like(w[..., :1, :])], dim=-2)  # spare word for straddles
    pos = torch.arange(k, dtype=torch.int64) * bits
    word, shift = pos // 32, pos % 32  # [K]
    lo = w.index_select(-2, word) >> shift[:, None]  # [..., K, N]
    hi = w.index_select(-2, word + 1) << (32 - shift[:, None])  # [..., K, N]
    return ((lo | hi) & ((1 << bits) - 1)).to(torch.uint8)


def _unpack3(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """3-bit codes [..., K, N] uint8 from [..., 3K/32, N] words, 32 codes per 3 words (96 bits): code j sits at
    bit 3j of the three words read as one little-endian number, so codes 10 and 21 straddle two words. Fixed
    shifts in int32 instead of the general path's gathers of int64 words, which move 3x the memory (the
    3-bit quantize pass with the gathers and with the shifts: evals/results/bench_ranks.md,
    evals/results/bench_ranks_run2.md), one code row at a time into the uint8 output (2048 x 2048 codes, one
    thread: 8.3 -> 2.0 ms against a row of [K/32, 10, N] int32 parts per word and a cat)."""
    w0, w1, w2 = qweight.unflatten(-2, (k // 32, 3)).unbind(-2)  # [..., K/32, N] int32 each
    out = torch.empty(
        *qweight.shape[:-2], k // 32, 32, qweight.shape[-1], dtype=torch.uint8, device=qweight.device
    )  # [..., K/32, 32, N]: code j of each 96-bit group in row j
    tmp = torch.empty_like(w0)  # [..., K/32, N] one code row at a time: no [..., K/32, 10, N] temporaries
    for j in range(10):  # codes j, 11 + j, 22 + j at shifts 3j, 3j + 1, 3j + 2 (the masks drop the sign bits)
        for word, row, shift in ((w0, j, 3 * j), (w1, 11 + j, 3 * j + 1), (w2, 22 + j, 3 * j + 2)):
            torch.bitwise_right_shift(word, shift, out=tmp)
            out[..., row, :] = tmp.bitwise_and_(7)
    out[..., 10, :] = ((w0 >> 30) & 3) | ((w1 & 1) << 2)  # code 10: bits 30, 31 of w0 and bit 0 of w1
    out[..., 21, :] = ((w1 >> 31) & 1) | ((w2 & 3) << 1)  # code 21: bit 31 of w1 and bits 0, 1 of w2
    return out.flatten(-3, -2)  # [..., K, N] uint8


def group_index(k: int, group_size: int, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Group of every input channel: [K] int64."""
    if g_idx is not None:
        return g_idx.to(torch.int64)
    return torch.arange(k, dtype=torch.int64) // group_size


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    k: int,
    group_size: int,
    g_idx: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Packed tensors -> W [..., N, K] (out, in) in `dtype`: the reference every kernel is tested against.
    `out`: a [..., N, K] tensor of `dtype` to write W into (a reused buffer), returned."""
    parts = list(_column_parts(qweight, scales, qzeros, k))
    if len(parts) == 1 and out is None:
        return _dequantize(qweight, scales, qzeros, bits, k, group_size, g_idx, dtype)
    if out is None:
        out = torch.empty(*qweight.shape[:-2], qweight.shape[-1], k, dtype=dtype, device=qweight.device)
    for c0, c1, q, s, z in parts:  # each slice straight into the output (no cat copy)
        _dequantize(q, s, z, bits, k, group_size, g_idx, dtype, out[..., c0:c1, :])
    return out  # [..., N, K]


def _column_parts(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None, k: int):
    """(c0, c1, qweight, scales, qzeros) of each column slice c0:c1 (_column_slices: bounded unpack
    temporaries; one part when the whole fits)."""
    c0 = 0
    for q in _column_slices(qweight, k) or [qweight]:
        c1 = c0 + q.shape[-1]
        yield c0, c1, q, scales[..., c0:c1], None if qzeros is None else qzeros[..., c0:c1]
        c0 = c1


def _dequantize(qweight, scales, qzeros, bits, k, group_size, g_idx, dtype, out=None) -> torch.Tensor:
    """W [..., N, K] in dtype, written into `out` when given: the transposed view of _dequantize_t's W^T,
    copied once (the copy from uint8 codes straight into the transposed layout is 2x slower)."""
    wt = torch.empty(*qweight.shape[:-2], k, qweight.shape[-1], dtype=torch.float32, device=qweight.device)
    w = _dequantize_t(qweight, scales, qzeros, bits, k, group_size, g_idx, wt).transpose(
        -1, -2
    )  # [..., N, K]
    return w.to(dtype) if out is None else out.copy_(w)


def dequantize_t(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    k: int,
    group_size: int,
    g_idx: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """W^T [..., K, N] float32, the values of `dequantize` in the packed layout's own order: no transposing
    copy, and a product x @ W^T reads it as it is. Written into `out` [..., K, N] float32 when given."""
    if out is None:
        out = torch.empty(
            *qweight.shape[:-2], k, qweight.shape[-1], dtype=torch.float32, device=qweight.device
        )
    for c0, c1, q, s, z in _column_parts(qweight, scales, qzeros, k):
        _dequantize_t(q, s, z, bits, k, group_size, g_idx, out[..., c0:c1])
    return out


def _dequantize_t(qweight, scales, qzeros, bits, k, group_size, g_idx, out: torch.Tensor) -> torch.Tensor:
    """out [..., K, N] float32 := W^T = (codes - z) * s, the float32 operations of grid.dequant, in place."""
    codes = _unpack(qweight, bits, k)  # [..., K, N] uint8
    if g_idx is None and k % group_size == 0:  # contiguous whole groups: broadcast the grids, same values
        s = scales.to(torch.float32).unsqueeze(-2)  # [..., G, 1, N]
        z = (
            float(1 << (bits - 1)) if qzeros is None else qzeros.to(torch.float32).unsqueeze(-2)
        )  # [..., G, 1, N]
        out.copy_(codes).unflatten(-2, (k // group_size, group_size)).sub_(z).mul_(s)  # [..., G, gs, N]
        return out
    g = group_index(k, group_size, g_idx)  # [K]
    s = scales.to(torch.float32).index_select(-2, g)  # [..., K, N]
    z = (
        float(1 << (bits - 1)) if qzeros is None else qzeros.to(torch.float32).index_select(-2, g)
    )  # [..., K, N]
    return out.copy_(codes).sub_(z).mul_(s)
