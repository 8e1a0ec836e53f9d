"""GPTQ's factorisation backends (moequant/quantizers/gptq_factor.py): LAPACK in the output buffer, torch's
Cholesky, the in-place reversal, and scipy's BLAS thread control."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moequant.quantizers import gptq_factor


def hessian(K: int, seed: int) -> torch.Tensor:
    """An exactly symmetric H [K, K] = 2/T X^T X of correlated inputs with uneven channel scales (a float32
    X^T X need not be symmetric: either triangle may be read)."""
    g = torch.Generator().manual_seed(seed)
    T = 5 * K
    X = torch.randn(T, 8, generator=g) @ torch.randn(8, K, generator=g) + 0.3 * torch.randn(T, K, generator=g)
    X = X * torch.exp(0.5 * torch.randn(K, generator=g))  # [T, K]
    H = 2 / T * X.T @ X  # [K, K]
    return (H + H.T) / 2


def reversal(K: int, perm: torch.Tensor | None) -> torch.Tensor:
    return torch.arange(K - 1, -1, -1) if perm is None else perm.flip(0)  # [K]


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("K", [40, 600])  # 600: the in-place reversal takes two steps (K^2 > 2^18)
def test_factor_paths_agree_with_float64(act_order, K):
    """The CPU factorisation (LAPACK in the output buffer) and the torch path used off the CPU give the same
    V^T D^-1 and D as a float64 Cholesky of the permuted, damped Hessian; both report an indefinite one."""
    H = hessian(K, seed=11)
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(3)) if act_order else None
    De = H.diagonal() + 0.01 * H.diagonal().mean()
    rev = reversal(K, perm)
    out = {}
    for name, fn in (
        ("lapack", gptq_factor._reverse_factor_lapack),
        ("torch", gptq_factor._reverse_factor_torch),
    ):
        Vt, Vd = torch.empty(K, K), torch.empty(K)
        assert fn(H, De, rev, Vt, Vd)
        out[name] = (Vt, Vd)
    p = torch.arange(K) if perm is None else perm
    A = H.double()[p][:, p]
    A.diagonal().copy_(De.double()[p])
    V = torch.linalg.cholesky(A.flip(0, 1)).flip(0, 1)  # upper, A = V V^T
    assert torch.allclose(V @ V.T, A, rtol=1e-9, atol=1e-9)
    # float32 factors of a larger K drift further (both paths alike, ~2e-4 at K = 600); a wrong reversal or
    # transpose would be off by O(1)
    tol = dict(rtol=1e-3, atol=1e-4) if K <= 100 else dict(rtol=1e-2, atol=1e-3)
    for Vt, Vd in out.values():
        assert torch.allclose(Vd.double(), V.diagonal(), rtol=1e-4)
        assert torch.allclose(Vt.double(), (V / V.diagonal()[None, :]).T, **tol)
        assert torch.equal(Vt.triu(1), torch.zeros(K, K))  # exactly lower triangular
    bad = -torch.eye(K)
    for fn in (gptq_factor._reverse_factor_lapack, gptq_factor._reverse_factor_torch):
        assert not fn(bad, bad.diagonal(), rev, torch.empty(K, K), torch.empty(K))
    assert not gptq_factor._reverse_factor(bad, bad.diagonal(), perm, torch.empty(K, K), torch.empty(K))


@pytest.mark.parametrize("act_order", [False, True])
def test_reverse_factor_on_cpu_is_the_lapack_path(act_order):
    """_reverse_factor (perm, not the reversal) on CPU tensors gives the LAPACK factor bit for bit."""
    K = 72
    H = hessian(K, seed=12)
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(4)) if act_order else None
    De = H.diagonal() + 0.01 * H.diagonal().mean()
    got, want = (torch.empty(K, K), torch.empty(K)), (torch.empty(K, K), torch.empty(K))
    assert gptq_factor._reverse_factor(H, De, perm, *got)
    assert gptq_factor._reverse_factor_lapack(H, De, reversal(K, perm), *want)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert gptq_factor._factor_backend(torch.device("cpu")) is gptq_factor._reverse_factor_lapack
    # LAPACK reads the Hessian through numpy: a tensor on any other device goes to the torch backend
    assert gptq_factor._factor_backend(torch.device("cuda", 0)) is gptq_factor._reverse_factor_torch


def test_nan_hessian_fails_the_factorisation():
    K = 32
    H = hessian(K, seed=13)
    H[2, 3] = H[3, 2] = float("nan")
    De = H.diagonal() + 0.01 * H.diagonal().mean()
    assert not gptq_factor._reverse_factor(H, De, None, torch.empty(K, K), torch.empty(K))


@pytest.mark.parametrize("n", [0, 1, 2, 7, 2**18, 2**19 + 1, 3 * 2**18 + 5])
def test_reverse_flat_in_place(n):
    """_reverse_flat (the factor's in-place reversal, 2^18 elements a step) equals a[::-1] at any length."""
    a = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    want = a[::-1].copy()
    gptq_factor._reverse_flat(a)
    assert np.array_equal(a, want)


def test_scipy_blas_threads_limits_inside_and_restores_after():
    pools = gptq_factor._blas_pools()
    before = [p["num_threads"] for p in pools.info() if p["user_api"] == "blas"]
    with gptq_factor.scipy_blas_threads(1):
        assert all(p["num_threads"] == 1 for p in pools.info() if p["user_api"] == "blas")
    assert [p["num_threads"] for p in pools.info() if p["user_api"] == "blas"] == before
    for K in (64, 1024, 4096):
        for threads in (1, 2, 8):
            assert 1 <= gptq_factor.lapack_threads(K, threads) <= threads
