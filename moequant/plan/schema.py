"""The plan file: one QuantSpec per expert of every MoE layer (and, with `--non-expert auto`, one per non-expert
Linear), as plain JSON a user may edit.

`Plan.save` / `Plan.load` write and read it (validated: version, entries, widths); `Plan.validate` checks it
against a model (layers, expert counts, shapes). Sizes are exact stored bytes (scales, zeros, g_idx counted).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from moequant.arch.base import input_rows
from moequant.config import ExpertSpec, Method, QuantSpec, Spec, parse_spec, proj_specs, spec_label
from moequant.errors import PlanError
from moequant.quantizers.packed import packed_nbytes

logger = logging.getLogger(__name__)

PLAN_VERSION = 1


@dataclass(frozen=True)
class PlannedLinear:
    """A non-expert Linear (attention, shared expert, dense MLP) the plan gives its own spec (--non-expert auto)."""

    spec: QuantSpec
    out_features: int
    in_features: int

    def nbytes(self, act_order: bool = False) -> int:
        return linear_nbytes(self.spec, self.out_features, self.in_features, act_order)


@dataclass
class Plan:
    """Per-layer, per-expert storage. `layers[i][e]` is the spec of expert e in decoder layer i: a QuantSpec, or
    an ExpertSpec when its gate/up and down projections are stored differently."""

    model_type: str
    layers: dict[int, list[Spec]]
    hidden: int
    intermediate: int
    act_order: bool = False
    non_expert: QuantSpec | None = None  # attention / shared experts / lm_head at one fixed width, or None
    # non-expert Linears planned one by one (full module name -> spec and shape; --non-expert auto); a Linear
    # not listed (or listed as keep) stays in 16-bit. Exclusive with `non_expert`.
    linears: dict[str, PlannedLinear] = field(default_factory=dict)
    estimate: dict = field(default_factory=dict)  # bytes, average bits, damage (informational)
    gated: bool = True  # the experts' input projection is [gate; up] (2I rows); False: up alone (I rows)

    # ---- sizes -----------------------------------------------------------------------------------

    def expert_bytes(self, spec: Spec) -> int:
        return expert_nbytes(spec, self.hidden, self.intermediate, self.act_order, self.gated)

    def total_expert_bytes(self) -> int:
        return sum(self.expert_bytes(s) for specs in self.layers.values() for s in specs)

    def num_expert_params(self) -> int:
        n_experts = sum(len(v) for v in self.layers.values())
        return n_experts * expert_params(self.hidden, self.intermediate, self.gated)

    def total_linear_bytes(self) -> int:
        return sum(lin.nbytes(self.act_order) for lin in self.linears.values())

    def num_planned_params(self) -> int:
        """Weights the plan sets the width of: every expert's, and the planned non-expert Linears'."""
        return self.num_expert_params() + sum(
            lin.out_features * lin.in_features for lin in self.linears.values()
        )

    def average_bits(self) -> float:
        """Average stored bits per planned weight (per expert weight when no non-expert Linear is planned)."""
        return 8 * (self.total_expert_bytes() + self.total_linear_bytes()) / self.num_planned_params()

    def linear_specs(self, names: list[str]) -> dict[str, QuantSpec]:
        """{full name: spec} of the Linears among `names` (a model's non-expert Linears) to quantize: all at
        `non_expert`, or those `linears` plans at a spec other than keep."""
        if self.non_expert is not None:
            return {n: self.non_expert for n in names}
        return {
            n: self.linears[n].spec
            for n in names
            if n in self.linears and self.linears[n].spec.method is not Method.KEEP
        }

    def linear_histogram(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for lin in self.linears.values():
            out[spec_label(lin.spec)] = out.get(spec_label(lin.spec), 0) + 1
        return dict(sorted(out.items()))

    def default_grid(self) -> tuple[int, bool]:
        """The (group size, sym) most integer projections use: what plan.json's short labels stand for."""
        ints = [p for v in self.layers.values() for s in v for p in proj_specs(s) if p.method.is_integer]
        gs = max({s.group_size for s in ints}, key=[s.group_size for s in ints].count) if ints else 128
        sym = max({s.sym for s in ints}, key=[s.sym for s in ints].count) if ints else False
        return gs, sym

    def histogram(self) -> dict[str, int]:
        """Experts per spec label; a projection off the plan's default group size shows it ('gptq:3g64')."""
        gs, _ = self.default_grid()

        def label(p: QuantSpec) -> str:
            return spec_label(p) + (f"g{p.group_size}" if p.method.is_integer and p.group_size != gs else "")

        out: dict[str, int] = {}
        for specs in self.layers.values():
            for s in specs:
                key = "/".join(label(p) for p in proj_specs(s)) if isinstance(s, ExpertSpec) else label(s)
                out[key] = out.get(key, 0) + 1
        return dict(sorted(out.items()))

    # ---- JSON ------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        gs, sym = self.default_grid()

        def entry(s: QuantSpec):  # the short label where the grid is the plan's default
            return (
                s.to_json() if s.method.is_integer and (s.group_size, s.sym) != (gs, sym) else spec_label(s)
            )

        def expert_entry(s: Spec):
            if not isinstance(s, ExpertSpec):
                return entry(s)
            gu, dn = entry(s.gate_up), entry(s.down)
            return (
                f"{gu}/{dn}" if isinstance(gu, str) and isinstance(dn, str) else {"gate_up": gu, "down": dn}
            )

        layers = {str(i): [expert_entry(s) for s in specs] for i, specs in sorted(self.layers.items())}
        return {
            "version": PLAN_VERSION,
            "model_type": self.model_type,
            "hidden": self.hidden,
            "intermediate": self.intermediate,
            "gated": self.gated,
            "group_size": gs,
            "sym": sym,
            "act_order": self.act_order,
            "non_expert": None if self.non_expert is None else self.non_expert.to_json(),
            "layers": layers,
            **(
                {
                    "linears": {
                        n: {"spec": entry(lin.spec), "shape": [lin.out_features, lin.in_features]}
                        for n, lin in self.linears.items()
                    }
                }
                if self.linears
                else {}
            ),  # fmt: skip
            "estimate": self.estimate | {"average_bits": round(self.average_bits(), 4)},
            "_help": "layers: decoder layer -> one entry per expert, 'method:bits' (gptq:2|3|4|8, rtn:2|3|4|8, "
            "bnb-nf4, bnb-fp4, bnb-int8, keep), an object {method, bits, group_size, sym}, or per projection "
            "'<gate/up>/<down>' (e.g. 'gptq:3/gptq:2') or {gate_up: entry, down: entry}; linears (when planned): "
            "non-expert Linear -> {spec: entry, shape: [out, in]}",
        }

    @classmethod
    def from_json(cls, d: dict) -> Plan:
        if d.get("version") != PLAN_VERSION:
            raise PlanError(f"plan version {d.get('version')!r} is not supported (expected {PLAN_VERSION})")
        try:
            gs, sym = int(d.get("group_size", 128)), bool(d.get("sym", False))
            layers = {
                int(i): [
                    _entry(f"layer {i} expert {e}", parse_spec, entry, gs, sym)
                    for e, entry in enumerate(specs)
                ]
                for i, specs in d["layers"].items()
            }
            ne = d.get("non_expert")
            linears = {
                n: PlannedLinear(
                    _entry(f"Linear {n}", _linear_spec, v["spec"], gs, sym),
                    int(v["shape"][0]),
                    int(v["shape"][1]),
                )
                for n, v in d.get("linears", {}).items()
            }
            if linears and ne is not None:
                raise PlanError("a plan gives either one non_expert spec or per-Linear linears, not both")
            return cls(
                model_type=d["model_type"],
                layers=layers,
                hidden=int(d["hidden"]),
                intermediate=int(d["intermediate"]),
                act_order=bool(d.get("act_order", False)),
                gated=bool(d.get("gated", True)),  # plans written before non-gated experts: gated
                non_expert=None if ne is None else QuantSpec.from_json(ne),
                linears=linears,
                estimate=d.get("estimate", {}),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise PlanError(f"malformed plan: {type(err).__name__}: {err}") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)  # `moequant plan --out new/folder/plan.json`
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise PlanError(f"plan file {path} does not exist") from None
        try:
            return cls.from_json(json.loads(text))
        except json.JSONDecodeError as err:
            raise PlanError(f"plan file {path} is not valid JSON: {err}") from None
        except PlanError as err:
            raise PlanError(f"plan file {path}: {err}") from None

    # ---- validation --------------------------------------------------------------------------------

    def validate(
        self, model_type: str, layer_experts: dict[int, int], hidden: int, intermediate: int
    ) -> None:
        """Check the plan fits a model: MoE layer indices, expert counts and shapes."""
        if self.model_type != model_type:
            raise PlanError(f"plan is for model_type {self.model_type!r}, the model is {model_type!r}")
        if (self.hidden, self.intermediate) != (hidden, intermediate):
            raise PlanError(
                f"plan is for hidden {self.hidden} / intermediate {self.intermediate}, "
                f"the model has {hidden} / {intermediate}"
            )
        if sorted(self.layers) != sorted(layer_experts):
            raise PlanError(
                f"plan covers layers {sorted(self.layers)}, the model's MoE layers are {sorted(layer_experts)}"
            )
        for i, n in layer_experts.items():
            if len(self.layers[i]) != n:
                raise PlanError(f"plan gives layer {i} {len(self.layers[i])} experts, the model has {n}")


def _entry(where: str, parse, entry, group_size: int, sym: bool):
    """`parse(entry, group_size, sym)`, its refusal naming the entry's place ('layer 3 expert 5: ...')."""
    try:
        return parse(entry, group_size, sym)
    except PlanError as err:
        raise PlanError(f"{where}: {err}") from None


def _linear_spec(entry, group_size: int, sym: bool) -> QuantSpec:
    spec = parse_spec(entry, group_size, sym)
    if isinstance(spec, ExpertSpec):
        raise PlanError(f"a non-expert Linear has one spec, got the per-projection entry {entry!r}")
    return spec


def expert_params(hidden: int, intermediate: int, gated: bool = True) -> int:
    """Weights of one expert: its input projection (2I x H gated, I x H up alone) and down (H x I)."""
    return (input_rows(intermediate, gated) + intermediate) * hidden


def expert_nbytes(
    spec: Spec, hidden: int, intermediate: int, act_order: bool = False, gated: bool = True
) -> int:
    """Stored bytes of one expert (gate/up, or up alone where not `gated`, + down) under `spec`."""
    gu, dn = proj_specs(spec)
    return linear_nbytes(gu, input_rows(intermediate, gated), hidden, act_order) + linear_nbytes(
        dn, hidden, intermediate, act_order
    )


def linear_nbytes(spec: QuantSpec, out_features: int, in_features: int, act_order: bool = False) -> int:
    """Stored bytes of one [out_features, in_features] projection under `spec`."""
    if spec.method is Method.KEEP:
        return 2 * out_features * in_features
    if spec.method.is_integer:
        return packed_nbytes(out_features, in_features, spec.bits, spec.group_size, spec.sym, act_order)
    from moequant.quantizers.bnb import bnb_nbytes

    return bnb_nbytes(out_features, in_features, spec.method)
