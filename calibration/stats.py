"""Per-layer routing statistics: additive sums that merge exactly, and the figures derived from them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class LayerStats:
    """Sums over the tokens one MoE layer has seen. Every field is additive, so merge() is exact."""

    num_experts: int
    top_k: int
    hidden: int
    intermediate: int
    tokens: int = 0
    counts: torch.Tensor = field(default=None)  # [E] int64 routed (token, slot) pairs per expert
    weight_mass: torch.Tensor = field(default=None)  # [E] float64 sum of routing weights
    coact: torch.Tensor = field(default=None)  # [E, E] int64 tokens routed to both i and j (diag = counts)
    sq_in: torch.Tensor = field(default=None)  # [E, H] float64 sum of x^2 over routed tokens
    sq_mid: torch.Tensor = field(default=None)  # [E, I] float64 sum of act(gate_up x)^2 over routed tokens
    sq_all: torch.Tensor = field(default=None)  # [H] float64 sum of x^2 over all tokens (fallback moments)
    by_source: dict[str, torch.Tensor] = field(default_factory=dict)  # source -> [E] int64 counts

    def __post_init__(self):
        E, H, I = self.num_experts, self.hidden, self.intermediate
        if self.counts is None:
            self.counts = torch.zeros(E, dtype=torch.int64)
            self.weight_mass = torch.zeros(E, dtype=torch.float64)
            self.coact = torch.zeros(E, E, dtype=torch.int64)
            self.sq_in = torch.zeros(E, H, dtype=torch.float64)
            self.sq_mid = torch.zeros(E, I, dtype=torch.float64)
            self.sq_all = torch.zeros(H, dtype=torch.float64)

    def merge(self, other: LayerStats) -> LayerStats:
        if (self.num_experts, self.top_k, self.hidden, self.intermediate) != (
            other.num_experts,
            other.top_k,
            other.hidden,
            other.intermediate,
        ):
            raise ValueError("cannot merge statistics of differently shaped layers")
        by_source = dict(self.by_source)
        for k, v in other.by_source.items():
            by_source[k] = by_source[k] + v if k in by_source else v.clone()
        return LayerStats(
            self.num_experts,
            self.top_k,
            self.hidden,
            self.intermediate,
            tokens=self.tokens + other.tokens,
            counts=self.counts + other.counts,
            weight_mass=self.weight_mass + other.weight_mass,
            coact=self.coact + other.coact,
            sq_in=self.sq_in + other.sq_in,
            sq_mid=self.sq_mid + other.sq_mid,
            sq_all=self.sq_all + other.sq_all,
            by_source=by_source,
        )

    # ---- derived figures -------------------------------------------------------------------------

    def load(self) -> torch.Tensor:
        """Fraction of routed slots per expert [E] (sums to 1)."""
        total = self.counts.sum()
        return (
            self.counts.double() / total if total > 0 else torch.zeros(self.num_experts, dtype=torch.float64)
        )

    def cv(self) -> float:
        """Coefficient of variation of per-expert counts (0 = perfectly balanced)."""
        c = self.counts.double()
        return float(c.std(unbiased=False) / c.mean()) if c.mean() > 0 else 0.0

    def entropy(self) -> float:
        """Entropy of the load distribution normalised by log(E) (1 = perfectly balanced)."""
        p = self.load()
        p = p[p > 0]
        return float(-(p * p.log()).sum() / math.log(self.num_experts)) if p.numel() else 0.0

    def moments_in(self) -> torch.Tensor:
        """Mean x^2 per input channel of each expert's inputs [E, H]; experts that saw no token get the
        layer-wide mean over all tokens."""
        return _means(self.sq_in, self.counts, self.sq_all / max(self.tokens, 1))

    def moments_mid(self) -> torch.Tensor:
        """Mean act^2 per channel of each expert's down-projection input [E, I] (zeros where unseen)."""
        return _means(self.sq_mid, self.counts, None)


def routed_slots(top_k_weights: torch.Tensor) -> torch.Tensor:
    """[T, k] bool: the (token, slot) pairs that route a token to an expert. A slot of routing weight exactly 0
    adds nothing to the block's output whatever expert it names: families mark slots that chose a router class
    without an expert that way (Zaya's skip expert, masked to expert 0; LongCat-Flash's zero experts, masked to
    dummy experts), and no statistic, Hessian or count takes it for a token of the expert it names."""
    return top_k_weights != 0


def _means(sums: torch.Tensor, counts: torch.Tensor, fallback: torch.Tensor | None) -> torch.Tensor:
    out = sums / counts.clamp(min=1).double()[:, None]  # [E, C]
    if fallback is not None:
        out[counts == 0] = fallback
    return out.float()


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence (natural log, in [0, ln 2]) between two distributions."""
    p, q = p.double() / p.sum(), q.double() / q.sum()
    m = (p + q) / 2

    def kl(a, b):
        mask = a > 0
        return float((a[mask] * (a[mask] / b[mask]).log()).sum())

    return (kl(p, m) + kl(q, m)) / 2
