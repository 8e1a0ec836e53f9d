"""progress.json: what a quantize run has finished, kept in its .partial folder after every layer.

--resume reads it back: the finished layers, their report rows and the specs their experts were stored at
(RTN fallbacks included), under the fingerprint of the inputs that produced them (resume.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moequant.config import Spec, parse_spec
from moequant.quantize.rows import ExpertRow, LinearRow


@dataclass
class Progress:
    fingerprint: dict
    completed_layers: list[int] = field(default_factory=list)
    rows: list[ExpertRow] = field(default_factory=list)  # the finished layers' experts, in layer order
    linear_rows: list[LinearRow] = field(default_factory=list)  # their quantized non-expert Linears
    used: dict[int, list[Spec]] = field(default_factory=dict)  # layer -> the specs its experts were stored at

    @property
    def next_layer(self) -> int:
        """The first layer not finished (0 on a fresh run)."""
        return max(self.completed_layers) + 1 if self.completed_layers else 0

    def record(
        self, layer: int, rows: list[ExpertRow], linear_rows: list[LinearRow], used: list[Spec] | None
    ):
        """A finished layer; `used` None: it has no MoE block."""
        self.completed_layers.append(layer)
        self.rows.extend(rows)
        self.linear_rows.extend(linear_rows)
        if used is not None:
            self.used[layer] = list(used)

    def to_json(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "completed_layers": self.completed_layers,
            "report": [r.to_json() for r in self.rows],
            "linear_report": [r.to_json() for r in self.linear_rows],
            "used": {str(i): [s.to_json() for s in v] for i, v in self.used.items()},
        }

    @classmethod
    def from_json(cls, d: dict) -> Progress:
        return cls(
            d["fingerprint"],
            list(d["completed_layers"]),
            [ExpertRow.from_json(r) for r in d["report"]],
            [LinearRow.from_json(r) for r in d.get("linear_report", [])],
            {int(i): [parse_spec(s, 128, False) for s in v] for i, v in d["used"].items()},
        )
