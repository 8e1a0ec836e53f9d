"""The Triton token sort against its torch reference (kernel cases: see kernel_cases.py for where they run)."""

import pytest
import torch
from kernel_cases import keep_runnable, kernel_case

from moequant.kernels.reference import moe_align_reference


def check_sorted(routing, idx, e2g, num_global):
    """Invariants of routing.py: every packed pair once, ascending within its expert, sentinel padding."""
    p = idx.numel()
    gid = e2g.long()[idx.reshape(-1).long()]
    starts = routing.block_start.long()
    ids = routing.sorted_ids.long()
    for g in range(num_global):
        rows = ids[starts[g] * routing.block_m : starts[g + 1] * routing.block_m]
        want = torch.nonzero(gid == g).flatten()
        assert torch.equal(rows[: want.numel()], want)
        assert (rows[want.numel() :] == p).all() and rows.numel() - want.numel() < routing.block_m


SORT_CASES = {
    "random": (dict(t=13, k=2, e=6), None),
    "one_expert": (dict(t=11, k=2, e=6), lambda t, k: torch.full((t, k), 3)),
    "empty_experts": (dict(t=9, k=2, e=6), lambda t, k: torch.randint(0, 2, (t, k))),
    "duplicates": (dict(t=7, k=3, e=6), lambda t, k: torch.tensor([[1, 1, 4]]).repeat(t, 1)),
    "t1": (dict(t=1, k=2, e=6), None),
    "many_chunks": (dict(t=300, k=4, e=40), None),
}


@kernel_case
@pytest.mark.parametrize("block_m", [16, 32])
@pytest.mark.parametrize("case", list(SORT_CASES))
def test_sort_matches_reference(dev, case, block_m):
    from moequant.kernels import sort

    dims, index_fn = SORT_CASES[case]
    torch.manual_seed(block_m)
    t, k, e = dims["t"], dims["k"], dims["e"]
    idx = index_fn(t, k) if index_fn else torch.randint(0, e, (t, k))
    e2g = torch.arange(e, dtype=torch.int32)
    e2g[e // 2] = -1  # one expert not packed
    e2g[e // 2 + 1 :] -= 1
    num_global = e - 1
    ref = moe_align_reference(idx, e2g, num_global, block_m)
    out = sort.moe_align(idx.reshape(-1).to(dev), e2g.to(dev), num_global, block_m)
    assert torch.equal(out.block_start.cpu(), ref.block_start)
    used = int(ref.block_start[-1]) * block_m
    assert torch.equal(out.sorted_ids[:used].cpu(), ref.sorted_ids[:used])
    check_sorted(ref, idx, e2g, num_global)


@kernel_case
def test_sort_large_t_index_math(dev):
    """T = 65,536 tokens x top-8 (524,288 pairs): Triton sort equals the reference; invariants hold."""
    from moequant.kernels import sort

    t, k, e = 65536, 8, 8
    idx = torch.randint(0, e, (t, k), generator=torch.Generator().manual_seed(7))
    e2g = torch.arange(e, dtype=torch.int32)
    ref = moe_align_reference(idx, e2g, e, 64)
    out = sort.moe_align(idx.reshape(-1).to(dev), e2g.to(dev), e, 64)
    used = int(ref.block_start[-1]) * 64
    assert torch.equal(out.block_start.cpu(), ref.block_start)
    assert torch.equal(out.sorted_ids[:used].cpu(), ref.sorted_ids[:used])
    counts = torch.bincount(idx.reshape(-1), minlength=e)
    assert torch.equal(ref.block_start[1:].long() - ref.block_start[:-1].long(), (counts + 63) // 64)
    check_sorted(ref, idx, e2g, e)


keep_runnable(globals())
