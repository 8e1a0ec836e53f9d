"""The sorted routing's block bound: exact on hand cases, and never below what a sort needs."""

import torch

from moequant.kernels.reference import moe_align_reference
from moequant.kernels.routing import max_blocks


def test_max_blocks_by_hand():
    assert max_blocks(10, 4, 16) == 4  # 4 busy experts, a block each
    assert max_blocks(3, 8, 16) == 3  # at most one block per pair
    assert max_blocks(1000, 8, 64) == 23  # (1000 + 8 * 63) // 64
    assert max_blocks(0, 8, 16) == 0


def test_max_blocks_bounds_every_routing():
    g = torch.Generator().manual_seed(0)
    for t, k, e, block_m in ((1, 2, 8, 16), (13, 2, 6, 16), (300, 4, 40, 32), (64, 8, 8, 64)):
        for index in (
            torch.randint(0, e, (t, k), generator=g),
            torch.full((t, k), 3),  # all on one expert
            torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]),
        ):
            r = moe_align_reference(index, torch.arange(e, dtype=torch.int32), e, block_m)
            counts = torch.bincount(index.flatten(), minlength=e)
            assert int(r.block_start[-1]) == int(((counts + block_m - 1) // block_m).sum())  # blocks used
            assert int(r.block_start[-1]) <= max_blocks(t * k, e, block_m) == r.max_blocks
