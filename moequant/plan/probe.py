"""Per-layer calibration of the planner's damage proxy with a direct measurement.

The proxy (plan.py) ranks experts within a layer well, but layers differ in how much an error in their
experts costs the model's loss (an early layer's error propagates through every later layer and changes
later routing). The probe measures it: for each MoE layer, the calibration loss increase when all of that
layer's experts are rounded to the lowest candidate width (RTN), everything else exact. The damage rows of
that layer are then scaled so that their sum at that width equals the measured loss increase. Cost: one
forward pass of `samples` sequences per MoE layer, with the whole model in memory; skipped otherwise.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from moequant.arch import resolve
from moequant.quantizers.rtn import rtn_quantize

logger = logging.getLogger(__name__)


@torch.no_grad()
def _loss(model, ids: torch.Tensor, batch_size: int) -> float:
    total, n = 0.0, 0
    for b in range(0, ids.shape[0], batch_size):
        x = ids[b : b + batch_size]
        logits = model(input_ids=x, use_cache=False).logits.float()  # [B, L, V]
        total += float(
            torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            )
        )
        n += x[:, 1:].numel()
    return total / n


@torch.no_grad()
def layer_loss_increase(model, ids: torch.Tensor, bits: int, group_size: int, sym: bool, batch_size: int = 8):
    """{layer: calibration-loss increase with that layer's experts at RTN `bits`}, and the base loss."""
    arch, blocks = resolve(model)
    base = _loss(model, ids, batch_size)
    out = {}
    for ref in blocks:
        params = [p for p in ref.experts.parameters() if p.dim() == 3]  # fused expert weights (not biases)
        saved = [p.data.clone() for p in params]
        for p in params:
            E = p.shape[0]
            for e in range(E):  # rounding the canonical or the fused layout: same per-row groups for concat
                w = p.data[e]
                if arch.layout.value == "transposed_interleaved":
                    q = rtn_quantize(w.T.float(), bits, group_size, sym).dequantize()[0].T
                else:
                    q = rtn_quantize(w.float(), bits, group_size, sym).dequantize()[0]
                p.data[e] = q.to(p.dtype)
        out[ref.layer_idx] = _loss(model, ids, batch_size) - base
        for p, s in zip(params, saved, strict=True):
            p.data.copy_(s)
    return out, base


def calibrate_damage(
    damage: np.ndarray,
    keys: list[tuple[int, int]],
    widths: tuple[int, ...],
    increase: dict[int, float],
) -> tuple[np.ndarray, dict[int, float]]:
    """Scale each layer's damage rows so their sum at the lowest width equals the measured loss increase."""
    col = int(np.argmin(widths))
    layers = sorted({i for i, _ in keys})
    rows = {i: [r for r, (j, _) in enumerate(keys) if j == i] for i in layers}
    raw = {i: float(damage[rows[i], col].sum()) for i in layers}
    positive = [increase[i] for i in layers if increase[i] > 0]
    floor = min(positive) if positive else 1.0  # a layer whose loss did not rise gets the smallest rise seen
    scales = {i: max(increase[i], floor) / raw[i] if raw[i] > 0 else 1.0 for i in layers}
    out = damage.copy()
    for i in layers:
        out[rows[i]] *= scales[i]
    return out, scales
