"""Triton device functions shared by the GEMM kernels: routing a program to its rows, unpacking and
dequantizing one weight tile in registers, the multiply-accumulate step and the activations (gated: GLU of a
gate and an up tile; non-gated: a function of the up tile alone).
"""

import triton
import triton.language as tl


@triton.jit
def route_rows(
    pid_m,
    topk_ptr,  # [P] expert id of every pair (direct path)
    e2g_ptr,  # [E] int32 global id of every expert, -1 when not packed
    sorted_ptr,  # [max_blocks * BLOCK_M] int32 pair ids by expert (sorted path)
    bstart_ptr,  # [num_global + 1] int32 first block of every global expert
    slot_ptr,  # [num_global] int32 slot in this launch's format group, -1 when absent
    gid_lo,
    gid_hi,
    num_global,  # packed experts of the layer (runtime: differs between layers)
    P,
    GLOBAL_P2: tl.constexpr,  # power of two >= num_global
    DIRECT: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """-> (slot (scalar, -1: nothing to do), pair ids [BLOCK_M], row valid [BLOCK_M]) of program pid_m."""
    if DIRECT:  # one pair per program (BLOCK_M == 1), expert read straight from top_k_index
        pairs = pid_m + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        e = tl.load(topk_ptr + pid_m).to(tl.int32)
        gid = tl.load(e2g_ptr + e)
        valid = pairs < P
    else:  # block pid_m of this launch's expert range
        b_lo = tl.load(bstart_ptr + gid_lo)
        b_hi = tl.load(bstart_ptr + gid_hi)
        b = b_lo + pid_m
        gi = tl.arange(0, GLOBAL_P2)
        starts = tl.load(bstart_ptr + gi, mask=gi < num_global, other=0x7FFFFFFF)  # [GLOBAL_P2]
        gid = tl.sum((starts <= b).to(tl.int32), axis=0) - 1  # last expert starting at or before b
        gid = tl.where(b < b_hi, gid, -1)
        rows = b * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        pairs = tl.load(sorted_ptr + rows, mask=rows < b_hi * BLOCK_M, other=P)  # [BLOCK_M]
        valid = pairs < P
    slot = tl.load(slot_ptr + tl.maximum(gid, 0))
    slot = tl.where(gid >= 0, slot, -1)
    return slot, pairs, valid


@triton.jit
def unpack_codes(
    qw_ptr,  # this expert's qweight [KW, N] int32 (packing.py bit stream along K)
    k0,
    offs_n,  # [BLOCK_N]
    mask_n,  # [BLOCK_N]
    KW,
    N,
    BITS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Codes [BLOCK_K, BLOCK_N] int32 of input channels k0 .. k0+BLOCK_K-1; every word is loaded once."""
    if BITS == 3:  # 32 codes = 3 words; codes 10 and 21 of each triple straddle two words
        NSB: tl.constexpr = BLOCK_K // 32
        row = (k0 // 32) * 3 + tl.arange(0, NSB) * 3  # [NSB] first word of each triple
        cols = offs_n[None, :]  # [1, BLOCK_N]
        w0 = tl.load(qw_ptr + row[:, None] * N + cols, mask=(row < KW)[:, None] & mask_n[None, :], other=0)
        w1 = tl.load(
            qw_ptr + (row + 1)[:, None] * N + cols, mask=(row + 1 < KW)[:, None] & mask_n[None, :], other=0
        )
        w2 = tl.load(
            qw_ptr + (row + 2)[:, None] * N + cols, mask=(row + 2 < KW)[:, None] & mask_n[None, :], other=0
        )
        w0 = w0.to(tl.uint32, bitcast=True)[:, None, :]  # [NSB, 1, BLOCK_N]
        w1 = w1.to(tl.uint32, bitcast=True)[:, None, :]
        w2 = w2.to(tl.uint32, bitcast=True)[:, None, :]
        j = tl.arange(0, 32)
        word = ((j * 3) // 32)[None, :, None]  # [1, 32, 1] word of code j's low bit
        shift = ((j * 3) % 32).to(tl.uint32)[None, :, None]  # [1, 32, 1]
        lo = tl.where(word == 0, w0, tl.where(word == 1, w1, w2))  # [NSB, 32, BLOCK_N]
        hi = tl.where(word == 0, w1, w2)  # [NSB, 32, BLOCK_N] next word (used only by straddling codes)
        c = ((lo >> shift) | ((hi << (31 - shift)) << 1)) & 7  # two shifts: never shift by 32
    else:  # 2, 4, 8 bits: PER codes per word, none straddles
        PER: tl.constexpr = 32 // BITS
        ROWS: tl.constexpr = BLOCK_K // PER
        row = k0 // PER + tl.arange(0, ROWS)  # [ROWS]
        w = tl.load(
            qw_ptr + row[:, None] * N + offs_n[None, :], mask=(row < KW)[:, None] & mask_n[None, :], other=0
        )  # [ROWS, BLOCK_N]
        w = w.to(tl.uint32, bitcast=True)
        shift = (tl.arange(0, PER) * BITS).to(tl.uint32)  # [PER]
        c = (w[:, None, :] >> shift[None, :, None]) & ((1 << BITS) - 1)  # [ROWS, PER, BLOCK_N]
    return tl.reshape(c, (BLOCK_K, BLOCK_N)).to(tl.int32)  # k = word * PER + position in word


@triton.jit
def weight_tile(
    qw_ptr,  # [KW, N] int32, this expert
    sc_ptr,  # [G, N] float16
    qz_ptr,  # [G, N] uint8 (unused when SYM)
    gi_ptr,  # [K] int32 g_idx (unused without ACT_ORDER)
    k0,
    offs_n,  # [BLOCK_N]
    mask_n,  # [BLOCK_N]
    K,
    KW,
    N,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    SYM: tl.constexpr,
    ACT_ORDER: tl.constexpr,
    SCALE_AFTER: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    W_DTYPE: tl.constexpr,
):
    """-> (w [BLOCK_K, BLOCK_N] W_DTYPE, s [BLOCK_N] float32).

    SCALE_AFTER (the tile lies inside one group: GROUP % BLOCK_K == 0, no act-order): w = code - zero,
    exact in fp16/bf16, and the caller multiplies the tile's partial product by s. Otherwise w is the
    dequantized weight (code - zero[g(k)]) * scale[g(k)] with g(k) = k // GROUP or g_idx[k], and s = 1.
    """
    codes = unpack_codes(qw_ptr, k0, offs_n, mask_n, KW, N, BITS, BLOCK_K, BLOCK_N)  # [BLOCK_K, BLOCK_N]
    if SCALE_AFTER:
        g = k0 // GROUP
        s = tl.load(sc_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)  # [BLOCK_N]
        if SYM:
            w = (codes - (1 << (BITS - 1))).to(W_DTYPE)
        else:
            z = tl.load(qz_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.int32)  # [BLOCK_N]
            w = (codes - z[None, :]).to(W_DTYPE)
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        mask_k = offs_k < K
        if ACT_ORDER:
            g = tl.load(gi_ptr + offs_k, mask=mask_k, other=0)  # [BLOCK_K]
        else:
            g = offs_k // GROUP
        m = mask_k[:, None] & mask_n[None, :]
        gs = tl.load(sc_ptr + g[:, None] * N + offs_n[None, :], mask=m, other=0.0).to(tl.float32)
        if SYM:
            w = ((codes - (1 << (BITS - 1))).to(tl.float32) * gs).to(W_DTYPE)
        else:
            z = tl.load(qz_ptr + g[:, None] * N + offs_n[None, :], mask=m, other=0).to(tl.int32)
            w = ((codes - z).to(tl.float32) * gs).to(W_DTYPE)
        s = tl.full([BLOCK_N], 1.0, tl.float32)
    return w, s


@triton.jit
def accumulate(acc, a, w, s, USE_DOT: tl.constexpr, SCALE_AFTER: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] float32 += (a [BLOCK_M, BLOCK_K] @ w [BLOCK_K, BLOCK_N]) * s [BLOCK_N]."""
    if USE_DOT:
        part = tl.dot(a, w, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N] float32
    else:  # a handful of rows (direct path): broadcast multiply and reduce, all in float32
        part = tl.sum(a.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    if SCALE_AFTER:
        acc += part * s[None, :]
    else:
        acc += part
    return acc


@triton.jit
def glu(gate, up, ACT: tl.constexpr, alpha, limit):
    """Canonical activations of moequant.arch.base.apply_activation (0: SILU_GLU, 1: GPT_OSS_SWIGLU)."""
    if ACT == 0:
        out = gate * tl.sigmoid(gate) * up
    else:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        out = (up + 1.0) * (gate * tl.sigmoid(gate * alpha))
    return out


@triton.jit
def relu2(up):
    """The non-gated activation of moequant.arch.base.apply_activation (Activation.RELU2): relu(up)^2."""
    r = tl.maximum(up, 0.0)
    return r * r
