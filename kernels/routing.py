"""The moe_align-style sorted routing shared by the Triton sort and its torch reference.

A *pair* is one (token, top-k slot): pair p = t * top_k + j, routed to expert top_k_index[t, j].
Pairs routed to packed experts are grouped by global expert id (layout.py) into blocks of
`block_m` rows; each expert's pairs keep ascending pair order and its last block is padded with the
sentinel `num_pairs`. Experts with no pairs get no block.

    sorted_ids   [max_blocks * block_m] int32   pair ids, block b holds rows [b*block_m, (b+1)*block_m)
    block_start  [num_global + 1] int32         first block of each global expert; [-1] = blocks used

Entries of sorted_ids past block_start[-1] * block_m are unspecified (never read).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SortedRouting:
    sorted_ids: torch.Tensor  # [max_blocks * block_m] int32
    block_start: torch.Tensor  # [num_global + 1] int32
    block_m: int
    num_pairs: int

    @property
    def max_blocks(self) -> int:
        return self.sorted_ids.numel() // self.block_m


def max_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the blocks `num_pairs` pairs over `num_experts` experts can need (host-side, no sync).

    Each non-empty expert wastes at most block_m - 1 padding rows and every block holds at least one pair.
    """
    busy = min(num_experts, num_pairs)
    return min(num_pairs, (num_pairs + busy * (block_m - 1)) // block_m)
