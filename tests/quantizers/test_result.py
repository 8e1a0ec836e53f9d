"""The integer quantizers' result (result.py): dequantized by the direct formula, in the stored format bit for bit,
one expert at a time."""

import pytest
import torch

from moequant.quantizers.result import QuantResult


def _result(sym: bool, act_order: bool) -> QuantResult:
    g = torch.Generator().manual_seed(int(sym) + 2 * int(act_order))
    E, N, K, bits, gs = 2, 5, 20, 3, 8  # 3 groups, the last partial
    return QuantResult(
        codes=torch.randint(0, 8, (E, N, K), generator=g).to(torch.uint8),
        scales=(torch.rand(E, N, 3, generator=g) + 0.1).to(torch.float16),
        zeros=None if sym else torch.randint(0, 8, (E, N, 3), generator=g).to(torch.uint8),
        g_idx=torch.randint(0, 3, (E, K), generator=g, dtype=torch.int32) if act_order else None,
        bits=bits,
        group_size=gs,
        losses=torch.tensor([1.0, 2.0], dtype=torch.float64),
    )


def _direct(r: QuantResult, e: int) -> torch.Tensor:
    """W[n, k] = (code[n, k] - zero[n, g(k)]) * scale[n, g(k)], element by element."""
    N, K = r.codes.shape[1:]
    out = torch.empty(N, K)
    for k in range(K):
        g = int(r.g_idx[e, k]) if r.g_idx is not None else k // r.group_size
        for n in range(N):
            z = 4 if r.zeros is None else int(r.zeros[e, n, g])  # symmetric 3-bit: zero 2**(bits-1)
            out[n, k] = (int(r.codes[e, n, k]) - z) * float(r.scales[e, n, g])
    return out


@pytest.mark.parametrize("sym,act_order", [(False, False), (True, False), (False, True)])
def test_dequantize_packed_and_one_expert(sym, act_order):
    r = _result(sym, act_order)
    assert (r.num_experts, r.sym) == (2, sym)
    W = r.dequantize()
    assert W.shape == (2, 5, 20)
    for e in range(2):
        assert torch.equal(W[e], _direct(r, e))
        assert torch.equal(r.packed(e).dequantize(), W[e])  # the stored format, bit for bit
        one = r.expert(e)
        assert one.num_experts == 1 and one.losses.tolist() == [float(e + 1)] and one.damp is None
        assert torch.equal(one.dequantize()[0], W[e])
    assert r.dequantize(torch.float16).dtype == torch.float16
