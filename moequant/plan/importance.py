"""How much each expert's damage counts: its share of the model's tokens, made robust to the calibration mix.

    MASS     importance(e) = routing-weight mass of e per calibration token (what the pooled calibration routes)
    MINIMAX  importance(e) = max over calibration sources s of e's routing rate on s, times e's mean routing
             weight (the default)
    TOKENS   routed-slot share;  UNIFORM  every expert alike (ablations)

Why MINIMAX: with d(e) an expert's damage per routed token, a plan's cost on source s is sum_e rate_s(e) d(e),
and sum_e max_s rate_s(e) d(e) bounds it on every source at once. An expert that one domain routes heavily
and the pooled mix rarely keeps the weight that domain gives it, so a user whose text resembles any one
calibration source is covered; with a single source it equals MASS. With each of the bundled corpus' six
domains held out in turn, minimax beats mass on held-out text when items are whole experts; with
per-projection items the two tie, minimax leaving the least held-out routing weight on experts at 2 bits in
both projections (evals/results/lodo_ablation.md, evals/results/heldout_bits.md).

Every importance is floored at `importance_floor` x the layer's mean, so no expert is ever priced at zero.
"""

from __future__ import annotations

import torch

from moequant.calibration.profiler import Profile
from moequant.plan.config import Importance, PlanConfig


def importance(profile: Profile, layer: int, config: PlanConfig) -> torch.Tensor:
    """[E] float64 importance of each expert of one layer, per calibration token."""
    s = profile.layers[layer]
    kind = config.importance
    if kind is Importance.UNIFORM:
        return torch.ones(s.num_experts, dtype=torch.float64)
    if kind is Importance.TOKENS:
        raw = s.counts.double() / max(s.tokens, 1)
    else:
        raw = s.weight_mass / max(s.tokens, 1)  # [E]
        if kind is Importance.MINIMAX and len(s.by_source) > 1:
            mean_weight = s.weight_mass / s.counts.double().clamp(min=1)  # [E] mean routing weight per slot
            rates = torch.stack(
                [c.double() / max(float(c.sum()) / s.top_k, 1.0) for c in s.by_source.values()]
            )  # [S, E] routed slots per token of each source
            raw = torch.maximum(raw, rates.max(dim=0).values * mean_weight)  # [E]
    return raw.clamp(min=config.importance_floor * float(raw.mean()))
