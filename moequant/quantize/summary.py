"""What a quantize run reports: the closing table (QuantizeSummary) and quant_report.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moequant.calibration.data import CalibData
from moequant.config import QuantizeConfig
from moequant.plan.schema import Plan
from moequant.quantize.rows import ExpertRow, LinearRow


@dataclass
class QuantizeSummary:
    out: Path
    seconds: float
    bytes_before: int
    bytes_after: int
    expert_bytes_before: int
    expert_bytes_after: int
    average_bits: float
    histogram: dict[str, int]
    fallbacks: int
    report: list[ExpertRow] = field(default_factory=list)
    linear_histogram: dict[str, int] = field(default_factory=dict)  # planned non-expert Linears per width
    # seconds per pass (moequant/runtime/timing.py); the command line sets it, with `seconds` the whole process's time
    passes: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        rows = [
            ("model size", f"{self.bytes_before / 1e6:.2f} MB", f"{self.bytes_after / 1e6:.2f} MB"),
            (
                "expert weights",
                f"{self.expert_bytes_before / 1e6:.2f} MB",
                f"{self.expert_bytes_after / 1e6:.2f} MB",
            ),
            ("bits / planned weight" if self.linear_histogram else "bits / expert weight", "16.00",
             f"{self.average_bits:.3f}"),
        ]  # fmt: skip
        lines = [f"{'':22s}{'before':>14s}{'after':>14s}"] + [f"{a:22s}{b:>14s}{c:>14s}" for a, b, c in rows]
        lines.append("experts per width: " + ", ".join(f"{k} x{v}" for k, v in self.histogram.items()))
        if self.linear_histogram:
            widths = ", ".join(f"{k} x{v}" for k, v in self.linear_histogram.items())
            lines.append(
                f"non-expert Linears per width (planned with experts, counted in the bits): {widths}"
            )
        if self.fallbacks:
            lines.append(f"experts that fell back to RTN (too few routed tokens): {self.fallbacks}")
        lines.append(f"time: {self.seconds:.1f} s{self._passes()} -> {self.out}")
        return "\n".join(lines)

    def _passes(self) -> str:
        """' (profile 3.1 s, ..., other 5.0 s)': each pass beside the whole, and what the passes leave (start-up,
        imports, loading, calibration data); '' when no pass was recorded (the API's own summary)."""
        if not self.passes:
            return ""
        other = max(0.0, self.seconds - sum(self.passes.values()))
        parts = [f"{name} {s:.1f} s" for name, s in self.passes.items()] + [f"other {other:.1f} s"]
        return " (" + ", ".join(parts) + ")"


def quant_report(
    model_id: str,
    data: CalibData,
    config: QuantizeConfig,
    before: int,
    after: int,
    requested: Plan,
    stored: Plan,
    experts: list[ExpertRow],
    non_expert: list[LinearRow],
) -> dict:
    """quant_report.json: inputs, sizes, the plan asked for and the one stored (RTN fallbacks), per-expert rows."""
    return {
        "model": model_id,
        "calibration": data.description,
        "config": config.to_json(),
        "bytes_before": before,
        "bytes_after": after,
        "average_bits": round(stored.average_bits(), 4),
        "requested_plan": requested.to_json()["layers"],
        "plan_estimate": requested.to_json()[
            "estimate"
        ],  # sizes, damage, and the layer probe's record (or why skipped)
        "histogram": stored.histogram(),
        "fallbacks": sum(1 for r in experts if r.note),
        "experts": [r.to_json() for r in experts],
        "non_expert": [r.to_json() for r in non_expert],
    }
