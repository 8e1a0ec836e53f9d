"""Round-to-nearest (rtn.py): against a direct group-by-group computation, in the packed format, per expert."""

from __future__ import annotations

import pytest
import torch

from moequant.quantizers.rtn import rtn_quantize

WIDTHS = (2, 3, 4, 8)


def _weights(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.05


def _direct_rtn(W: torch.Tensor, bits: int, gs: int, sym: bool) -> torch.Tensor:
    """Independent group-by-group RTN in float64 from the grid's definition (fp16 scales)."""
    maxq = (1 << bits) - 1
    out = torch.empty_like(W, dtype=torch.float64)
    for g0 in range(0, W.shape[-1], gs):
        x = W[..., g0 : g0 + gs].to(torch.float64)
        xmin = x.amin(-1, keepdim=True).clamp(max=0)
        xmax = x.amax(-1, keepdim=True).clamp(min=0)
        if sym:
            xmax = torch.maximum(-xmin, xmax)
            xmin = -xmax
        scale = ((xmax - xmin) / maxq).to(torch.float32).to(torch.float16).to(torch.float64)
        zero = torch.full_like(scale, 1 << (bits - 1)) if sym else torch.round(-xmin / scale)
        q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
        out[..., g0 : g0 + gs] = (q - zero) * scale
    return out


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("k", [96, 100])  # 100: the last group is partial
def test_rtn_matches_direct_computation_and_packed_format(bits, sym, k):
    W = _weights(3, 10, k, seed=k + bits)  # [E, N, K]
    res = rtn_quantize(W, bits, group_size=32, sym=sym)
    G = (k + 31) // 32
    assert res.codes.shape == (3, 10, k) and res.codes.dtype == torch.uint8
    assert res.scales.shape == (3, 10, G) and res.scales.dtype == torch.float16
    assert (res.zeros is None) == sym and res.g_idx is None
    Q = res.dequantize()  # [E, N, K]
    assert torch.allclose(Q.double(), _direct_rtn(W, bits, 32, sym), rtol=0, atol=1e-6)
    for e in range(3):  # the stored format gives back exactly the quantizer's output
        assert torch.equal(res.packed(e).dequantize(), Q[e])
        assert torch.equal(res.packed(e).dequantize(torch.bfloat16), res.dequantize(torch.bfloat16)[e])


def test_rtn_single_matrix_and_per_expert_equal_batched():
    W = _weights(4, 12, 70, seed=1)
    full = rtn_quantize(W, 3, 16)
    for e in range(4):
        one = rtn_quantize(W[e], 3, 16)  # 2-D input -> E = 1
        assert one.codes.shape == (1, 12, 70)
        assert torch.equal(one.codes[0], full.codes[e]) and torch.equal(one.scales[0], full.scales[e])
        assert torch.equal(one.zeros[0], full.zeros[e])


def test_rtn_error_falls_with_width():
    W = _weights(2, 32, 256, seed=5)
    errs = [float((rtn_quantize(W, b, 128).dequantize() - W).norm()) for b in WIDTHS]
    assert errs == sorted(errs, reverse=True) and errs[-1] < errs[0] / 30


def test_rtn_rejects_bad_width():
    from moequant.errors import PlanError

    with pytest.raises(PlanError):
        rtn_quantize(_weights(4, 8), 5, 8)
