"""The shared min/max grid of the integer quantizers (grid.py): scales as stored, zero points, every weight within
half a step of its grid point."""

from __future__ import annotations

import pytest
import torch

from moequant.quantizers.grid import find_params, max_code, quantize_codes, sym_zero

WIDTHS = (2, 3, 4, 8)


def _weights(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("sym", [False, True])
def test_grid_params(bits, sym):
    w = _weights(3, 9, 32, seed=bits)  # [..., N, Kg]
    scale, zero = find_params(w, bits, sym)
    assert scale.shape == zero.shape == (3, 9)
    assert torch.equal(scale, scale.to(torch.float16).to(torch.float32))  # exactly what is stored
    assert bool((scale > 0).all())
    assert torch.equal(zero, zero.round()) and int(zero.min()) >= 0 and int(zero.max()) <= max_code(bits)
    if sym:
        assert bool((zero == sym_zero(bits)).all()) and sym_zero(bits) == (max_code(bits) + 1) // 2
    # every weight lies within half a step of its grid point (plus the fp16 rounding of the step)
    codes = quantize_codes(w, scale[..., None], zero[..., None], max_code(bits))
    err = (w - (codes - zero[..., None]) * scale[..., None]).abs()
    bound = scale[..., None] * (0.5 + max_code(bits) * 2.0**-11) + 1e-9
    assert bool((err <= bound).all())


def test_grid_all_zero_and_nonnegative_groups():
    w = torch.zeros(2, 16)
    w[1] = torch.linspace(0.0, 1.0, 16)  # no negative weight: a symmetric grid must still cover 1.0
    for sym in (False, True):
        scale, zero = find_params(w, 4, sym)
        codes = quantize_codes(w, scale[:, None], zero[:, None], 15)
        q = (codes - zero[:, None]) * scale[:, None]
        assert torch.equal(q[0], torch.zeros(16))  # all-zero row: exact zeros, finite scale
        assert float((q[1] - w[1]).abs().max()) <= float(scale[1]) * 0.51
