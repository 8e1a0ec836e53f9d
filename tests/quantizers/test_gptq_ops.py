"""The batched torch GPTQ backend (what accelerators run), forced on CPU: the same algorithm as the per-expert
LAPACK backend, checked against it, against the float64 reference port, and against the loss identity."""

from __future__ import annotations

import logging

import pytest
import torch

from moequant.config import GPTQBackend, GPTQOptions, QuantSpec
from moequant.quantizers.gptq import HessianError, gptq_quantize
from moequant.quantizers.gptq_ops import BatchedOps, PerExpertOps, ops_for
from moequant.quantizers.rtn import rtn_quantize

from .test_gptq import correlated_inputs, hessian, output_error, reference_gptq, weights

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
TORCH, LAPACK = GPTQBackend.TORCH, GPTQBackend.LAPACK


def _stack(E: int, N: int, K: int, seed: int):
    W = weights(E, N, K, seed=seed)
    H = torch.stack([hessian(correlated_inputs(3 * K, K, seed=seed + e)) for e in range(E)])  # [E, K, K]
    return W, H


def test_ops_choice():
    assert ops_for(GPTQBackend.AUTO, torch.device("cpu")) is PerExpertOps
    assert ops_for(GPTQBackend.AUTO, torch.device("cuda")) is BatchedOps
    assert ops_for(TORCH, torch.device("cpu")) is BatchedOps
    with pytest.raises(ValueError, match="CPU only"):
        ops_for(LAPACK, torch.device("cuda"))


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("N,K,gs,blocksize", [(13, 100, 32, 64), (24, 256, 128, 128), (9, 72, 48, 16)])
def test_torch_backend_agrees_with_lapack(sym, act_order, static, N, K, gs, blocksize):
    """Same codes up to float32 ties, the same output error, losses within rounding."""
    W, H = _stack(5, N, K, seed=N + K)
    H[1, :, 3] = H[1, 3, :] = 0  # expert 1 has a dead input channel
    spec = QuantSpec(bits=3, group_size=gs, sym=sym)
    kw = dict(act_order=act_order, static_groups=static, blocksize=blocksize)
    a = gptq_quantize(W, H, spec, GPTQOptions(**kw, backend=LAPACK))
    b = gptq_quantize(W, H, spec, GPTQOptions(**kw, backend=TORCH))
    assert float((a.codes == b.codes).float().mean()) > 0.99
    assert torch.equal(a.damp, b.damp) or torch.allclose(a.damp, b.damp, rtol=1e-6)
    assert torch.allclose(a.losses, b.losses, rtol=2e-2)
    assert (a.g_idx is None) == (b.g_idx is None)
    X = correlated_inputs(3 * K, K, seed=N + K)  # expert 0's inputs
    ea, eb = output_error(X, W[0], a.dequantize()[0]), output_error(X, W[0], b.dequantize()[0])
    assert eb == pytest.approx(ea, rel=0.02)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_torch_backend_matches_reference_port_and_beats_rtn(bits):
    K = 100
    X = correlated_inputs(600, K, seed=bits, noise=1.0)
    W, H = weights(24, K, seed=bits), hessian(X)
    cfg = (
        QuantSpec(bits=bits, group_size=32),
        GPTQOptions(static_groups=False, act_order=True, blocksize=64, backend=TORCH),
    )
    Q = gptq_quantize(W, H, *cfg).dequantize()[0]
    Qref = reference_gptq(W, H, bits, 32, False, True, blocksize=64)
    assert float((Q == Qref).float().mean()) > 0.98
    assert output_error(X, W, Q) < output_error(X, W, rtn_quantize(W, bits, 32).dequantize()[0])


@pytest.mark.parametrize("act_order", [False, True])
def test_torch_backend_loss_is_the_quadratic_error(act_order):
    W, H = _stack(3, 20, 80, seed=7)
    res = gptq_quantize(
        W,
        H,
        QuantSpec(bits=3, group_size=16),
        GPTQOptions(static_groups=False, act_order=act_order, backend=TORCH),
    )
    D = (W - res.dequantize()).double()  # [E, N, K]
    Hd = H.double() + res.damp.double()[:, None, None] * torch.eye(80, dtype=torch.float64)
    assert torch.allclose(res.losses, 0.5 * torch.einsum("enk,ekl,enl->e", D, Hd, D), rtol=2e-3)


def test_torch_backend_is_deterministic_and_escalates_per_expert(caplog):
    W, H = _stack(4, 16, 64, seed=3)
    H[2] -= 0.05 * H[2].diagonal().mean() * torch.eye(64)  # expert 2 needs percdamp 0.1
    cfg = (QuantSpec(bits=4, group_size=16), GPTQOptions(act_order=False, static_groups=False, backend=TORCH))
    with caplog.at_level(logging.WARNING, logger="moequant.quantizers.gptq"):
        a = gptq_quantize(W, H, *cfg)
    assert "damping escalated for expert(s) 2 (percdamp 0.1)" in caplog.text
    mean = H.diagonal(dim1=1, dim2=2).mean(-1)
    assert float(a.damp[0]) == pytest.approx(0.01 * float(mean[0]), rel=1e-5)
    assert float(a.damp[2]) == pytest.approx(0.1 * float(mean[2]), rel=1e-5)
    b = gptq_quantize(W, H, *cfg)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
    with pytest.raises(HessianError, match=r"expert\(s\) \[1\]"):
        bad = H.clone()
        bad[1] = -torch.eye(64)
        gptq_quantize(
            W,
            bad,
            QuantSpec(bits=4, group_size=16),
            GPTQOptions(act_order=False, static_groups=False, max_damp_tries=2, backend=TORCH),
        )


def test_torch_backend_consumes_the_hessian():
    W, H = _stack(3, 16, 64, seed=5)
    expected = gptq_quantize(
        W,
        H.clone(),
        QuantSpec(bits=3, group_size=32),
        GPTQOptions(act_order=False, static_groups=False, backend=TORCH),
    )
    Hc = H.clone()
    got = gptq_quantize(
        W,
        Hc,
        QuantSpec(bits=3, group_size=32),
        GPTQOptions(act_order=False, static_groups=False, backend=TORCH),
        consume_hessian=True,
    )
    assert Hc.untyped_storage().nbytes() == 0
    assert torch.equal(got.codes, expected.codes)
