"""Calibration coverage: did each layer's experts see enough tokens for a full-rank GPTQ Hessian?

An expert's gate/up Hessian is a sum of outer products of its routed inputs (width = hidden size), its down
Hessian of its intermediate activations (width = the expert intermediate size): with fewer routed tokens than
the width the Hessian is rank-deficient and GPTQ rests on its damping term. Per MoE layer this reports the
median and the fewest tokens an expert saw against both widths, and one warning lists the layers whose
median expert is below a width (the usual cure: more calibration, see calibration/sizing.py).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerCoverage:
    layer: int
    experts: int
    median_tokens: float  # statistics.median of the per-expert counts (the mean of the middle two when even)
    min_tokens: int
    gate_up_width: int  # input width of gate/up: the hidden size
    down_width: int  # input width of down: the expert intermediate size

    @property
    def short(self) -> list[str]:
        """The projections whose input width the median expert's token count is below."""
        widths = (("gate_up", self.gate_up_width), ("down", self.down_width))
        return [name for name, width in widths if self.median_tokens < width]

    def to_json(self) -> dict:
        return {
            "layer": self.layer,
            "experts": self.experts,
            "median_tokens": self.median_tokens,
            "min_tokens": self.min_tokens,
            "gate_up_input_width": self.gate_up_width,
            "down_input_width": self.down_width,
            "median_below_width": self.short,  # e.g. ["gate_up", "down"]; [] when both Hessians can be full rank
            "rank_deficient": bool(self.short),
        }


class ExpertCount(Protocol):
    """An expert's calibration count: the quantize pass's report rows (quantize/rows.ExpertRow) are these."""

    layer: int
    expert: int
    tokens: int  # the tokens its Hessians were built from


def expert_tokens(rows: Iterable[ExpertCount]) -> dict[int, list[int]]:
    """layer -> tokens per expert (in expert order), from per-expert rows."""
    out: dict[int, dict[int, int]] = {}
    for r in rows:
        out.setdefault(r.layer, {})[r.expert] = r.tokens
    return {i: [d[e] for e in sorted(d)] for i, d in sorted(out.items())}


def coverage(tokens: Mapping[int, list[int]], hidden: int, intermediate: int) -> list[LayerCoverage]:
    """One LayerCoverage per layer of `tokens` (layer -> tokens per expert)."""
    return [
        LayerCoverage(i, len(c), float(statistics.median(c)), min(c), hidden, intermediate)
        for i, c in sorted(tokens.items())
        if c
    ]


def warn_if_short(layers: list[LayerCoverage]) -> list[int]:
    """Log one warning listing the layers whose median expert saw fewer tokens than an input width; returns
    those layers."""
    short = [c for c in layers if c.short]
    if short:
        first = short[0]
        logger.warning(
            "calibration too small for GPTQ in %d of %d MoE layers %s: the median expert sees fewer tokens than "
            "its input width (layer %d: median %g tokens, fewest %d; gate/up width %d, down width %d), so its "
            "Hessians are rank-deficient; give more calibration (--samples / --seq-len)",
            len(short),
            len(layers),
            [c.layer for c in short],
            first.layer,
            first.median_tokens,
            first.min_tokens,
            first.gate_up_width,
            first.down_width,
        )
    return [c.layer for c in short]


def to_json(layers: list[LayerCoverage]) -> dict:
    """quant_report.json's `calibration_coverage`."""
    return {
        "layers": [c.to_json() for c in layers],
        "rank_deficient_layers": [c.layer for c in layers if c.short],
    }
