"""Per-expert bitsandbytes quantization (moequant/quantizers/bnb.py) against bitsandbytes itself."""

from __future__ import annotations

import pytest
import torch

from moequant.config import Method
from moequant.quantizers.bnb import BnbMatrix, bnb_nbytes, bnb_quantize

F = pytest.importorskip("bitsandbytes.functional")

FOUR_BIT = {Method.BNB_NF4: "nf4", Method.BNB_FP4: "fp4"}
METHODS = (Method.BNB_NF4, Method.BNB_FP4, Method.BNB_INT8)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _fused(E: int = 3, N: int = 64, K: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randn(E, N, K, generator=torch.Generator().manual_seed(seed)) * 0.02  # [E, N, K]


def _rel_err(A: torch.Tensor, B: torch.Tensor) -> float:
    return float((A.float() - B.float()).norm() / B.float().norm())


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_through_tensors_and_safetensors(method):
    from safetensors.torch import load, save

    W = _fused()
    for m in bnb_quantize(W, method):
        back = BnbMatrix.from_tensors(load(save(m.tensors())))
        assert back.method is method and back.shape == m.shape == (64, 96)
        assert torch.equal(back.dequantize(), m.dequantize())
        assert back.nbytes() == m.nbytes()


@pytest.mark.parametrize(
    "method,max_err", [(Method.BNB_NF4, 0.15), (Method.BNB_FP4, 0.16), (Method.BNB_INT8, 0.01)]
)
def test_error_on_gaussian_weights(method, max_err):
    W = _fused(E=2, N=128, K=256)
    for e, m in enumerate(bnb_quantize(W, method)):
        err = _rel_err(m.dequantize(), W[e])
        assert 0 < err < max_err


def test_nf4_beats_fp4_on_gaussian_weights():
    W = _fused(E=1, N=128, K=256, seed=3)
    nf4, fp4 = (bnb_quantize(W, m)[0].dequantize() for m in (Method.BNB_NF4, Method.BNB_FP4))
    assert _rel_err(nf4, W[0]) < _rel_err(fp4, W[0])


def _reference_4bit_dequant(
    data: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape
) -> torch.Tensor:
    """Independent reference: two codes per byte (high nibble first), value = code * absmax of its 64-block."""
    b = data.flatten().to(torch.int64)
    codes = torch.stack([b >> 4, b & 15], 1).flatten()[: shape[0] * shape[1]]
    return (code[codes] * absmax.repeat_interleave(64)[: codes.numel()]).reshape(shape)


@pytest.mark.parametrize("method", list(FOUR_BIT))
@pytest.mark.parametrize("K", [128, 80])  # 80: rows end inside a 64-block
def test_four_bit_equals_bitsandbytes_on_the_slice_and_on_the_fused_tensor(method, K):
    W = _fused(E=3, N=32, K=K)  # N*K a multiple of 64: blocks never straddle experts
    ours = bnb_quantize(W, method)
    fused_q, fused_state = F.quantize_4bit(W.reshape(-1, K), blocksize=64, quant_type=FOUR_BIT[method])
    per_expert = 32 * K // 64  # absmax blocks per expert
    for e, m in enumerate(ours):
        q, state = F.quantize_4bit(W[e].clone(), blocksize=64, quant_type=FOUR_BIT[method])
        assert torch.equal(m.data, q) and torch.equal(m.absmax, state.absmax)  # bitsandbytes' own codes
        assert torch.equal(
            m.data.flatten(), fused_q.flatten()[e * 16 * K : (e + 1) * 16 * K]
        )  # = fused slice
        assert torch.equal(m.absmax, fused_state.absmax[e * per_expert : (e + 1) * per_expert])
        expected = _reference_4bit_dequant(q, state.absmax, state.code, (32, K))
        assert torch.equal(m.dequantize(), expected)
        if K % 64 == 0:  # bitsandbytes' CPU dequantize_4bit is right only then (see bnb.py)
            assert torch.equal(m.dequantize(), F.dequantize_4bit(q, state))
        assert _rel_err(m.dequantize(), W[e]) < 0.15


def test_int8_equals_bitsandbytes_rowwise():
    W = _fused(E=2, N=16, K=40)
    for e, m in enumerate(bnb_quantize(W, Method.BNB_INT8)):
        CB, SCB, _ = F.int8_vectorwise_quant(W[e].clone().half())
        assert torch.equal(m.data, CB) and torch.equal(m.absmax, SCB)
        assert torch.equal(m.dequantize(), F.int8_vectorwise_dequant(CB, SCB))
        assert m.data.dtype == torch.int8 and m.absmax.shape == (16,)


def test_dtype_odd_sizes_and_storage():
    W = _fused(E=2, N=7, K=13).to(torch.bfloat16)  # N*K = 91: a partial last block
    for method in METHODS:
        ms = bnb_quantize(W, method)
        assert len(ms) == 2 and ms[0].shape == (7, 13)
        expected_dtype = torch.float32 if method is Method.BNB_INT8 else torch.bfloat16
        assert ms[0].dequantize().dtype == expected_dtype
        assert ms[0].dequantize(torch.float16).dtype == torch.float16
        assert ms[1].nbytes() == bnb_nbytes(7, 13, method)
    big = bnb_quantize(_fused(E=1, N=256, K=512), Method.BNB_NF4)[0]
    assert 4.5 <= 8 * big.nbytes() / (256 * 512) < 4.51  # 4 bits + a float32 absmax per 64 weights


def test_single_matrix_and_bad_method():
    assert len(bnb_quantize(_fused()[0], "bnb-nf4")) == 1
    with pytest.raises(ValueError):
        bnb_quantize(_fused(), Method.GPTQ)
