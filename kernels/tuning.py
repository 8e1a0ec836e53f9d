"""Launch parameters of the MoE kernels: user overrides (`KernelConfig`) and the default heuristics.

The defaults are reasoned, not yet measured on an H100/H200 (evals/bench/kernels.py sweeps them).
"""

from __future__ import annotations

from dataclasses import dataclass


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass(frozen=True)
class KernelConfig:
    """Overrides for the kernel launches; None picks the heuristic."""

    direct: bool | None = None  # per-pair path without sorting; default: when pairs are few (decode)
    direct_max_pairs: int = 64  # ... at most this many pairs, and at most 2 per packed expert on average
    block_m: int | None = None  # rows per sorted block (16, 32, 64, 128)
    block_n: int | None = None  # output columns per program (power of 2)
    block_k: int | None = None  # input channels per step (32, 64, 128, 256: whole 3-bit word triples)
    num_warps: int | None = None
    num_stages: int | None = None

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v is not None and (v < 1 or v & (v - 1)):
                raise ValueError(f"{name} must be a power of two, got {v}")
        if self.block_m is not None and self.block_m < 16:
            raise ValueError("block_m must be >= 16 (tl.dot needs 16 rows)")
        if self.block_k is not None and (self.block_k < 32 or self.block_k & (self.block_k - 1)):
            raise ValueError(f"block_k must be a power of two >= 32, got {self.block_k}")


@dataclass(frozen=True)
class Tiles:
    """The resolved launch parameters of one GEMM launch."""

    block_m: int
    block_n: int
    block_k: int
    scale_after: bool  # the K tile lies inside one scale group: scales applied to the tile's partial sums
    num_warps: int
    num_stages: int


def global_p2(packed) -> int:
    """Length of the kernels' per-expert scans (a constexpr): the power of two at or above the layer's expert
    count, which every MoE layer of a model shares, so the count of packed experts (which differs between
    layers) never forces a compilation of its own."""
    return next_power_of_2(max(2, packed.num_experts))


# The heuristics below take the layer's expert count (the same in every layer of a model), not how many of
# them are packed, so that layers with different mixes of widths choose the same tiles for the same batch.
def use_direct(num_pairs: int, num_experts: int, cfg: KernelConfig) -> bool:
    """Skip the token sort when pairs are few and rarely share an expert (decode)."""
    if cfg.direct is not None:
        return cfg.direct
    return num_pairs <= min(cfg.direct_max_pairs, 2 * num_experts)


def sorted_block_m(num_pairs: int, num_experts: int, cfg: KernelConfig) -> int:
    """Rows per sorted block from the mean pairs per busy expert (less padding for small batches)."""
    if cfg.block_m is not None:
        return cfg.block_m
    mean = num_pairs / max(1, min(num_experts, num_pairs))
    if mean <= 16:
        return 16
    if mean <= 48:
        return 32
    if mean <= 192:
        return 64
    return 128  # prefill: fewer re-dequantizations of each weight tile per token


def tiles(
    *,
    direct: bool,
    block_m: int,
    n: int,
    group_size: int,
    act_order: bool,
    fused_glu: bool,
    cfg: KernelConfig,
) -> Tiles:
    """Tile sizes of one launch. fused_glu: a gated gemm1 (two weight tiles and two accumulators per program);
    gemm2 and a non-gated gemm1 (up alone) have one of each."""
    bm = 1 if direct else block_m
    if cfg.block_n is not None:
        bn = cfg.block_n
    elif direct:
        bn = 32 if fused_glu else 64  # decode: many narrow programs keep every SM streaming weights
    else:
        bn = 64 if (fused_glu or bm <= 32) else 128
    bn = min(bn, max(16, next_power_of_2(n)))
    bk = cfg.block_k or (128 if direct else 64)
    scale_after = False
    if not act_order and group_size % 32 == 0:  # largest power-of-two tile inside one group
        while group_size % bk:
            bk //= 2
        scale_after = bk >= 32
    if bk < 32:  # 3-bit words come in triples of 32 codes
        bk = 32
        scale_after = False
    if cfg.num_warps is not None:
        warps = cfg.num_warps
    else:
        acc = bm * bn * (2 if fused_glu else 1)  # fp32 accumulator entries per program
        warps = 4 if acc < 64 * 64 else 8
    stages = cfg.num_stages if cfg.num_stages is not None else (3 if not direct else 2)
    return Tiles(bm, bn, bk, scale_after, warps, stages)


def sort_chunk(num_pairs: int, global_p2: int) -> int:
    """Pairs per program of the sort kernels: a [chunk, experts] one-hot tile of at most 8K entries."""
    cap = max(16, 8192 // global_p2)
    return max(16, min(cap, next_power_of_2(max(1, num_pairs))))
