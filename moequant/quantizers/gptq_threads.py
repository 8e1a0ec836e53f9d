"""CPU scheduling of GPTQ over a stack of experts: thread counts, expert chunks, worker threads.

GPTQ (moequant/quantizers/gptq.py) is batch invariant: an expert of a fused [E, N, K] call gets bit for
bit what a call on that expert alone gets. Thread counts change rounding too (MKL products, LAPACK
factorisations, from K = 1024 on), so an expert's thread count depends on its shape only
(expert_threads): small experts run on one thread each, in contiguous chunks of experts (_expert_chunks)
on parallel worker threads (_worker_pool), and never on the caller's thread count.

run_expert_chunks runs a per-chunk function that way and stacks the chunk results; it knows nothing of
the algorithm (the per-chunk function is its argument, so this module does not import gptq.py).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from moequant.quantizers.gptq_factor import lapack_threads, scipy_blas_threads
from moequant.quantizers.result import QuantResult

# chunk(W [c, N, K], H [c, K, K], first, release) -> QuantResult of experts first .. first + c - 1
ChunkFn = Callable[[torch.Tensor, torch.Tensor, int, bool], QuantResult]


def run_expert_chunks(
    chunk: ChunkFn, W: torch.Tensor, H: torch.Tensor, blocksize: int, *, consume_hessian: bool = False
) -> QuantResult:
    """chunk(W[a:b], H[a:b], a, release) over contiguous expert ranges [a, b) of W [E, N, K], H [E, K, K],
    the results stacked along the expert dimension.

    Every call runs on expert_threads(N, K, caller's threads) torch threads (on worker threads when
    several chunks run at once) with scipy's BLAS on lapack_threads; the caller's torch thread count is
    left as it was. `blocksize`: the algorithm's column block (sizes the chunks' block buffers).
    `release` (chunk may free H's storage once done with it) is True only with consume_hessian, when all
    experts form one chunk and H owns its storage (_owns_storage).
    """
    E, N, K = W.shape
    caller_threads = torch.get_num_threads()
    threads = expert_threads(N, K, caller_threads)
    chunks = _expert_chunks(E, N, min(blocksize, K), caller_threads // threads)
    workers = min(len(chunks), max(1, caller_threads // threads))
    release = consume_hessian and len(chunks) == 1 and _owns_storage(H)
    run = lambda ab: chunk(W[ab[0] : ab[1]], H[ab[0] : ab[1]], ab[0], release)  # noqa: E731
    with scipy_blas_threads(lapack_threads(K, threads)):
        if workers == 1 and threads == caller_threads:  # nothing to change: run here
            parts = [run(ab) for ab in chunks]
        else:
            try:
                if workers == 1:
                    torch.set_num_threads(threads)
                    parts = [run(ab) for ab in chunks]
                else:
                    parts = list(_worker_pool(workers, threads, os.getpid()).map(run, chunks))
            finally:  # (a worker's setting also becomes the default of threads started later)
                torch.set_num_threads(caller_threads)
    return parts[0] if len(parts) == 1 else _concat(parts)


@functools.cache
def _worker_pool(workers: int, threads: int, pid: int) -> ThreadPoolExecutor:
    """Worker threads running torch on `threads` intra-op threads each, kept for the process (`pid`: a
    forked child gets its own): threads started per call pay page faults on fresh per-thread heaps
    (evals/results/figures_from_code_comments.md)."""
    return ThreadPoolExecutor(
        workers, thread_name_prefix="moequant-gptq", initializer=torch.set_num_threads, initargs=(threads,)
    )


def expert_threads(N: int, K: int, available: int) -> int:
    """Intra-op threads for one [N, K] expert: 1 when K < 1024 and N K < 2^23, else all `available`.

    Small experts gain nothing from intra-op threads (the column loop works on [E, N] vectors) and run in
    parallel across experts instead; large ones keep them, and so do long ones (from K = 1024 the LAPACK
    factorisation matters, and scipy's OpenBLAS does not factor on two threads at once). Timings:
    evals/results/figures_from_code_comments.md. By shape only, so an expert gets the same arithmetic in any
    batch: MKL products and LAPACK factorisations round differently for different thread counts (K >= 1024).
    """
    return 1 if K < 1024 and N * K < 2**23 else available


_CHUNK_BLOCK_BYTES = 4 * 2**20  # a chunk's [blocksize, c, N] float32 block buffer stays near this (cache)
_MIN_CHUNK_ELEMS = 2**13  # a chunk's column vector [c, N]: below this, per-op overhead dominates the work
_MAX_WORKERS = 8  # the column loop holds the GIL between ops: more Python threads stop paying


def _expert_chunks(E: int, N: int, blocksize: int, parallel: int) -> list[tuple[int, int]]:
    """Contiguous expert ranges [(a, b)]: `parallel` (capped) when E allows, but none whose column vectors
    [c, N] fall below _MIN_CHUNK_ELEMS (tiny experts: splitting only multiplies the per-op overhead, and
    the workers queue on the GIL), and none whose block buffers exceed _CHUNK_BLOCK_BYTES (cache). Timings:
    evals/results/figures_from_code_comments.md."""
    parallel = max(1, min(parallel, _MAX_WORKERS, E))
    size = max(-(-E // parallel), -(-_MIN_CHUNK_ELEMS // N))
    size = max(1, min(size, E, _CHUNK_BLOCK_BYTES // (4 * blocksize * N)))
    return [(a, min(a + size, E)) for a in range(0, E, size)]


def _concat(parts: list[QuantResult]) -> QuantResult:
    """Chunk results stacked along the expert dimension."""
    cat = lambda ts: None if ts[0] is None else torch.cat(ts)  # noqa: E731
    return QuantResult(
        codes=torch.cat([p.codes for p in parts]),
        scales=torch.cat([p.scales for p in parts]),
        zeros=cat([p.zeros for p in parts]),
        g_idx=cat([p.g_idx for p in parts]),
        bits=parts[0].bits,
        group_size=parts[0].group_size,
        losses=torch.cat([p.losses for p in parts]),
        damp=torch.cat([p.damp for p in parts]),
        err_sums=cat([p.err_sums for p in parts]),
    )


def _owns_storage(t: torch.Tensor) -> bool:
    """True when t is the whole of its storage (freeing the storage frees nothing else)."""
    return (
        t.device.type == "cpu"
        and t.is_contiguous()
        and t.storage_offset() == 0
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )
