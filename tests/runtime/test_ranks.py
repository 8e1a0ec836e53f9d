"""The ranks of one process (no launch): rank 0 writes, collectives hand back its own object, guard re-raises;
the work split over ranks. (Launches under torchrun: tests/quantize/test_ranks.py.)"""

import pytest
import torch

from moequant.runtime.ranks import Ranks, balanced_owners, current, launched, rank_device


def test_one_process_is_rank_0_of_1(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not launched() and current() == Ranks(0, 1, None)
    one = Ranks()
    assert one.writes and not one.distributed
    assert one.all_gather({"a": 1}) == [{"a": 1}] and one.broadcast("x") == "x"
    one.barrier()
    with pytest.raises(KeyError, match="own"), one.guard("working"):
        raise KeyError("own")
    assert not Ranks(rank=1, world=2).writes and Ranks(rank=1, world=2).distributed
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device(torch.device("cuda")) == torch.device("cuda", 1)  # a launched rank's own GPU
    assert rank_device(torch.device("cuda", 0)) == torch.device("cuda", 0)  # as given
    assert rank_device(torch.device("cpu")) == torch.device("cpu")


def test_balanced_owners_longest_first_to_the_least_loaded_rank():
    # most costly first: 7 -> r0; 5 -> r1; 4 -> r1 (5 < 7); item 0 (3) -> r0 (7 < 9); item 3 (3) -> r1 (9 < 10)
    assert balanced_owners([3, 5, 7, 3, 4], 2) == [0, 1, 0, 1, 1]
    assert balanced_owners([1, 1, 1], 3) == [0, 1, 2]  # ties: the lower item to the lower rank
    assert balanced_owners([], 2) == []
