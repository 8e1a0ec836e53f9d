"""Min/max integer grids for group-wise quantization (the grid GPTQ and RTN share).

Follows the IST-DASLab `quant.py` Quantizer, with two deliberate differences:

* scales are rounded to float16 *before* any code or error is computed, because the
  stored format (packing.py) keeps float16 scales: a quantizer that used the float32
  scale would report errors for weights it never stores, and dequantize(pack(...))
  would not equal its own output bit for bit;
* symmetric grids are always centred on zero (xmin = -xmax). The reference keeps
  xmin = 0 when a group has no negative weight, which with the fixed zero point
  2**(bits-1) halves the usable range and clips the group's largest weights.

Grid, for `bits` b and maxq = 2**b - 1:

    asym:  scale = (xmax - xmin) / maxq   zero = round(-xmin / scale) in [0, maxq]
    sym:   scale = 2 * max|x| / maxq      zero = 2**(b-1) = (maxq + 1) / 2   (packing.py's fixed zero)
    code  = clamp(round(w / scale) + zero, 0, maxq)
    w_hat = (code - zero) * scale          (the exact float32 ops of packing.dequantize)
"""

from __future__ import annotations

import torch

_FP16_MAX = torch.finfo(torch.float16).max
_FP16_MIN_SUBNORMAL = 2.0**-24  # smallest positive float16: a scale never rounds to zero


def max_code(bits: int) -> int:
    return (1 << bits) - 1


def sym_zero(bits: int) -> int:
    """The fixed zero point of symmetric grids, as packing.py stores it."""
    return 1 << (bits - 1)


def find_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid of each row of one group: w [..., N, Kg] -> scale [..., N], zero [..., N] (both float32).

    `scale` holds float16-representable values; `zero` holds integers in [0, maxq].
    """
    maxq = max_code(bits)
    w = w.to(torch.float32)  # [..., N, Kg]
    xmin = w.amin(dim=-1).clamp(max=0.0)  # [..., N] the grid always contains 0
    xmax = w.amax(dim=-1).clamp(min=0.0)  # [..., N]
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)  # [..., N]
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)  # [..., N] all-zero rows: any non-zero scale, as in the reference
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq  # [..., N]
    scale = scale.clamp(_FP16_MIN_SUBNORMAL, _FP16_MAX).to(torch.float16).to(torch.float32)  # as stored
    if sym:
        zero = torch.full_like(scale, float(sym_zero(bits)))  # [..., N]
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)  # [..., N]
    return scale, zero


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Integer codes (as float32) of w on the grid: clamp(round(w / scale) + zero, 0, maxq).

    scale/zero broadcast against w; `out` (optional) receives the codes.
    """
    t = torch.div(w, scale).round_().add_(zero)
    return torch.clamp(t, 0, maxq, out=out)


def dequant(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Grid values of float codes: the same float32 ops, in the same order, as packing.dequantize."""
    return (codes - zero) * scale


def num_groups(k: int, group_size: int) -> int:
    return (k + group_size - 1) // group_size
