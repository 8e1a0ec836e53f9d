"""moe_align-style token sorting in three Triton launches, with no host synchronisation (CUDA-graph safe).

    count    grid (chunks,)  per chunk of CHUNK pairs: pairs per global expert       counts [C, GP2]
    offsets  grid (1,)       running sum over chunks -> each chunk's first rank per expert (base),
                             blocks per expert -> block_start; writes the sentinel into padding rows
    scatter  grid (chunks,)  rank of every pair within its expert (cumsum of a one-hot tile)
                             -> sorted_ids[block_start[e] * BLOCK_M + base[c, e] + rank] = pair

Output and ordering as in routing.py (pairs of an expert in ascending order): identical to
`reference.moe_align_reference`.
"""

import torch
import triton
import triton.language as tl

from moequant.kernels.backend import launch
from moequant.kernels.routing import SortedRouting, max_blocks
from moequant.kernels.tuning import next_power_of_2, sort_chunk


@triton.jit(do_not_specialize=["P"])
def count_kernel(topk_ptr, e2g_ptr, counts_ptr, P, CHUNK: tl.constexpr, GLOBAL_P2: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * CHUNK + tl.arange(0, CHUNK)  # [CHUNK] pair ids
    m = offs < P
    e = tl.load(topk_ptr + offs, mask=m, other=0).to(tl.int32)
    gid = tl.load(e2g_ptr + e, mask=m, other=-1)  # [CHUNK] global id, -1: not packed
    gi = tl.arange(0, GLOBAL_P2)
    onehot = (gid[:, None] == gi[None, :]).to(tl.int32)  # [CHUNK, GLOBAL_P2]
    tl.store(counts_ptr + pid * GLOBAL_P2 + gi, tl.sum(onehot, axis=0))


@triton.jit(do_not_specialize=["C", "P", "num_global"])
def offsets_kernel(
    counts_ptr,  # [C, GLOBAL_P2] int32
    base_ptr,  # [C, GLOBAL_P2] int32 out: pairs of expert e in chunks before c
    bstart_ptr,  # [num_global + 1] int32 out
    sorted_ptr,  # [max_blocks * BLOCK_M] int32 out (padding rows only)
    C,
    P,
    num_global,
    GLOBAL_P2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CB: tl.constexpr,
):
    gi = tl.arange(0, GLOBAL_P2)
    run = tl.zeros([GLOBAL_P2], dtype=tl.int32)  # pairs per expert in the chunks seen so far
    for c0 in range(0, C, CB):
        rows = c0 + tl.arange(0, CB)  # [CB]
        m = (rows < C)[:, None]
        ptrs = rows[:, None] * GLOBAL_P2 + gi[None, :]  # [CB, GLOBAL_P2]
        tile = tl.load(counts_ptr + ptrs, mask=m, other=0)
        tl.store(base_ptr + ptrs, tl.cumsum(tile, axis=0) - tile + run[None, :], mask=m)
        run += tl.sum(tile, axis=0)
    blocks = (run + BLOCK_M - 1) // BLOCK_M  # [GLOBAL_P2] (0 past num_global)
    start = tl.cumsum(blocks, axis=0) - blocks  # [GLOBAL_P2] exclusive prefix
    tl.store(bstart_ptr + gi, start, mask=gi < num_global)
    tl.store(bstart_ptr + num_global, tl.sum(blocks, axis=0))
    j = tl.arange(0, BLOCK_M)
    fill = run[:, None] + j[None, :]  # [GLOBAL_P2, BLOCK_M] rank of each would-be padding row
    pad = (fill < blocks[:, None] * BLOCK_M) & (gi < num_global)[:, None]
    sentinel = tl.zeros([GLOBAL_P2, BLOCK_M], dtype=tl.int32) + P
    tl.store(sorted_ptr + start[:, None] * BLOCK_M + fill, sentinel, mask=pad)


@triton.jit(do_not_specialize=["P", "num_global"])
def scatter_kernel(
    topk_ptr,
    e2g_ptr,
    base_ptr,
    bstart_ptr,
    sorted_ptr,
    P,
    num_global,
    GLOBAL_P2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * CHUNK + tl.arange(0, CHUNK)  # [CHUNK]
    m = offs < P
    e = tl.load(topk_ptr + offs, mask=m, other=0).to(tl.int32)
    gid = tl.load(e2g_ptr + e, mask=m, other=-1)  # [CHUNK]
    gi = tl.arange(0, GLOBAL_P2)
    onehot = (gid[:, None] == gi[None, :]).to(tl.int32)  # [CHUNK, GLOBAL_P2]
    rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1  # [CHUNK] rank within expert and chunk
    first = tl.load(base_ptr + pid * GLOBAL_P2 + gi)  # [GLOBAL_P2]
    first += tl.load(bstart_ptr + gi, mask=gi < num_global, other=0) * BLOCK_M
    dest = tl.sum(onehot * first[None, :], axis=1) + rank  # [CHUNK]
    tl.store(sorted_ptr + dest, offs, mask=m & (gid >= 0))


def moe_align(
    topk: torch.Tensor,  # [P] expert of every pair (int32/int64)
    expert_to_global: torch.Tensor,  # [E] int32
    num_global: int,
    block_m: int,
    global_p2: int | None = None,  # power of two >= num_global (default: the next one)
) -> SortedRouting:
    p = topk.numel()
    dev = topk.device
    gp2 = global_p2 or next_power_of_2(max(2, num_global))
    if gp2 < num_global or gp2 & (gp2 - 1):
        raise ValueError(f"global_p2 must be a power of two >= num_global={num_global}, got {gp2}")
    chunk = sort_chunk(p, gp2)
    c = triton.cdiv(p, chunk)
    counts = torch.empty(c, gp2, dtype=torch.int32, device=dev)  # [C, GP2]
    base = torch.empty(c, gp2, dtype=torch.int32, device=dev)  # [C, GP2]
    block_start = torch.empty(num_global + 1, dtype=torch.int32, device=dev)  # [num_global + 1]
    sorted_ids = torch.empty(
        max(1, max_blocks(p, num_global, block_m)) * block_m, dtype=torch.int32, device=dev
    )
    warps = 4 if chunk * gp2 <= 4096 else 8
    launch(count_kernel, (c,), topk, expert_to_global, counts, p, CHUNK=chunk, GLOBAL_P2=gp2, num_warps=warps)
    cb = max(2, min(next_power_of_2(c), 8192 // gp2))
    launch(
        offsets_kernel, (1,),
        counts, base, block_start, sorted_ids, c, p, num_global,
        GLOBAL_P2=gp2, BLOCK_M=block_m, CB=cb, num_warps=8,
    )  # fmt: skip
    launch(
        scatter_kernel, (c,),
        topk, expert_to_global, base, block_start, sorted_ids, p, num_global,
        GLOBAL_P2=gp2, BLOCK_M=block_m, CHUNK=chunk, num_warps=warps,
    )  # fmt: skip
    return SortedRouting(sorted_ids=sorted_ids, block_start=block_start, block_m=block_m, num_pairs=p)
