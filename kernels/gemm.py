"""The two fused dequant-GEMM kernels of a quantized MoE layer and their launchers.

    gemm1: act[p, n]  = act_fn(x[token(p)] @ W_gate[e]^T + b_gate, x @ W_up[e]^T + b_up)[n]     [P, I]
           non-gated (GATED=False): act[p, n] = act_fn(x[token(p)] @ W_up[e]^T + b_up)[n]      [P, I]
    gemm2: out[p, n]  = w_p * (act[p] @ W_down[e]^T + b_down)[n]                               [P, H] fp32

Grid: axis 0 walks row blocks (sorted path: blocks of the moe_align sort restricted to the launch's
expert range; direct path: one (token, slot) pair per program), axis 1 walks BLOCK_N output columns.
Axis 0 varies fastest, so programs that share a weight tile run together and meet it in L2.
One launch per format group (bits, group size, sym, act-order) and GEMM: a program whose expert is
not in the launch's group returns at once. Weights are unpacked and dequantized in registers
(tiles.py); products accumulate in fp32; the activation (gemm1) and routing weight (gemm2) are
applied in the fp32 epilogue. gemm1's GATED constexpr picks a gated activation (a gate and an up
tile, two accumulators, GLU) or a non-gated one (the I rows of up alone, one accumulator); the other
variant's code is not compiled in. Row offsets into activations are int64 (T x top_k x 2I can pass 2**31).
"""

import torch
import triton
import triton.language as tl

from moequant.arch.base import Activation
from moequant.kernels.backend import launch
from moequant.kernels.layout import PackedMoE, WidthGroup
from moequant.kernels.routing import SortedRouting, max_blocks
from moequant.kernels.tiles import accumulate, glu, relu2, route_rows, weight_tile
from moequant.kernels.tuning import KernelConfig, global_p2, tiles

_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_ACT = {Activation.SILU_GLU: 0, Activation.GPT_OSS_SWIGLU: 1, Activation.RELU2: 2}  # tiles.glu / tiles.relu2
# Integers that differ between layers of one model or between calls (how many experts a layer packs, a
# format group's global-id range, the pairs of a batch) are plain runtime arguments, not specialised on
# (Triton would otherwise key its cache on "== 1" and "multiple of 16"): one compilation per format, path and
# tile serves every layer. GLOBAL_P2 (an arange length) comes from the layer's total expert count, which is
# the same in every layer of a model.
RUNTIME_INTS = ["gid_lo", "gid_hi", "num_global", "P"]


@triton.jit(do_not_specialize=RUNTIME_INTS)
def gemm1_kernel(
    x_ptr,  # [T, K] activations in
    act_ptr,  # [P, I] activations out (x's dtype)
    bias_ptr,  # [E, NW] gate_up bias (HAS_BIAS); NW = 2I gated, I non-gated
    qw_ptr,  # [E_w, KW, NW] int32
    sc_ptr,  # [E_w, G, NW] float16
    qz_ptr,  # [E_w, G, NW] uint8 (not SYM)
    gi_ptr,  # [E_w, K] int32 (ACT_ORDER)
    topk_ptr,  # [P] expert of every pair
    e2g_ptr,  # [E] int32
    sorted_ptr,  # [max_blocks * BLOCK_M] int32
    bstart_ptr,  # [num_global + 1] int32
    slot_ptr,  # [num_global] int32
    eid_ptr,  # [E_w] int32 original expert id of each slot
    gid_lo,
    gid_hi,
    num_global,
    P,
    TOPK,
    K,
    I,
    KW,
    G,
    alpha,
    limit,
    ACT: tl.constexpr,
    GATED: tl.constexpr,  # [gate | up] columns and a GLU; else up alone and a function of it
    HAS_BIAS: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    SYM: tl.constexpr,
    ACT_ORDER: tl.constexpr,
    SCALE_AFTER: tl.constexpr,
    DIRECT: tl.constexpr,
    GLOBAL_P2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    W_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot, pairs, valid = route_rows(
        pid_m, topk_ptr, e2g_ptr, sorted_ptr, bstart_ptr, slot_ptr, gid_lo, gid_hi, num_global, P,
        GLOBAL_P2, DIRECT, BLOCK_M,
    )  # fmt: skip
    if slot < 0:
        return
    if GATED:
        nw = 2 * I  # columns of the fused [gate | up] weight
        up0 = I  # first up column
    else:
        nw = I  # columns of up
        up0 = 0
    slot64 = slot.to(tl.int64)
    qw = qw_ptr + slot64 * KW * nw
    sc = sc_ptr + slot64 * G * nw
    qz = qz_ptr + slot64 * G * nw
    gi = gi_ptr + slot64 * K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output columns; up columns are up0 + offs_n
    mask_n = offs_n < I
    x_rows = x_ptr + (pairs // TOPK).to(tl.int64) * K  # [BLOCK_M] row starts of the pairs' tokens
    if GATED:
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        a = tl.load(x_rows[:, None] + offs_k[None, :], mask=valid[:, None] & (offs_k < K)[None, :], other=0.0)
        if GATED:
            wg, sg = weight_tile(
                qw, sc, qz, gi, k0, offs_n, mask_n, K, KW, nw,
                BITS, GROUP, SYM, ACT_ORDER, SCALE_AFTER, BLOCK_K, BLOCK_N, W_DTYPE,
            )  # fmt: skip
        wu, su = weight_tile(
            qw, sc, qz, gi, k0, offs_n + up0, mask_n, K, KW, nw,
            BITS, GROUP, SYM, ACT_ORDER, SCALE_AFTER, BLOCK_K, BLOCK_N, W_DTYPE,
        )  # fmt: skip
        if GATED:
            acc_g = accumulate(acc_g, a, wg, sg, not DIRECT, SCALE_AFTER, DOT_PRECISION)
        acc_u = accumulate(acc_u, a, wu, su, not DIRECT, SCALE_AFTER, DOT_PRECISION)
    if HAS_BIAS:
        b = bias_ptr + tl.load(eid_ptr + slot).to(tl.int64) * nw
        if GATED:
            acc_g += tl.load(b + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(b + up0 + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if GATED:
        h = glu(acc_g, acc_u, ACT, alpha, limit)  # [BLOCK_M, BLOCK_N] float32
    else:
        h = relu2(acc_u)  # [BLOCK_M, BLOCK_N] float32 (ACT 2, the one non-gated activation the kernels run)
    out = act_ptr + pairs.to(tl.int64)[:, None] * I + offs_n[None, :]
    tl.store(out, h.to(act_ptr.dtype.element_ty), mask=valid[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=RUNTIME_INTS)
def gemm2_kernel(
    act_ptr,  # [P, K] activations in (K = I)
    out_ptr,  # [P, N] float32 weighted expert outputs (N = H)
    wts_ptr,  # [P] routing weight of every pair
    bias_ptr,  # [E, N] down bias (HAS_BIAS)
    qw_ptr,  # [E_w, KW, N] int32
    sc_ptr,  # [E_w, G, N] float16
    qz_ptr,  # [E_w, G, N] uint8 (not SYM)
    gi_ptr,  # [E_w, K] int32 (ACT_ORDER)
    topk_ptr,
    e2g_ptr,
    sorted_ptr,
    bstart_ptr,
    slot_ptr,
    eid_ptr,
    gid_lo,
    gid_hi,
    num_global,
    P,
    K,
    N,
    KW,
    G,
    HAS_BIAS: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    SYM: tl.constexpr,
    ACT_ORDER: tl.constexpr,
    SCALE_AFTER: tl.constexpr,
    DIRECT: tl.constexpr,
    GLOBAL_P2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    W_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot, pairs, valid = route_rows(
        pid_m, topk_ptr, e2g_ptr, sorted_ptr, bstart_ptr, slot_ptr, gid_lo, gid_hi, num_global, P,
        GLOBAL_P2, DIRECT, BLOCK_M,
    )  # fmt: skip
    if slot < 0:
        return
    slot64 = slot.to(tl.int64)
    qw = qw_ptr + slot64 * KW * N
    sc = sc_ptr + slot64 * G * N
    qz = qz_ptr + slot64 * G * N
    gi = gi_ptr + slot64 * K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_n = offs_n < N
    pairs64 = pairs.to(tl.int64)
    a_rows = act_ptr + pairs64 * K  # [BLOCK_M]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        a = tl.load(a_rows[:, None] + offs_k[None, :], mask=valid[:, None] & (offs_k < K)[None, :], other=0.0)
        w, s = weight_tile(
            qw, sc, qz, gi, k0, offs_n, mask_n, K, KW, N,
            BITS, GROUP, SYM, ACT_ORDER, SCALE_AFTER, BLOCK_K, BLOCK_N, W_DTYPE,
        )  # fmt: skip
        acc = accumulate(acc, a, w, s, not DIRECT, SCALE_AFTER, DOT_PRECISION)
    if HAS_BIAS:
        b = bias_ptr + tl.load(eid_ptr + slot).to(tl.int64) * N
        acc += tl.load(b + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    wt = tl.load(wts_ptr + pairs, mask=valid, other=0.0).to(tl.float32)  # [BLOCK_M]
    acc = acc * wt[:, None]
    out = out_ptr + pairs64[:, None] * N + offs_n[None, :]
    tl.store(out, acc, mask=valid[:, None] & mask_n[None, :])


def _common(group: WidthGroup, packed: PackedMoE, routing: SortedRouting | None, topk, direct: bool, t):
    """Arguments shared by both kernels' launches (tensors for absent inputs are never read)."""
    dummy = group.scales
    num_pairs = topk.numel()
    if direct:
        grid_m = num_pairs
        sorted_ids = bstart = packed.expert_to_global
    else:
        grid_m = max_blocks(num_pairs, group.gid_hi - group.gid_lo, routing.block_m)
        sorted_ids, bstart = routing.sorted_ids, routing.block_start
    tensors = (
        group.qweight,
        group.scales,
        dummy if group.qzeros is None else group.qzeros,
        dummy if group.g_idx is None else group.g_idx,
        topk,
        packed.expert_to_global,
        sorted_ids,
        bstart,
        group.slot_of_global,
        group.expert_ids,
        group.gid_lo,
        group.gid_hi,
        packed.num_global,
        num_pairs,
    )
    const = dict(
        BITS=group.bits,
        GROUP=group.group_size,
        SYM=group.sym,
        ACT_ORDER=group.act_order,
        SCALE_AFTER=t.scale_after,
        DIRECT=direct,
        GLOBAL_P2=global_p2(packed),
        BLOCK_M=t.block_m,
        BLOCK_N=t.block_n,
        BLOCK_K=t.block_k,
        num_warps=t.num_warps,
        num_stages=t.num_stages,
    )
    return grid_m, tensors, const


def _dtypes(x_dtype: torch.dtype, direct: bool) -> dict:
    w_dtype = tl.float32 if direct else _TL_DTYPE[x_dtype]  # direct path multiplies in fp32 (no tl.dot)
    return dict(W_DTYPE=w_dtype, DOT_PRECISION="ieee" if x_dtype == torch.float32 else "tf32")


def gemm1(
    x: torch.Tensor,  # [T, H] contiguous
    act: torch.Tensor,  # [P, I] out, x's dtype
    topk: torch.Tensor,  # [P] expert of every pair
    packed: PackedMoE,
    routing: SortedRouting | None,  # None: direct path
    activation: Activation,
    act_params: dict | None,
    bias: torch.Tensor | None,  # [E, 2I] gated, [E, I] non-gated
    cfg: KernelConfig,
) -> None:
    if activation not in _ACT or activation.gated != packed.gated:
        raise ValueError(
            f"gemm1 runs {[a.value for a in _ACT]} on matching layouts; got {activation.value} on a "
            f"{'gated' if packed.gated else 'non-gated'} layout"
        )
    params = act_params or {}
    k = topk.numel() // x.shape[0]
    direct = routing is None
    for group in packed.gate_up:
        t = tiles(
            direct=direct,
            block_m=0 if direct else routing.block_m,
            n=packed.intermediate,
            group_size=group.group_size,
            act_order=group.act_order,
            fused_glu=activation.gated,
            cfg=cfg,
        )
        grid_m, tensors, const = _common(group, packed, routing, topk, direct, t)
        if grid_m == 0:
            continue
        grid = (grid_m, triton.cdiv(packed.intermediate, t.block_n))
        launch(
            gemm1_kernel, grid,
            x, act, bias if bias is not None else group.scales, *tensors,
            k, packed.hidden, packed.intermediate, group.packed_rows, group.num_groups,
            float(params.get("alpha", 0.0)), float(params.get("limit", 0.0)),
            ACT=_ACT[activation], GATED=activation.gated, HAS_BIAS=bias is not None, **const,
            **_dtypes(x.dtype, direct),
        )  # fmt: skip


def gemm2(
    act: torch.Tensor,  # [P, I]
    out: torch.Tensor,  # [P, H] float32, zero-initialised
    weights: torch.Tensor,  # [P] routing weights
    topk: torch.Tensor,  # [P]
    packed: PackedMoE,
    routing: SortedRouting | None,
    bias: torch.Tensor | None,  # [E, H]
    cfg: KernelConfig,
) -> None:
    direct = routing is None
    for group in packed.down:
        t = tiles(
            direct=direct,
            block_m=0 if direct else routing.block_m,
            n=packed.hidden,
            group_size=group.group_size,
            act_order=group.act_order,
            fused_glu=False,
            cfg=cfg,
        )
        grid_m, tensors, const = _common(group, packed, routing, topk, direct, t)
        if grid_m == 0:
            continue
        grid = (grid_m, triton.cdiv(packed.hidden, t.block_n))
        launch(
            gemm2_kernel, grid,
            act, out, weights, bias if bias is not None else group.scales, *tensors,
            packed.intermediate, packed.hidden, group.packed_rows, group.num_groups,
            HAS_BIAS=bias is not None, **const, **_dtypes(act.dtype, direct),
        )  # fmt: skip
