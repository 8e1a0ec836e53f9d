"""One packed projection (packed.py): PackedLinear from integer codes, against the direct formula; its bytes."""

import pytest
import torch

from moequant.quantizers.packed import PackedLinear, packed_nbytes
from moequant.quantizers.packing import packed_rows

WIDTHS = (2, 3, 4, 8)


def _codes(*shape: int, bits: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.int64).to(torch.uint8)


def _direct_dequant(codes, scales, zeros, bits, group_size, g_idx):
    """W[n, k] = (code[k, n] - zero[g(k), n]) * scale[g(k), n], element by element."""
    k_dim, n_dim = codes.shape
    out = torch.empty(n_dim, k_dim)
    for k in range(k_dim):
        g = int(g_idx[k]) if g_idx is not None else k // group_size
        for n in range(n_dim):
            z = (1 << (bits - 1)) if zeros is None else int(zeros[g, n])
            out[n, k] = (float(codes[k, n]) - z) * float(scales[g, n])
    return out


@pytest.mark.parametrize("bits", WIDTHS)
def test_packed_linear_from_codes(bits):
    n, k, gs = 6, 40, 16
    codes = _codes(n, k, bits=bits, seed=3)  # [N, K]
    scales = torch.rand(n, 3) + 0.1  # [N, G]
    zeros = _codes(n, 3, bits=bits, seed=4)  # [N, G]
    pl = PackedLinear.from_codes(codes, scales, zeros, bits, gs)
    assert pl.qweight.shape == (packed_rows(k, bits), n) and pl.scales.shape == (3, n)
    expected = _direct_dequant(codes.T, scales.T.to(torch.float16), zeros.T, bits, gs, None)
    assert torch.equal(pl.dequantize(), expected)
    assert pl.nbytes() == packed_nbytes(n, k, bits, gs, sym=False)
    sym = PackedLinear.from_codes(codes, scales, None, bits, gs)
    assert sym.sym and sym.nbytes() == packed_nbytes(n, k, bits, gs, sym=True)
