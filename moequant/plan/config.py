"""What the planner is asked: the budget and the candidate widths, methods and damage weighting."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from moequant.config import KEEP_BITS, WIDTHS, Method, QuantSpec
from moequant.errors import PlanError


class ProbeKind(enum.Enum):
    STREAMED = "streamed"  # expected KL from one forward and one backward stream, a layer at a time (probe_stream.py)
    MEASURED = (
        "measured"  # loss increase measured with one full-model forward per layer, model in memory (probe.py)
    )


class Target(enum.Enum):
    """What runs the checkpoint: moequant's runtime (any width per expert) or vLLM (one width per MoE layer among
    what its quantized MoE kernels serve: symmetric 4 and 8 bits, a compressed-tensors config group per width)."""

    MOEQUANT = "moequant"
    VLLM = "vllm"

    @property
    def widths(self) -> tuple[int, ...] | None:
        return (4, 8) if self is Target.VLLM else None


class Importance(enum.Enum):
    """How the damage of an expert is weighted (plan/importance.py)."""

    MINIMAX = "minimax"  # the largest per-source routing rate (x mean routing weight): holds on every source
    MASS = "mass"  # routing-weight mass per token of the pooled calibration
    TOKENS = "tokens"  # routed-token share
    UNIFORM = "uniform"  # every expert equally important (ablation)


class DamageKind(enum.Enum):
    """How the damage table prices an item at a candidate spec."""

    PROXY = (
        "proxy"  # RTN error weighted by diagonal input moments from the profile (damage.py): no forward pass
    )
    GPTQ = "gptq"  # GPTQ's own loss on the real Hessians (damage_gptq.py): one pass, GPTQ per candidate width


@dataclass(frozen=True)
class Budget:
    """Either average bits per expert weight (scale/zero overhead counted) or total model size in GB."""

    bits: float | None = None
    gb: float | None = None

    def __post_init__(self):
        if (self.bits is None) == (self.gb is None):
            raise PlanError("give exactly one budget: average bits per expert weight, or total GB")
        if self.bits is not None and not 0 < self.bits <= KEEP_BITS:
            raise PlanError(f"impossible budget: {self.bits} bits per weight (must be in (0, {KEEP_BITS}])")
        if self.gb is not None and self.gb <= 0:
            raise PlanError(f"impossible budget: {self.gb} GB")


@dataclass(frozen=True)
class PlanConfig:
    budget: Budget
    widths: tuple[int, ...] = (2, 3, 4, 8, KEEP_BITS)  # candidate widths; 16 = keep in 16-bit
    method: Method = Method.GPTQ  # method for integer widths
    group_size: int = 128
    # group sizes the planner may choose per item (empty: group_size only); each costs its own scale/zero bytes
    group_sizes: tuple[int, ...] = ()
    # gate/up and down of an expert are separate knapsack items, each with its own width (one width per expert
    # when False; --target vllm always plans whole experts)
    per_projection: bool = True
    # the non-expert Linears of every decoder layer (attention, shared experts, dense MLPs; not lm_head) join
    # the knapsack, one item per module holding them (e.g. a layer's self_attn), priced by the streamed probe;
    # the budget then counts their bytes too (--non-expert auto)
    non_expert_auto: bool = False
    sym: bool = False
    importance: Importance = Importance.MINIMAX
    damage: DamageKind = DamageKind.PROXY
    target: Target = Target.MOEQUANT  # VLLM: one width per layer among target.widths, symmetric grids
    importance_floor: float = 0.01  # fraction of the layer's mean importance every expert gets at least
    layer_probe: bool = True  # calibrate the proxy per layer with what rounding a layer costs (plan/probe.py)
    probe: ProbeKind = ProbeKind.STREAMED
    probe_samples: int = 16  # calibration sequences the probe evaluates
    # tokens per probe sequence: the calibration windows cut into pieces of this length, the first probe_samples
    # pieces evaluated (0: whole windows). Sequences, not tokens, are the probe's independent samples: 16 x 128
    # plans as well as 16 x 256 on the bundled model (evals/results/probe_agreement_len.md) at half the work,
    # and a quarter of it on 512-token windows
    probe_len: int = 128
    probe_draws: int = 2  # label draws per sequence of the streamed probe
    # the measured probe holds the whole model in float32: it runs when that is at most this size, on every
    # machine alike (the plan never depends on the free memory); larger models get the uncalibrated proxy
    probe_max_gb: float = 4.0
    progress: bool = True  # progress bars of the probe
    mip_rel_gap: float = 1e-9  # optimality gap handed to the MILP solver (~exact)
    time_limit: float = 120.0  # seconds for the solver

    def __post_init__(self):
        bad = [w for w in self.widths if w not in (*WIDTHS, KEEP_BITS)]
        if bad or not self.widths:
            raise PlanError(
                f"invalid candidate widths {bad or self.widths}; choose from {(*WIDTHS, KEEP_BITS)}"
            )
        if any(g <= 0 or g % 8 for g in self.group_sizes):
            raise PlanError(f"invalid group sizes {self.group_sizes}: each must be a positive multiple of 8")
        if self.target.widths is not None:
            if tuple(self.widths) != self.target.widths or not self.sym:
                raise PlanError(
                    f"--target {self.target.value} plans symmetric {'/'.join(map(str, self.target.widths))}-bit "
                    f"layers (what its GPTQ MoE kernels serve), got widths {self.widths}, sym={self.sym}"
                )
            if len(self.grid_sizes) > 1:
                raise PlanError(f"--target {self.target.value} plans one group size, got {self.group_sizes}")
            if self.non_expert_auto:
                raise PlanError(
                    f"--target {self.target.value} plans routed experts only; drop --non-expert auto"
                )
        if self.non_expert_auto and not (self.layer_probe and self.probe is ProbeKind.STREAMED):
            raise PlanError(
                "--non-expert auto prices attention and shared experts with the streamed layer probe; drop "
                "--no-layer-probe / --probe measured"
            )

    @property
    def grid_sizes(self) -> tuple[int, ...]:
        """The group sizes the planner chooses among."""
        return tuple(self.group_sizes) or (self.group_size,)

    @property
    def items_per_expert(self) -> int:
        """Knapsack items per expert: 2 (gate/up, down) with per-projection widths, else 1."""
        return 2 if self.per_projection and self.target.widths is None else 1

    def columns(self) -> list[QuantSpec]:
        """The candidate specs of every knapsack item (the damage table's columns): each integer width at each
        group size, then 16-bit keep where it is a candidate."""
        cols = [
            QuantSpec(self.method, b, g, self.sym)
            for b in self.widths
            if b < KEEP_BITS
            for g in self.grid_sizes
        ]
        if KEEP_BITS in self.widths:
            cols.append(QuantSpec(Method.KEEP, KEEP_BITS, self.group_size, self.sym))
        return cols

    def probe_column(self) -> int:
        """The column the layer probe calibrates: the narrowest width at the plan's group size."""
        cols = self.columns()
        low = [c for c, s in enumerate(cols) if s.bits == min(self.widths)]
        return next((c for c in low if cols[c].group_size == self.group_size), low[0])
