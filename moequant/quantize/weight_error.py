"""An expert's relative weight error over both projections: sqrt(sum ||W - Q||^2 / sum ||W||^2)."""

from __future__ import annotations

import torch

from moequant.modules.qlinear import dequantized_rows


def err_sums(W: torch.Tensor, q, num=0.0, den=0.0):
    """(num + ||W - Q||^2, den + ||W||^2) for W [N, K] and its quantized storage q, one float32 row slice
    at a time (no float32 copy of the whole matrix)."""
    for r1, r2, d in dequantized_rows(q, torch.float32):  # d [r, K]
        Wr = W[r1:r2].to(torch.float32)  # [r, K] (may be W itself or d's own storage: never written)
        num = num + (d - Wr).pow_(2).sum()  # ||Q - W||^2
        den = den + Wr.pow(2).sum()
        del d, Wr
    return num, den


def rel_err(num, den) -> float:
    """sqrt(num / den), rounded to 6 digits as the report stores it (num, den: err_sums over both projections)."""
    return round(float((num / den.clamp(min=1e-30)).sqrt()), 6)
