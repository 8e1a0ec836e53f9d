"""GPTQ (moequant/quantizers/gptq.py): against a port of the reference, RTN, its own loss, and batch invariance.

The factorisation backends are tested in test_gptq_factor.py, the CPU scheduling in test_gptq_threads.py."""

from __future__ import annotations

import logging

import pytest
import torch

from moequant.config import GPTQOptions, QuantSpec
from moequant.quantize.hessian import HessianAccumulator
from moequant.quantizers.gptq import HessianError, gptq_quantize
from moequant.quantizers.grid import dequant, find_params, max_code, quantize_codes
from moequant.quantizers.rtn import rtn_quantize

WIDTHS = (2, 3, 4, 8)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def correlated_inputs(T: int, K: int, seed: int, rank: int = 8, noise: float = 0.3) -> torch.Tensor:
    """X [T, K]: a strong rank-`rank` part, uneven channel scales, and a noise floor."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, rank, generator=g) @ torch.randn(rank, K, generator=g)
    X += noise * torch.randn(T, K, generator=g)
    return X * torch.exp(0.5 * torch.randn(K, generator=g))  # [T, K]


def hessian(X: torch.Tensor) -> torch.Tensor:
    return 2 / X.shape[0] * X.T @ X  # [K, K]


def weights(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.05


def output_error(X: torch.Tensor, W: torch.Tensor, Q: torch.Tensor) -> float:
    return float((X.double() @ (W.double() - Q.double()).T).norm())  # ||X W^T - X Q^T||_F


def reference_gptq(W, H, bits, gs, sym, act_order=False, blocksize=128, percdamp=0.01):
    """IST-DASLab `fasterquant`, ported line by line in float64.

    One deliberate change: a group's grid is found on the current weights cat(W1[:, i:], W[:, i2:]);
    the literal reference reads W, stale inside a block when group_size < blocksize.
    """
    W, H = W.clone().double(), H.clone().double()
    N, K = W.shape
    maxq = max_code(bits)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    Q = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    H[range(K), range(K)] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1, Q1, Err1 = W[:, i1:i2].clone(), torch.zeros(N, i2 - i1).double(), torch.zeros(N, i2 - i1).double()
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if (i1 + i) % gs == 0:
                scale, zero = find_params(torch.cat([W1[:, i:], W[:, i2:]], 1)[:, :gs].float(), bits, sym)
                scale, zero = scale.double(), zero.double()
            q = dequant(quantize_codes(w, scale, zero, maxq), scale, zero)
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if act_order:
        Q = Q[:, torch.argsort(perm)]
    return Q.float()


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_matches_reference_port(bits, sym, act_order):
    K = 100  # groups of 32 inside blocks of 64, the last group and block partial
    X = correlated_inputs(600, K, seed=bits, noise=1.0)
    W, H = weights(24, K, seed=bits), hessian(X)
    cfg = (
        QuantSpec(bits=bits, group_size=32, sym=sym),
        GPTQOptions(static_groups=False, act_order=act_order, blocksize=64),
    )
    Q = gptq_quantize(W, H, *cfg).dequantize()[0]
    Qref = reference_gptq(W, H, bits, 32, sym, act_order, blocksize=64)
    assert float((Q == Qref).float().mean()) > 0.98  # float32 vs float64: a few ties round apart
    assert output_error(X, W, Q) == pytest.approx(output_error(X, W, Qref), rel=0.02)


@pytest.mark.parametrize("gs,blocksize", [(16, 64), (64, 64), (64, 32), (96, 40)])
def test_group_and_block_sizes_match_reference(gs, blocksize):
    X = correlated_inputs(500, 128, seed=gs)
    W, H = weights(16, 128, seed=blocksize), hessian(X)
    Q = gptq_quantize(
        W,
        H,
        QuantSpec(bits=3, group_size=gs),
        GPTQOptions(act_order=False, static_groups=False, blocksize=blocksize),
    ).dequantize()[0]
    Qref = reference_gptq(W, H, 3, gs, False, blocksize=128)
    assert float((Q == Qref).float().mean()) > 0.98


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_output_error_below_rtn(bits, seed):
    K = 128
    X = correlated_inputs(1024, K, seed=seed)
    W = weights(48, K, seed=seed + 10)
    acc = HessianAccumulator(1, K)
    for chunk in X.split(100):
        acc.add(0, chunk)
    for sym in (False, True):
        Q = gptq_quantize(
            W,
            acc.finalize()[0],
            QuantSpec(bits=bits, group_size=64, sym=sym),
            GPTQOptions(act_order=False, static_groups=False),
        ).dequantize()[0]
        Qr = rtn_quantize(W, bits, 64, sym).dequantize()[0]
        assert output_error(X, W, Q) < 0.8 * output_error(X, W, Qr)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_act_order_helps_on_uneven_channels(bits):
    ratios = []
    for seed in range(3):
        X = correlated_inputs(800, 128, seed=seed)
        W, H = weights(32, 128, seed=seed), hessian(X)
        errs = [
            output_error(
                X,
                W,
                gptq_quantize(
                    W, H, QuantSpec(bits=bits, group_size=32), GPTQOptions(static_groups=False, act_order=a)
                ).dequantize()[0],
            )
            for a in (False, True)
        ]
        ratios.append(errs[1] / errs[0])
    assert sum(ratios) / len(ratios) < 1.0


def test_act_order_g_idx_maps_columns_to_groups_by_position():
    X = correlated_inputs(300, 72, seed=4)
    W, H = weights(8, 72, seed=4), hessian(X)
    res = gptq_quantize(
        W, H, QuantSpec(bits=4, group_size=16), GPTQOptions(static_groups=False, act_order=True)
    )
    perm = torch.argsort(torch.diag(H), descending=True, stable=True)
    expected = torch.empty(72, dtype=torch.int32)
    expected[perm] = torch.arange(72, dtype=torch.int32) // 16
    assert torch.equal(res.g_idx[0], expected)
    assert torch.equal(res.packed(0).dequantize(), res.dequantize()[0])


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("act_order", [False, True])
def test_loss_equals_quadratic_error(bits, act_order):
    """sum(Losses) = tr((W - Q) (H + damp I) (W - Q)^T) / 2: the factor of H is right."""
    X = correlated_inputs(400, 80, seed=bits)
    W, H = weights(3, 20, 80, seed=bits), torch.stack([hessian(X), hessian(X[:200]), hessian(X[200:])])
    res = gptq_quantize(
        W, H, QuantSpec(bits=bits, group_size=16), GPTQOptions(static_groups=False, act_order=act_order)
    )
    D = (W - res.dequantize()).double()  # [E, N, K]
    Hd = H.double() + res.damp.double()[:, None, None] * torch.eye(80, dtype=torch.float64)
    expected = 0.5 * torch.einsum("enk,ekl,enl->e", D, Hd, D)
    assert torch.allclose(res.losses, expected, rtol=2e-3)


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("k", [64, 100])
def test_identity_hessian_equals_rtn_exactly(bits, sym, k):
    W = weights(3, 10, k, seed=k)
    H = torch.eye(k).expand(3, k, k)
    for act_order in (False, True):  # equal diagonal: act-order keeps the order (stable sort)
        res = gptq_quantize(
            W,
            H,
            QuantSpec(bits=bits, group_size=32, sym=sym),
            GPTQOptions(static_groups=False, act_order=act_order),
        )
        ref = rtn_quantize(W, bits, 32, sym)
        assert torch.equal(res.codes, ref.codes) and torch.equal(res.scales, ref.scales)
        assert sym or torch.equal(res.zeros, ref.zeros)
        assert torch.equal(res.dequantize(), ref.dequantize())


def _assert_same(a, b):
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.scales, b.scales)
    assert (a.zeros is None and b.zeros is None) or torch.equal(a.zeros, b.zeros)
    assert (a.g_idx is None and b.g_idx is None) or torch.equal(a.g_idx, b.g_idx)
    assert torch.equal(a.damp, b.damp) and torch.equal(a.losses, b.losses)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(
    "N,K,gs,blocksize", [(13, 100, 32, 64), (64, 256, 128, 128), (7, 50, 8, 128), (9, 72, 48, 16)]
)
def test_batched_equals_per_expert_bit_for_bit(sym, act_order, N, K, gs, blocksize):
    E = 5
    W = weights(E, N, K, seed=N)
    H = torch.stack([hessian(correlated_inputs(3 * K, K, seed=10 * N + e)) for e in range(E)])
    H[1, :, 3] = H[1, 3, :] = 0  # expert 1 has a dead input channel
    H[3] -= 0.3 * H[3].diagonal().mean() * torch.eye(K)  # expert 3 needs escalated damping
    cfg = (
        QuantSpec(bits=3, group_size=gs, sym=sym),
        GPTQOptions(static_groups=False, act_order=act_order, blocksize=blocksize),
    )
    full = gptq_quantize(W, H, *cfg)
    for e in range(E):
        _assert_same(full.expert(e), gptq_quantize(W[e], H[e], *cfg))
    _assert_same(full.expert(2), gptq_quantize(W[1:4], H[1:4], *cfg).expert(1))  # batch composition


def test_hessian_scale_by_power_of_two_is_exact():
    X = correlated_inputs(300, 64, seed=9)
    W, H = weights(12, 64, seed=9), hessian(X)
    cfg = (QuantSpec(bits=3, group_size=32), GPTQOptions(act_order=False, static_groups=False))
    assert torch.equal(gptq_quantize(W, H, *cfg).codes, gptq_quantize(W, 4.0 * H, *cfg).codes)


def test_dead_columns_and_expert_without_tokens():
    K = 64
    X = correlated_inputs(400, K, seed=3)
    X[:, [5, 17, 40]] = 0  # channels that never see input
    W = weights(2, 16, K, seed=3)
    H = torch.stack([hessian(X), torch.zeros(K, K)])  # expert 1 saw no token
    for bits in WIDTHS:
        res = gptq_quantize(
            W, H, QuantSpec(bits=bits, group_size=32), GPTQOptions(act_order=False, static_groups=False)
        )
        Q = res.dequantize()
        assert torch.isfinite(Q).all() and torch.isfinite(res.losses).all()
        assert torch.equal(Q[0][:, [5, 17, 40]], torch.zeros(16, 3))  # dead weights are zeroed
        assert torch.equal(Q[1], torch.zeros(16, K))  # all channels dead
        assert output_error(X, W[0], Q[0]) < output_error(
            X, W[0], rtn_quantize(W[0], bits, 32).dequantize()[0]
        )


def test_damping_escalation_on_singular_hessian_warns(caplog):
    K = 48
    X = correlated_inputs(200, K, seed=1, rank=4, noise=0.0)  # rank 4 < K: singular H
    H = torch.stack([hessian(correlated_inputs(200, K, seed=2)), hessian(X)])
    W = weights(2, 8, K, seed=1)
    cfg = (
        QuantSpec(bits=4, group_size=16),
        GPTQOptions(act_order=False, static_groups=False, percdamp=1e-9),
    )  # far below float32 resolution
    with caplog.at_level(logging.WARNING, logger="moequant.quantizers.gptq"):
        res = gptq_quantize(W, H, *cfg)
    assert "damping escalated for expert(s) 1 " in caplog.text
    assert "expert(s) 0" not in caplog.text
    mean_diag = H.diagonal(dim1=1, dim2=2).mean(-1)
    assert float(res.damp[0]) == pytest.approx(1e-9 * float(mean_diag[0]), rel=1e-5)
    assert float(res.damp[1]) > 1e-8 * float(mean_diag[1])  # escalated by at least one factor of 10
    assert torch.isfinite(res.dequantize()).all()


def test_indefinite_hessian_escalates_then_fails_cleanly(caplog):
    K = 32
    H = hessian(correlated_inputs(200, K, seed=5))
    H_neg = H - 0.05 * H.diagonal().mean() * torch.eye(K)  # smallest eigenvalue ~ -0.05 mean(diag)
    W = weights(8, K, seed=5)
    with caplog.at_level(logging.WARNING, logger="moequant.quantizers.gptq"):
        res = gptq_quantize(
            W, H_neg, QuantSpec(bits=4, group_size=16), GPTQOptions(act_order=False, static_groups=False)
        )  # 0.01 fails, 0.1 works
    assert "percdamp 0.1" in caplog.text
    assert float(res.damp[0]) == pytest.approx(0.1 * float(H_neg.diagonal().mean()), rel=1e-5)
    with pytest.raises(HessianError, match="expert"):
        gptq_quantize(
            W,
            -torch.eye(K) - 1,
            QuantSpec(bits=4, group_size=16),
            GPTQOptions(act_order=False, static_groups=False, max_damp_tries=2),
        )
    H_nan = H.clone()
    H_nan[2, 3] = H_nan[3, 2] = float("nan")
    with pytest.raises(HessianError, match="non-finite"):
        gptq_quantize(
            W, H_nan, QuantSpec(bits=4, group_size=16), GPTQOptions(act_order=False, static_groups=False)
        )


def test_inputs_are_not_modified_and_shapes_checked():
    W, H = (
        weights(2, 6, 32, seed=0),
        torch.stack([hessian(correlated_inputs(100, 32, seed=s)) for s in range(2)]),
    )
    H[0, :, 1] = H[0, 1, :] = 0
    W0, H0 = W.clone(), H.clone()
    gptq_quantize(W, H, QuantSpec(bits=4, group_size=16), GPTQOptions(static_groups=False, act_order=True))
    assert torch.equal(W, W0) and torch.equal(H, H0)
    with pytest.raises(ValueError):
        gptq_quantize(
            W,
            H[:, :16, :16],
            QuantSpec(bits=4, group_size=16),
            GPTQOptions(act_order=False, static_groups=False),
        )


@pytest.mark.parametrize("act_order", [True, False])
def test_static_groups_use_the_original_grids(act_order):
    """Static groups, in either column order: the grids are those of the original contiguous groups (RTN's,
    exactly), no g_idx, still batch-exact, still below RTN's output error, and the packed codes dequantize to
    exactly the quantizer's Q."""
    from moequant.config import GPTQOptions, QuantSpec
    from moequant.quantizers.packing import dequantize as _deq
    from moequant.quantizers.rtn import rtn_quantize as _rtn

    g = torch.Generator().manual_seed(4)
    E, N, K = 3, 12, 80
    X = torch.randn(400, K, generator=g) @ torch.randn(K, K, generator=g) * 0.3 + torch.randn(
        400, K, generator=g
    )
    H = (2 / 400 * X.T @ X)[None].repeat(E, 1, 1)  # [E, K, K]
    W = torch.randn(E, N, K, generator=g)
    cfg = (QuantSpec(bits=3, group_size=32), GPTQOptions(act_order=act_order, static_groups=True))
    res = gptq_quantize(W, H, *cfg)
    assert res.g_idx is None
    rtn = _rtn(W, 3, 32)
    assert torch.equal(res.scales, rtn.scales) and torch.equal(res.zeros, rtn.zeros)
    for e in range(E):
        one = gptq_quantize(W[e], H[e], *cfg)
        assert torch.equal(one.codes[0], res.codes[e]) and torch.equal(one.scales[0], res.scales[e])
        assert torch.equal(one.zeros[0], res.zeros[e])
        p = res.packed(e)
        assert torch.equal(_deq(p.qweight, p.scales, p.qzeros, 3, K, 32), res.dequantize()[e])
    Q, R = res.dequantize(), rtn.dequantize()
    for e in range(E):
        assert (X @ (W[e] - Q[e]).T).norm() < 0.9 * (X @ (W[e] - R[e]).T).norm()


@pytest.mark.parametrize("act_order", [False, True])
def test_consume_hessian_frees_it_and_changes_nothing(act_order):
    """consume_hessian=True gives the same result byte for byte and frees H's memory once factored, but only
    when H owns its storage and the experts run as one chunk: a view of a larger tensor is left alone."""
    E, N, K = 2, 64, 128
    W = torch.randn(E, N, K, generator=torch.Generator().manual_seed(5))
    H = torch.stack([hessian(correlated_inputs(400, K, seed=20 + e)) for e in range(E)])  # [E, K, K]
    cfg = (QuantSpec(bits=3, group_size=32), GPTQOptions(act_order=act_order, static_groups=act_order))
    want = gptq_quantize(W, H.clone(), *cfg)
    owned = H.clone()
    got = gptq_quantize(W, owned, *cfg, consume_hessian=True)
    for a, b in ((want.codes, got.codes), (want.scales, got.scales), (want.zeros, got.zeros)):
        assert torch.equal(a, b)
    assert owned.untyped_storage().nbytes() == 0  # freed
    big = torch.cat([H, H])  # [2E, K, K]
    view = big[:E]
    got = gptq_quantize(W, view, *cfg, consume_hessian=True)
    assert torch.equal(got.codes, want.codes)
    assert big.untyped_storage().nbytes() == big.numel() * 4  # a view: never freed
    assert torch.equal(big[E:], H)


@pytest.mark.parametrize("backend", ["lapack", "torch"])
@pytest.mark.parametrize("act_order", [False, True])
def test_err_sums_are_the_stored_weights_error(backend, act_order):
    """QuantResult.err_sums, summed in the column loop: (sum (W - Q)^2, sum W^2) per expert against the stored
    codes, dead input channels (zeroed, their W^2 counted in both) included."""
    from moequant.config import GPTQBackend

    g = torch.Generator().manual_seed(8)
    E, N, K = 3, 24, 96
    X = torch.randn(500, K, generator=g) @ torch.randn(K, K, generator=g) * 0.2
    X[:, [5, 40]] = 0.0  # two dead channels for every expert
    H = (2 / 500 * X.T @ X)[None].repeat(E, 1, 1)  # [E, K, K]
    H[1, 70, :] = H[1, :, 70] = 0.0  # one more for expert 1
    W = torch.randn(E, N, K, generator=g).to(torch.bfloat16)  # [E, N, K] as stored
    opts = GPTQOptions(act_order=act_order, backend=GPTQBackend(backend), blocksize=32)
    res = gptq_quantize(W, H, QuantSpec(bits=3, group_size=32), opts)
    Wf = W.double()
    want_num = (Wf - res.dequantize().double()).square().sum(dim=(1, 2))  # [E]
    want_den = Wf.square().sum(dim=(1, 2))  # [E]
    assert torch.allclose(res.err_sums[:, 0], want_num, rtol=1e-6)
    assert torch.allclose(res.err_sums[:, 1], want_den, rtol=1e-6)
    assert (res.dequantize()[1][:, 70] == 0).all() and want_num[1] > 0
