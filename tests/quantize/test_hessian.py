"""HessianAccumulator (moequant/quantize/hessian.py): chunked and routed accumulation against direct computations."""

from __future__ import annotations

import pytest
import torch

from moequant.quantize.hessian import HessianAccumulator

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _x(T: int, K: int, seed: int) -> torch.Tensor:
    return torch.randn(T, K, generator=torch.Generator().manual_seed(seed))


def _chunks(T: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    sizes, left = [], T
    while left:
        n = min(left, int(torch.randint(1, 40, (1,), generator=g)))
        sizes.append(n)
        left -= n
    return sizes


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_incremental_equals_batch(dtype, rtol):
    """Many uneven chunks == 2/n X^T X of the whole batch (float64: 1e-12, float32: 1e-5 relative)."""
    X = _x(1000, 24, seed=0)
    acc = HessianAccumulator(3, 24, dtype=dtype)
    for chunk in X.split(_chunks(1000, seed=1)):
        acc.add(1, chunk)
    H = acc.finalize()
    ref = 2 / 1000 * X.double().T @ X.double()
    assert H.dtype == dtype
    assert torch.allclose(H[1].double(), ref, rtol=rtol, atol=rtol * float(ref.abs().max()))
    assert torch.equal(H[0], torch.zeros(24, 24)) and torch.equal(H[2], torch.zeros(24, 24))
    assert acc.tokens.tolist() == [0, 1000, 0] and acc.mass.tolist() == [0.0, 1000.0, 0.0]


def test_weighted_accumulation_normalises_by_weight_mass():
    X, w = _x(300, 8, seed=2), torch.rand(300, generator=torch.Generator().manual_seed(3))
    acc = HessianAccumulator(1, 8, dtype=torch.float64)
    for xc, wc in zip(X.split(77), w.split(77), strict=True):
        acc.add(0, xc, wc)
    ref = 2 / w.double().sum() * (X.double() * w.double()[:, None]).T @ X.double()
    assert torch.allclose(acc.finalize()[0], ref, rtol=1e-12)
    assert acc.tokens.item() == 300 and acc.mass.item() == pytest.approx(float(w.double().sum()))


def _naive_routed(X, idx, wts, E):
    """One token, one routed expert at a time."""
    S = torch.zeros(E, X.shape[1], X.shape[1], dtype=torch.float64)
    mass = torch.zeros(E, dtype=torch.float64)
    for t in range(X.shape[0]):
        x = X[t].double()
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            wt = 1.0 if wts is None else float(wts[t, j])
            S[e] += wt * torch.outer(x, x)
            mass[e] += wt
    return torch.where(mass[:, None, None] > 0, 2 * S / mass.clamp(min=1e-300)[:, None, None], 0.0)


@pytest.mark.parametrize("weighted", [False, True])
def test_routed_equals_naive_token_loop(weighted):
    E, K, T = 6, 10, 200
    g = torch.Generator().manual_seed(4)
    X = _x(T, K, seed=5)
    idx = torch.stack([torch.randperm(E - 1, generator=g)[:2] for _ in range(T)])  # [T, 2], expert 5 never
    wts = torch.softmax(torch.randn(T, 2, generator=g), -1) if weighted else None
    acc = HessianAccumulator(E, K, dtype=torch.float64)
    for s in range(0, T, 64):
        acc.add_routed(X[s : s + 64], idx[s : s + 64], None if wts is None else wts[s : s + 64])
    assert torch.allclose(acc.finalize(), _naive_routed(X, idx, wts, E), rtol=1e-12, atol=1e-14)
    assert acc.tokens.tolist() == torch.bincount(idx.flatten(), minlength=E).tolist()
    assert acc.tokens[5] == 0 and torch.equal(acc.finalize()[5], torch.zeros(K, K, dtype=torch.float64))


def test_all_experts_mode_adds_every_token_to_every_expert():
    E, K = 4, 6
    X = _x(90, K, seed=6)
    idx = torch.zeros(90, 2, dtype=torch.int64)  # the routing is ignored in this mode
    acc = HessianAccumulator(E, K, all_experts=True, dtype=torch.float64)
    for s in range(0, 90, 30):
        acc.add_routed(X[s : s + 30], idx[s : s + 30], torch.ones(30, 2))
    ref = 2 / 90 * X.double().T @ X.double()
    H = acc.finalize()
    for e in range(E):
        assert torch.allclose(H[e], ref, rtol=1e-12)
    assert acc.tokens.tolist() == [90] * E


def test_add_to_all_and_input_checks():
    acc = HessianAccumulator(2, 4)
    acc.add(None, _x(10, 4, seed=7))
    assert acc.tokens.tolist() == [10, 10] and torch.equal(acc.finalize()[0], acc.finalize()[1])
    with pytest.raises(ValueError):
        acc.add(0, _x(10, 5, seed=8))
    with pytest.raises(ValueError):
        acc.add_routed(_x(3, 4, seed=9), torch.tensor([[0], [1], [2]]))
    acc.add(0, _x(5, 4, seed=10).to(torch.bfloat16))  # any input dtype is cast to the accumulator's
    assert acc.tokens.tolist() == [15, 10]


@pytest.mark.parametrize("weighted", [False, True])
def test_a_chunk_of_experts_accumulates_what_the_whole_layer_does(weighted):
    """add_routed(experts=[...]) keeps rows for those experts only; each row equals the full accumulator's."""
    E, K, T = 6, 10, 150
    g = torch.Generator().manual_seed(11)
    X = _x(T, K, seed=12)
    idx = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(T)])  # [T, 2]
    wts = torch.softmax(torch.randn(T, 2, generator=g), -1) if weighted else None
    full = HessianAccumulator(E, K)
    full.add_routed(X, idx, wts)
    for part in ([4, 1], [5], [0, 2, 3]):
        acc = HessianAccumulator(len(part), K)
        for s in range(0, T, 50):
            acc.add_routed(
                X[s : s + 50], idx[s : s + 50], None if wts is None else wts[s : s + 50], experts=part
            )
        assert acc.tokens.tolist() == full.tokens[part].tolist()
        assert torch.allclose(acc.finalize(), full.finalize()[part], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("K", [100, 600])  # one mirror block; several, the last one partial
def test_finalize_mirrors_the_computed_upper_triangle(K):
    """add computes the upper triangle (and whole diagonal blocks); finalize copies it to the lower one, so
    every H is exactly symmetric and its upper triangle is the accumulated one, scaled."""
    torch.manual_seed(3)
    acc = HessianAccumulator(2, K)
    X = torch.randn(300, K)
    acc.add(0, X)
    acc.add(1, X[:40] * 3)
    upper = acc.S.clone().triu()  # [2, K, K] what add summed, on and above the diagonal
    H = acc.finalize()
    for e, n in ((0, 300), (1, 40)):
        assert torch.equal(H[e], H[e].T)
        assert torch.equal(H[e].triu(), upper[e] * torch.tensor(2.0 / n, dtype=torch.float64).float())
    full = 2 / 300 * X.T @ X
    assert torch.allclose(H[0], full, rtol=1e-4, atol=1e-4)
