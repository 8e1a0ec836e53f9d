"""The quantize pass's report rows: one per expert and one per non-expert Linear.

They are kept in progress.json while the run goes (what --resume reads back) and written to quant_report.json's
`experts` and `non_expert` lists; `to_json` gives the keys in the order those files have always had.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moequant.config import Spec, proj_specs, spec_label

_NOT_DIAG = ("down_method", "down_bits")  # keys of the row itself that share the down projection's prefix


@dataclass(frozen=True)
class ExpertRow:
    """One expert of one layer: the tokens its Hessians were built from, the spec label the plan asked for,
    the method and width stored (down's too where they differ; an RTN fallback says why in `note`), its
    relative weight error, the rank that quantized it, and each projection's handler diagnostics (GPTQ loss
    and damping)."""

    layer: int
    expert: int
    tokens: int  # calibration tokens routed to it
    planned: str  # spec_label of the planned spec
    method: str  # as stored (gate/up; down too unless down_method is set)
    bits: int
    rel_weight_error: float  # sqrt(sum ||W - Q||^2 / sum ||W||^2) over both projections
    rank: int
    down_method: str | None = None
    down_bits: int | None = None
    note: str = ""
    gate_up_diag: dict[str, float] = field(default_factory=dict)
    down_diag: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, layer: int, expert: int, tokens: int, planned: Spec, used: Spec, **rest) -> ExpertRow:
        """The row of an expert planned at `planned` and stored at `used`; `rest`: the fields after `bits`."""
        gu, dn = proj_specs(used)
        down = {} if gu == dn else {"down_method": dn.method.value, "down_bits": dn.bits}
        return cls(layer, expert, tokens, spec_label(planned), gu.method.value, gu.bits, **down, **rest)

    def to_json(self) -> dict:
        row = {"layer": self.layer, "expert": self.expert, "tokens": self.tokens, "planned": self.planned,
               "method": self.method, "bits": self.bits}  # fmt: skip
        if self.down_method is not None:
            row |= {"down_method": self.down_method, "down_bits": self.down_bits}
        row |= {"rel_weight_error": self.rel_weight_error, "rank": self.rank}
        if self.note:
            row["note"] = self.note
        row |= {f"gate_up_{k}": v for k, v in self.gate_up_diag.items()}
        row |= {f"down_{k}": v for k, v in self.down_diag.items()}
        return row

    @classmethod
    def from_json(cls, d: dict) -> ExpertRow:
        """The row `to_json` wrote (progress.json on --resume)."""
        diag = {
            p: {k.removeprefix(p): v for k, v in d.items() if k.startswith(p) and k not in _NOT_DIAG}
            for p in ("gate_up_", "down_")
        }
        return cls(
            d["layer"], d["expert"], d["tokens"], d["planned"], d["method"], d["bits"], d["rel_weight_error"],
            d["rank"], d.get("down_method"), d.get("down_bits"), d.get("note", ""), diag["gate_up_"], diag["down_"],
        )  # fmt: skip


@dataclass(frozen=True)
class LinearRow:
    """One quantized non-expert Linear (full module name), its method, width, relative weight error and the
    handler's diagnostics."""

    module: str
    method: str
    bits: int
    rel_weight_error: float
    diag: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"module": self.module, "method": self.method, "bits": self.bits,
                "rel_weight_error": self.rel_weight_error} | self.diag  # fmt: skip

    @classmethod
    def from_json(cls, d: dict) -> LinearRow:
        """The row `to_json` wrote (progress.json on --resume)."""
        diag = {k: v for k, v in d.items() if k not in ("module", "method", "bits", "rel_weight_error")}
        return cls(d["module"], d["method"], d["bits"], d["rel_weight_error"], diag)
