"""Calibration too thin for GPTQ: how many experts would see fewer than `--min-tokens` routed tokens and fall
back to identity-Hessian RTN, counted before the slow passes; more than a quarter of them is refused.

Counted from the routing profile when one is computed first (the planned runs: what the quantize pass will
route, up to the drift of the quantized layers before), else estimated from the calibration data (a given
plan or a uniform width): every expert of a layer at `distinct tokens x top_k / experts`, the even-routing
share, where a window repeated by sampling with overlap counts once (it routes the same way again and adds
nothing to a Hessian).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from moequant.calibration.data import CalibData
from moequant.calibration.profiler import Profile
from moequant.errors import CalibrationError

THIN_SHARE = 0.25  # refused when more than this share of the experts would fall back (the demo: 1 of 32)


@dataclass(frozen=True)
class ThinCalibration:
    """What the calibration gives the experts: `below` of `experts` under `min_tokens` routed tokens."""

    tokens: int  # calibration tokens (distinct windows' tokens when estimated)
    experts: int  # experts of every MoE layer together
    below: int  # of them, those under min_tokens (measured, or expected with even routing)
    min_tokens: int
    measured: bool  # True: counted by the routing profile; False: the even-routing estimate

    @property
    def too_thin(self) -> bool:
        return self.below > THIN_SHARE * self.experts

    def message(self) -> str:
        how = "routed by the profile pass" if self.measured else "expected with even routing"
        kind = "calibration tokens" if self.measured else "distinct calibration tokens"
        return (
            f"calibration too thin for GPTQ: {self.tokens} {kind} leave {self.below} of {self.experts} experts "
            f"below --min-tokens {self.min_tokens} ({how}); they would fall back to identity-Hessian RTN. Give "
            "more calibration (--samples, --seq-len, a longer --calib text) or --calib-mode all (every expert's "
            "Hessians see every token), or pass --allow-thin-calibration to quantize anyway"
        )


def from_profile(profile: Profile, min_tokens: int) -> ThinCalibration:
    """The experts under `min_tokens` routed tokens in a routing profile of the calibration data."""
    counts = [c for s in profile.layers.values() for c in s.counts.tolist()]
    below = sum(1 for c in counts if c < min_tokens)
    return ThinCalibration(profile.tokens, len(counts), below, min_tokens, measured=True)


def distinct_tokens(data: CalibData) -> int:
    """Tokens of the distinct calibration windows (a window sampled twice counts once)."""
    if data.input_ids.numel() == 0:
        return 0
    return int(torch.unique(data.input_ids, dim=0).numel())


def estimate(
    data: CalibData,
    top_k: int,
    layer_experts: Mapping[int, int],
    hessian_experts: Mapping[int, int],
    min_tokens: int,
) -> ThinCalibration:
    """The experts expected under `min_tokens` when every expert of a layer (`layer_experts`: MoE layer ->
    its experts) gets its even share of the distinct tokens' top_k routing slots, counted among the experts
    quantized with a Hessian (`hessian_experts`: MoE layer -> how many)."""
    tokens = distinct_tokens(data)
    below = sum(
        hessian_experts.get(i, 0) for i, n in layer_experts.items() if n and tokens * top_k / n < min_tokens
    )
    return ThinCalibration(tokens, sum(hessian_experts.values()), below, min_tokens, measured=False)


def refuse_if_thin(check: ThinCalibration) -> ThinCalibration:
    """Raise CalibrationError (one line: the numbers and the fixes) when the calibration is too thin."""
    if check.too_thin:
        raise CalibrationError(check.message())
    return check
