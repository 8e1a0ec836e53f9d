"""One packed projection (packed.py): PackedLinear from integer codes, against the direct formula; its bytes."""

import pytest
import torch
from helpers import direct_dequant, random_codes

from moequant.quantizers.packed import PackedLinear, packed_nbytes
from moequant.quantizers.packing import packed_rows

WIDTHS = (2, 3, 4, 8)


@pytest.mark.parametrize("bits", WIDTHS)
def test_packed_linear_from_codes(bits):
    n, k, gs = 6, 40, 16
    codes = random_codes(n, k, bits=bits, seed=3)  # [N, K]
    scales = torch.rand(n, 3) + 0.1  # [N, G]
    zeros = random_codes(n, 3, bits=bits, seed=4)  # [N, G]
    pl = PackedLinear.from_codes(codes, scales, zeros, bits, gs)
    assert pl.qweight.shape == (packed_rows(k, bits), n) and pl.scales.shape == (3, n)
    expected = direct_dequant(codes.T, scales.T.to(torch.float16), zeros.T, bits, gs, None)
    assert torch.equal(pl.dequantize(), expected)
    assert pl.nbytes() == packed_nbytes(n, k, bits, gs, sym=False)
    sym = PackedLinear.from_codes(codes, scales, None, bits, gs)
    assert sym.sym and sym.nbytes() == packed_nbytes(n, k, bits, gs, sym=True)
