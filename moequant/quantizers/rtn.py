"""Round-to-nearest group-wise quantization of a stack of experts (calibration-free)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moequant.config import WIDTHS
from moequant.errors import PlanError
from moequant.quantizers.grid import find_params, max_code, num_groups, quantize_codes
from moequant.quantizers.result import QuantResult


def rtn_quantize(W: torch.Tensor, bits: int, group_size: int = 128, sym: bool = False) -> QuantResult:
    """W [E, N, K] or [N, K] (out, in) -> QuantResult with E experts (E = 1 for a 2-D W).

    Groups run along K; the last one is partial when K is not a multiple of group_size.
    """
    if bits not in WIDTHS:
        raise PlanError(f"invalid width {bits}; supported widths: {WIDTHS}")
    if group_size <= 0:
        raise PlanError(f"invalid group size {group_size}")
    if W.dim() == 2:
        W = W.unsqueeze(0)  # [1, N, K]
    if W.dim() != 3:
        raise ValueError(f"rtn_quantize expects W [E, N, K] or [N, K], got {tuple(W.shape)}")
    e, n, k = W.shape
    g = num_groups(k, group_size)
    maxq = max_code(bits)
    # zero padding leaves every group's grid unchanged: the grid always contains 0
    Wp = F.pad(W.to(torch.float32), (0, g * group_size - k))  # [E, N, G*gs] float32
    Wg = Wp.view(e, n, g, group_size)  # [E, N, G, gs]
    scale, zero = find_params(Wg, bits, sym)  # [E, N, G] float32 each
    codes = quantize_codes(Wg, scale[..., None], zero[..., None], maxq)  # [E, N, G, gs] float32
    codes = codes.view(e, n, g * group_size)[..., :k]  # [E, N, K]
    return QuantResult(
        codes=codes.to(torch.uint8).contiguous(),  # [E, N, K] uint8
        scales=scale.to(torch.float16),  # [E, N, G] float16 (exact: already fp16 values)
        zeros=None if sym else zero.to(torch.uint8),  # [E, N, G] uint8
        g_idx=None,
        bits=bits,
        group_size=group_size,
    )


def rtn_roundtrip(
    W: torch.Tensor, bits: int, group_size: int = 128, sym: bool = False, dtype=None
) -> torch.Tensor:
    """W [N, K] (out, in; any float dtype) -> Q(W) [N, K] in `dtype` (default W's): its RTN dequantization,
    the weights a layer holds when rounded to `bits`. The one round trip the probes and the damage table use."""
    return rtn_quantize(W.float(), bits, group_size, sym).dequantize(dtype or W.dtype)[0]  # [N, K]
