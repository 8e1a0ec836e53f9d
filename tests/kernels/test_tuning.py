"""Launch parameters of the MoE kernels: the overrides' checks and the default heuristics, case by case."""

import pytest

from moequant.kernels.tuning import (
    KernelConfig,
    Tiles,
    global_p2,
    next_power_of_2,
    sort_chunk,
    sorted_block_m,
    tiles,
    use_direct,
)

DEFAULT = KernelConfig()


def test_next_power_of_2():
    assert [next_power_of_2(n) for n in (0, 1, 2, 3, 16, 17)] == [1, 1, 2, 4, 16, 32]


def test_overrides_are_checked():
    for bad, match in (
        (dict(block_m=24), "block_m must be a power of two"),
        (dict(block_m=8), "block_m must be >= 16"),
        (dict(block_n=3), "block_n must be a power of two"),
        (dict(block_k=16), "block_k must be a power of two >= 32"),
        (dict(block_k=96), "block_k must be a power of two >= 32"),
    ):
        with pytest.raises(ValueError, match=match):
            KernelConfig(**bad)


def test_direct_path_for_few_pairs_and_block_m_from_the_pairs_per_expert():
    assert [use_direct(p, 8, DEFAULT) for p in (16, 17)] == [True, False]  # at most 2 pairs per expert
    assert [use_direct(p, 64, DEFAULT) for p in (64, 65)] == [True, False]  # at most direct_max_pairs
    assert use_direct(1, 8, KernelConfig(direct=False)) is False
    # mean pairs per busy expert: 5/5, 100/8, 300/8, 1000/8, 2000/8
    assert [sorted_block_m(p, 8, DEFAULT) for p in (5, 100, 300, 1000, 2000)] == [16, 16, 32, 64, 128]
    assert sorted_block_m(2000, 8, KernelConfig(block_m=32)) == 32


def test_tiles():
    decode = tiles(
        direct=True, block_m=16, n=96, group_size=128, act_order=False, fused_glu=True, cfg=DEFAULT
    )
    assert decode == Tiles(block_m=1, block_n=32, block_k=128, scale_after=True, num_warps=4, num_stages=2)
    prefill = tiles(
        direct=False, block_m=64, n=4096, group_size=48, act_order=False, fused_glu=False, cfg=DEFAULT
    )
    assert prefill == Tiles(64, 128, 64, False, 8, 3)  # 48: no power-of-two K tile inside a group
    inside = tiles(direct=False, block_m=16, n=10, group_size=32, act_order=False, fused_glu=True,
                   cfg=KernelConfig(block_k=128))  # fmt: skip
    assert (inside.block_n, inside.block_k, inside.scale_after) == (
        16,
        32,
        True,
    )  # K tile shrunk to the group
    act_order = tiles(
        direct=False, block_m=16, n=64, group_size=32, act_order=True, fused_glu=True, cfg=DEFAULT
    )
    assert (act_order.block_k, act_order.scale_after) == (64, False)  # groups scattered over K


def test_scan_lengths():
    class Layer:
        def __init__(self, num_experts):
            self.num_experts = num_experts

    assert [global_p2(Layer(e)) for e in (1, 5, 8, 9)] == [2, 8, 8, 16]
    assert [sort_chunk(p, g) for p, g in ((10, 8), (5000, 8), (5000, 1024))] == [16, 1024, 16]
