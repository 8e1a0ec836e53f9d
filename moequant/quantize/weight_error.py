"""An expert's relative weight error over both projections: sqrt(sum ||W - Q||^2 / sum ||W||^2)."""

from __future__ import annotations

import torch

from moequant.modules.qlinear import PackedWeight, dequantized_rows


def err_sums(W: torch.Tensor, q, num=0.0, den=0.0):
    """(num + ||W - Q||^2, den + ||W||^2) for W [N, K] and its quantized storage q, one float32 row slice
    at a time (no float32 copy of the whole matrix)."""
    for r1, r2, d in dequantized_rows(q, torch.float32, scratch=True):  # d [r, K] (packed: one reused buffer)
        Wr = W[r1:r2].to(torch.float32)  # [r, K] (may be W itself or d's own storage: never written)
        den = den + Wr.pow(2).sum()  # ||W||^2 (sum's cascade: float32 norms drift by 1e-4 at these sizes)
        # ||Q - W||^2: a packed slice is the reused buffer, written over; other storages may hand out their own
        diff = d.sub_(Wr) if isinstance(q, PackedWeight) else d - Wr
        num = num + diff.pow_(2).sum()
        del d, Wr, diff
    return num, den


def rel_err(num, den) -> float:
    """sqrt(num / den), rounded to 6 digits as the report stores it (num, den: err_sums over both projections)."""
    return round(float((num / den.clamp(min=1e-30)).sqrt()), 6)
