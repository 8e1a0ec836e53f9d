"""GPTQ's factorisation backends: the upper V with H + damp I = V V^T, one expert at a time.

The algorithm (moequant/quantizers/gptq.py, _reverse_cholesky) needs, per expert, the upper triangular V
with A = V V^T, where A is the Hessian (act-order permuted) with its damped diagonal: V = P chol(P A P) P
with P the index reversal, one Cholesky and no inverse. It takes V as (V D^-1)^T (unit lower) and
D = diag V, written into buffers it owns. This module computes that factor:

* _reverse_factor: the entry; picks the backend for the Hessian's device (_factor_backend).
* _reverse_factor_lapack (CPU): LAPACK spotrf run in the output buffer, no K x K temporary.
* _reverse_factor_torch (off the CPU): torch.linalg.cholesky_ex on a permuted copy.

and the thread count of scipy's OpenBLAS (which runs spotrf) during the factorisations:
scipy_blas_threads, lapack_threads (set by gptq_threads.run_expert_chunks).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from scipy.linalg.lapack import spotrf as _spotrf
from threadpoolctl import ThreadpoolController

FactorBackend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], bool]


def _reverse_factor(
    He: torch.Tensor, De: torch.Tensor, perm: torch.Tensor | None, Vt: torch.Tensor, Vdiag: torch.Tensor
) -> bool:
    """Factor one expert: Vt [K, K] = (V D^-1)^T (unit lower) and Vdiag [K] = D, written in place, for the
    upper V with A = V V^T, A = He (act-order permuted by perm [K] or None) with its diagonal replaced by
    De [K] (given unpermuted). False when A is not positive definite (Vt, Vdiag then hold garbage).

    V = P chol(P A P) P with P the index reversal: the backends get rev [K], the permutation and the
    reversal together (P A P = He[rev][:, rev] with De[rev] on the diagonal).
    """
    K = He.shape[0]
    rev = torch.arange(K - 1, -1, -1, device=He.device) if perm is None else perm.flip(0)  # [K] P (perm)
    return _factor_backend(He.device)(He, De, rev, Vt, Vdiag)


def _factor_backend(device: torch.device) -> FactorBackend:
    """The factorisation for Hessians on `device`: LAPACK in the output buffer on CPU, torch elsewhere."""
    return _reverse_factor_lapack if device.type == "cpu" else _reverse_factor_torch


def _reverse_factor_lapack(
    He: torch.Tensor, De: torch.Tensor, rev: torch.Tensor, Vt: torch.Tensor, Vdiag: torch.Tensor
) -> bool:
    """_reverse_factor on CPU (rev [K]: the reversed permutation): LAPACK spotrf in Vt's own memory.

    spotrf runs on a gathered copy of He (permutation and reversal together) in Vt, and the factor is
    reversed and divided there: no K x K temporary (torch.linalg.cholesky_ex spends most of its time
    outside the factorisation, zeroing the other triangle element by element, and its factor would need a
    transposing copy; timings: evals/results/figures_from_code_comments.md). As A is symmetric, the C-ordered
    reversed copy read in Fortran order is the same matrix, and the factor read back in C order is its
    transpose. A failure is a non-zero info or a non-finite diagonal (spotrf need not stop on NaN).
    """
    K = He.shape[0]
    # rows, then columns in place a row block at a time (cheaper than one 2-D gather:
    # evals/results/figures_from_code_comments.md); torch ops, not numpy, read He: a tensor once seen by
    # numpy can no longer have its memory freed (release)
    torch.index_select(He, 0, rev, out=Vt)  # [K, K] rows of P A P
    for b in range(0, K, 256):
        Vt[b : b + 256] = Vt[b : b + 256].index_select(1, rev)  # [<=256, K] temporary
    A = Vt.numpy()  # [K, K] the output buffer: P A P, then the factor, then V^T D^-1
    np.fill_diagonal(A, De.numpy()[rev.numpy()])
    L, info = _spotrf(A.T, lower=1, clean=0, overwrite_a=1)  # [K, K] Fortran order, lower = L
    if not np.shares_memory(L, A):  # f2py copied instead of factoring in place
        A[...] = L.T
    # V^T = P L^T P. L^T read in C order is A itself, so V^T is A with its flat index reversed, done in
    # place; above the diagonal: the untouched other triangle of P A P, cleared at the end.
    _reverse_flat(A.reshape(-1))
    d = A.diagonal().copy()  # [K]
    if info != 0 or not np.isfinite(d).all():
        return False
    Vdiag.numpy()[:] = d
    np.divide(A, d[:, None], out=A)  # V[j, i] / V[i, i], transposed
    Vt.tril_()  # (cheaper than clean=1 in spotrf's wrapper: evals/results/figures_from_code_comments.md)
    return True


_REVERSE_CHUNK = 2**18  # elements swapped per step of _reverse_flat (a 1 MB temporary)


def _reverse_flat(a: np.ndarray) -> None:
    """a[:] = a[::-1] in place for a 1-D array, with a bounded temporary (numpy would copy all of a)."""
    n = a.shape[0]
    half = n // 2
    for c in range(0, half, _REVERSE_CHUNK):
        m = min(_REVERSE_CHUNK, half - c)
        lo, hi = a[c : c + m], a[n - c - m : n - c]  # disjoint: c + m <= n / 2 <= n - c - m
        tmp = lo.copy()
        lo[:] = hi[::-1]
        hi[:] = tmp[::-1]


def _reverse_factor_torch(
    He: torch.Tensor, De: torch.Tensor, rev: torch.Tensor, Vt: torch.Tensor, Vdiag: torch.Tensor
) -> bool:
    """_reverse_factor off the CPU: torch's Cholesky on P A P (rev [K]: the reversed permutation)."""
    A = He[rev][:, rev]  # [K, K] P A P (a copy)
    A.diagonal().copy_(De[rev])
    L, info = torch.linalg.cholesky_ex(A)  # [K, K] lower
    if info != 0:
        return False
    V = L.mT.flip(0, 1)  # [K, K] P L^T P = V^T, lower
    Vdiag.copy_(V.diagonal())
    torch.div(V, Vdiag[:, None], out=Vt)
    return True


@functools.cache
def _blas_pools() -> ThreadpoolController:
    """The loaded BLAS thread pools (scipy's OpenBLAS), found once: a fresh lookup costs ~1 ms a call."""
    return ThreadpoolController()


def scipy_blas_threads(n: int):
    """Context manager: scipy's BLAS/LAPACK (the factorisations) on n threads inside it."""
    return _blas_pools().limit(limits=n, user_api="blas")


def lapack_threads(K: int, threads: int) -> int:
    """Threads for scipy's OpenBLAS during the factorisations of K x K Hessians.

    Its idle workers spin for a while after each call and take the cores from torch's own threads, and
    below K = 1024 a second thread saves little; above it the factorisation dominates and gains from threads
    (timings: evals/results/figures_from_code_comments.md).
    `threads`: the expert's own thread count (gptq_threads.expert_threads).
    """
    return 1 if K < 1024 else threads
