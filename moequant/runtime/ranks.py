"""The ranks of a torchrun launch (torch.distributed), and the few collectives the passes use.

`torchrun --nproc-per-node N -m moequant quantize ...` starts N processes with RANK / WORLD_SIZE /
MASTER_ADDR in their environment; `init_from_env` joins them into one process group (gloo on CPU, NCCL on
CUDA) and `current()` is what every pass asks. A plain `python -m moequant` is world size 1: every call here
is then a no-op on the one rank, and nothing imports torch.distributed's process group.

Failures: a rank that fails inside `guard(...)` tells the others at the guard's end, so every rank stops with
the failing rank's message instead of waiting forever in the next collective.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
from dataclasses import dataclass

import torch

from moequant.errors import MoEQuantError

logger = logging.getLogger(__name__)


class RankFailure(MoEQuantError):
    """Another rank failed: this one stops with its message."""


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    backend: str | None = None  # "gloo" | "nccl"; None: no process group (world size 1)

    @property
    def writes(self) -> bool:
        """Rank 0 writes the checkpoint, logs at INFO and shows the progress bars."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def wire(self) -> torch.device:
        """Where this group's collectives take tensors: the rank's GPU with NCCL, else the CPU."""
        return rank_device(torch.device("cuda")) if self.backend == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def all_gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (pickled: tensors travel exactly, on CPU)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def batch_owner(self, b: int) -> int:
        """The rank that computes calibration batch b in the layer passes (round robin)."""
        return b % self.world

    def gather_batches(
        self, local: dict[int, list[torch.Tensor]], n: int, device: torch.device
    ) -> list[list[torch.Tensor]]:
        """Every batch's tensors on every rank: `local` holds this rank's batches (batch_owner), each a list of
        tensors; batch b's travel from its owner as tensors (broadcast on `device`: the CPU with gloo, the
        rank's GPU with NCCL), exactly, in the order given. World size 1: `local` in batch order."""
        if not self.distributed:
            return [local[b] for b in range(n)]
        meta = {}  # batch -> (owner, [(shape, dtype)]), from one small pickled exchange
        for r, got in enumerate(
            self.all_gather({b: [(tuple(t.shape), t.dtype) for t in ts] for b, ts in local.items()})
        ):
            meta |= {b: (r, m) for b, m in got.items()}
        out = []
        for b in range(n):
            owner, shapes = meta[b]
            if owner == self.rank:
                ts = [t.to(device).contiguous() for t in local[b]]
            else:
                ts = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in shapes]
            for t in ts:
                torch.distributed.broadcast(t, src=owner)
            out.append(ts if owner != self.rank else local[b])
        return out

    def broadcast(self, obj, src: int = 0):
        """Rank `src`'s obj on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    @contextlib.contextmanager
    def guard(self, what: str):
        """Run the block; then every rank learns whether any rank failed in it. The failing rank re-raises its
        own error; the others raise RankFailure naming it (one clear message on every rank, no hang)."""
        error: BaseException | None = None
        try:
            yield
        except Exception as err:  # noqa: BLE001  (reported to the other ranks, then re-raised)
            if not self.distributed:
                raise
            error = err
        if not self.distributed:
            return
        reports = self.all_gather(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            error.moequant_rank_reported = True  # the other ranks know: the command line lets rank 0 say it
            raise error
        failed = [(r, m) for r, m in enumerate(reports) if m is not None]
        if failed:
            r, message = failed[0]
            raise RankFailure(f"rank {r} failed while {what}: {message}")


_CURRENT = Ranks()


def current() -> Ranks:
    """The ranks of this process (world size 1 unless init_from_env joined a launch)."""
    return _CURRENT


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher) as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: torch.device) -> Ranks:
    """Join the launch described by the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; torchrun
    sets them, multi-node included). gloo for CPU, NCCL for CUDA; a CUDA rank takes the device LOCAL_RANK.
    Returns the ranks (world size 1 without a launch)."""
    global _CURRENT
    if not launched():
        return _CURRENT
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    _CURRENT = Ranks(dist.get_rank(), dist.get_world_size(), backend)
    return _CURRENT


def shutdown() -> None:
    """Leave the process group (at exit of a launched command)."""
    global _CURRENT
    if _CURRENT.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _CURRENT = Ranks()


def rank_device(device: torch.device) -> torch.device:
    """A launched CUDA rank's own GPU (cuda:LOCAL_RANK) when `device` is plain "cuda"; else `device`."""
    if device.type == "cuda" and device.index is None and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def balanced_owners(costs: list[int], world: int) -> list[int]:
    """The rank of each item: longest-processing-time first over `world` ranks (most costly first, to the
    least loaded rank; ties: the lower item, then the lower rank), the same answer on every rank."""
    owner = [0] * len(costs)
    loads = [(0, r) for r in range(world)]  # (cost so far, rank), a heap
    for e in sorted(range(len(costs)), key=lambda e: (-costs[e], e)):
        load, r = heapq.heappop(loads)
        owner[e] = r
        heapq.heappush(loads, (load + costs[e], r))
    return owner
