"""Frozen, validated configuration objects (one per pipeline step) and the enums they use."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass

from moequant.errors import PlanError

WIDTHS = (2, 3, 4, 8)  # integer widths the packers and kernels support
KEEP_BITS = 16  # "keep": the expert stays in the model's 16-bit dtype


class Method(enum.Enum):
    """How one expert is stored."""

    GPTQ = "gptq"
    RTN = "rtn"
    SIGNROUND = (
        "signround"  # rounding and clipping learned against the expert's output (quantize/signround.py)
    )
    BNB_NF4 = "bnb-nf4"
    BNB_FP4 = "bnb-fp4"
    BNB_INT8 = "bnb-int8"
    KEEP = "keep"

    @property
    def is_integer(self) -> bool:
        """GPTQ, RTN and SignRound share the group-wise integer format (packing.py)."""
        return self in (Method.GPTQ, Method.RTN, Method.SIGNROUND)

    @property
    def is_bnb(self) -> bool:
        return self in (Method.BNB_NF4, Method.BNB_FP4, Method.BNB_INT8)

    @property
    def fixed_bits(self) -> int | None:
        return {Method.BNB_NF4: 4, Method.BNB_FP4: 4, Method.BNB_INT8: 8, Method.KEEP: KEEP_BITS}.get(self)

    @classmethod
    def parse(cls, value: str | Method) -> Method:
        if isinstance(value, Method):
            return value
        try:
            return cls(value)
        except ValueError:
            raise PlanError(
                f"unknown method {value!r}; choose one of {', '.join(m.value for m in cls)}"
            ) from None


@dataclass(frozen=True)
class QuantSpec:
    """The storage of one expert: method, width and integer-format details."""

    method: Method = Method.GPTQ
    bits: int = 4
    group_size: int = 128  # input channels per scale/zero group
    sym: bool = False  # asymmetric (with zero points) is markedly better at 2-3 bits

    def __post_init__(self):
        if not isinstance(self.method, Method):
            object.__setattr__(self, "method", Method.parse(self.method))
        if self.method.fixed_bits is not None:  # bnb formats and "keep" have one width each
            object.__setattr__(self, "bits", self.method.fixed_bits)
        if self.method.is_integer and self.bits not in WIDTHS:
            raise PlanError(f"invalid width {self.bits} for {self.method.value}; supported widths: {WIDTHS}")
        if self.group_size <= 0 or self.group_size % 8:
            raise PlanError(f"invalid group size {self.group_size}: must be a positive multiple of 8")

    def to_json(self) -> dict:
        return {
            "method": self.method.value,
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
        }

    @classmethod
    def from_json(cls, d: dict) -> QuantSpec:
        return cls(
            method=Method.parse(d["method"]),
            bits=int(d.get("bits", 4)),
            group_size=int(d.get("group_size", 128)),
            sym=bool(d.get("sym", False)),
        )


@dataclass(frozen=True)
class ExpertSpec:
    """The storage of one expert whose projections differ: gate/up (the [gate; up] rows) and down each at its
    own spec. An expert whose projections agree is a plain QuantSpec (`expert_spec` makes that choice), so
    a plan or bit map whose experts have one width per expert holds only QuantSpecs."""

    gate_up: QuantSpec
    down: QuantSpec

    def __post_init__(self):
        if self.gate_up == self.down:
            raise PlanError("an ExpertSpec needs two different projection specs; use the QuantSpec itself")

    def to_json(self) -> dict:
        return {"gate_up": self.gate_up.to_json(), "down": self.down.to_json()}


Spec = QuantSpec | ExpertSpec  # what a plan holds per expert


def expert_spec(gate_up: QuantSpec, down: QuantSpec) -> Spec:
    """The spec of an expert with these projection specs: the QuantSpec itself when they agree."""
    return gate_up if gate_up == down else ExpertSpec(gate_up, down)


def proj_specs(s: Spec) -> tuple[QuantSpec, QuantSpec]:
    """(gate/up spec, down spec) of an expert."""
    return (s.gate_up, s.down) if isinstance(s, ExpertSpec) else (s, s)


def spec_bits(s: Spec) -> float:
    """An expert's width in bits per weight, before scale/zero overhead: gate/up holds 2/3 of its weights."""
    gu, dn = proj_specs(s)
    return (2 * gu.bits + dn.bits) / 3


def all_integer(s: Spec) -> bool:
    """Both projections in the group-wise integer format (what the fused kernels run)."""
    return all(p.method.is_integer for p in proj_specs(s))


def spec_label(s: Spec) -> str:
    """The short form plans and bit maps use: 'gptq:4', 'rtn:3', 'bnb-nf4', 'keep'; an expert whose
    projections differ: '<gate/up>/<down>', e.g. 'gptq:3/gptq:2'."""
    if isinstance(s, ExpertSpec):
        return f"{spec_label(s.gate_up)}/{spec_label(s.down)}"
    if s.method.is_integer:
        return f"{s.method.value}:{s.bits}"
    return s.method.value


def parse_spec(entry, group_size: int, sym: bool) -> Spec:
    """A plan / bit-map entry ('gptq:4', 'keep', 'bnb-nf4', 'gptq:3/gptq:2' (gate/up / down), a QuantSpec JSON
    object or {"gate_up": entry, "down": entry}) -> its spec."""
    if isinstance(entry, dict) and set(entry) == {"gate_up", "down"}:
        return expert_spec(
            parse_spec(entry["gate_up"], group_size, sym), parse_spec(entry["down"], group_size, sym)
        )
    if isinstance(entry, dict):
        return QuantSpec.from_json({"group_size": group_size, "sym": sym} | entry)
    if not isinstance(entry, str):
        raise PlanError(f"invalid plan entry {entry!r}")
    if "/" in entry:
        parts = entry.split("/")
        if len(parts) != 2:
            raise PlanError(f"plan entry {entry!r}: write '<gate/up>/<down>', e.g. 'gptq:3/gptq:2'")
        return expert_spec(parse_spec(parts[0], group_size, sym), parse_spec(parts[1], group_size, sym))
    method, _, bits = entry.partition(":")
    m = Method.parse(method)
    if m.is_integer:
        if not bits.isdigit():
            raise PlanError(f"plan entry {entry!r} needs a width, e.g. '{method}:4'")
        return QuantSpec(m, int(bits), group_size, sym)
    if bits:
        raise PlanError(f"plan entry {entry!r}: {m.value} has a fixed width, write just '{m.value}'")
    return QuantSpec(m, 16, group_size, sym)


class GPTQBackend(enum.Enum):
    """How GPTQ's sums run (quantizers/gptq_ops.py)."""

    AUTO = "auto"  # lapack on CPU, torch elsewhere
    LAPACK = "lapack"  # per expert (LAPACK factorisation, one mm per expert): batch invariant; CPU only
    TORCH = "torch"  # batched over a chunk's experts (accelerators); runs on CPU too


@dataclass(frozen=True)
class GPTQOptions:
    """How GPTQ solves, at any width (names follow the reference implementation, quantizers/gptq.py). One object:
    the quantize config owns it and hands it unchanged to every GPTQ call (the experts, the non-expert Linears,
    the `--damage gptq` table). The grid itself (bits, group size, symmetry) is the QuantSpec's."""

    act_order: bool = True  # columns in order of decreasing Hessian diagonal (evals/results/act_order.md)
    # grids of the contiguous groups from the original weights, before any update (with act_order: no g_idx
    # is stored or read); False: each group's grid on its error-updated weights (evals/results/gptq_static_grids_2026-12-08.md)
    static_groups: bool = True
    blocksize: int = 128  # columns per lazy-batch block
    percdamp: float = 0.01  # damping as a fraction of the mean Hessian diagonal
    max_damp_tries: int = 6  # multiply damping by 10 up to this many times when Cholesky fails
    backend: GPTQBackend = GPTQBackend.AUTO  # lapack on CPU, torch on accelerators (gptq_ops.py)

    def __post_init__(self):
        if not isinstance(self.backend, GPTQBackend):
            object.__setattr__(self, "backend", GPTQBackend(self.backend))
        if not 0 < self.percdamp < 1:
            raise PlanError(f"percdamp must be in (0, 1), got {self.percdamp}")
        if self.blocksize <= 0:
            raise PlanError(f"blocksize must be positive, got {self.blocksize}")

    @property
    def stores_g_idx(self) -> bool:
        """Whether the packed weights carry a g_idx (act-order with groups in permuted order)."""
        return self.act_order and not self.static_groups


class SignRoundTarget(enum.Enum):
    """What `--method signround` learns to reproduce (quantize/signround.py)."""

    EXPERT = "expert"  # each expert's own output on its routed tokens
    BLOCK = "block"  # the layer's output in the unquantized model: the routed sum absorbs the stream's drift


@dataclass(frozen=True)
class SignRoundOptions:
    """How the sign-gradient rounding of `--method signround` learns (quantize/signround.py). Defaults follow
    AutoRound's (200 steps, learning rate 1 / steps, clipping factors in [0.5, 1], the block's output in the
    unquantized model as the target) except the two marked."""

    steps: int = 200
    lr: float | None = (
        None  # None: 1 / steps, decayed linearly to 0 (the last step is kept, see signround.py)
    )
    batch_tokens: int = 512  # routed tokens per expert per step (on average, for the block target)
    max_tokens: int = 8192  # routed tokens per expert kept for the whole optimisation (a seeded subset)
    clip_min: float = 0.5  # lower bound of the learned clipping factors of each group's max and min
    eval_every: int = (
        10  # steps between exact losses on all kept tokens; each expert keeps its best (step 0: RTN)
    )
    target: SignRoundTarget = SignRoundTarget.BLOCK

    def __post_init__(self):
        if not isinstance(self.target, SignRoundTarget):
            object.__setattr__(self, "target", SignRoundTarget(self.target))
        if self.steps < 0:
            raise PlanError(f"signround steps must be >= 0, got {self.steps}")
        if self.lr is not None and not self.lr > 0:
            raise PlanError(f"signround lr must be positive, got {self.lr}")
        if self.batch_tokens <= 0 or self.max_tokens <= 0 or self.eval_every <= 0:
            raise PlanError("signround batch_tokens, max_tokens and eval_every must be positive")
        if not 0 < self.clip_min <= 1:
            raise PlanError(f"signround clip_min must be in (0, 1], got {self.clip_min}")


class CalibMode(enum.Enum):
    """Which calibration tokens build each expert's Hessian."""

    ROUTED = "routed"  # the tokens the router sends to the expert (the expert's real input distribution)
    ALL = "all"  # every calibration token, for every expert (the layer output still follows true routing)


@dataclass(frozen=True)
class QuantizeConfig:
    """How the sequential pass quantizes (the widths themselves come from the Plan)."""

    calib_mode: CalibMode = CalibMode.ROUTED
    weight_by_routing: bool = True  # weight each token's Hessian row by its routing weight (routed mode)
    min_tokens: int = 32  # routed experts below this fall back to identity-Hessian RTN (reported)
    true_sequential: bool = True  # down-projection Hessians from the already quantized gate/up
    batch_size: int = 8  # calibration sequences per layer forward
    gptq_chunk_mb: int = (
        256  # experts per chunk (one batched call, its Hessians) keep working memory near this; 0: one
    )
    progress: bool = True
    device: str | None = (
        None  # where layers compute: "cpu", "cuda", "cuda:N"; None: CUDA when available, else CPU
    )
    gptq: GPTQOptions = GPTQOptions()  # how every GPTQ call of the pass solves
    signround: SignRoundOptions = SignRoundOptions()  # how experts at method signround learn their rounding
    offload_activations: bool | None = None  # calibration activations on the host; None: when they do not fit
    # the down inputs act(gate/up(x)) of a layer's routed tokens, kept from the down Hessians for the layer's
    # outputs (which then skip that gate/up forward) when they take at most this many MB; 0: computed again
    keep_down_inputs_mb: int = 1024

    def __post_init__(self):
        if not isinstance(self.calib_mode, CalibMode):
            object.__setattr__(self, "calib_mode", CalibMode(self.calib_mode))
        if (
            self.weight_by_routing and self.calib_mode is not CalibMode.ROUTED
        ):  # all-experts: no routing weight
            object.__setattr__(self, "weight_by_routing", False)
        if self.min_tokens < 0:
            raise PlanError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.keep_down_inputs_mb < 0:
            raise PlanError(f"keep_down_inputs_mb must be >= 0, got {self.keep_down_inputs_mb}")

    @property
    def stores_g_idx(self) -> bool:
        return self.gptq.stores_g_idx

    def to_json(self) -> dict:
        """The flat record quant_report.json and the resume fingerprint store (the GPTQ options in its middle,
        under the names they have always had there; the SignRound options where they differ from the defaults,
        so records of runs without them read as before)."""
        g = self.gptq
        return {
            "calib_mode": self.calib_mode.value,
            "weight_by_routing": self.weight_by_routing,
            "min_tokens": self.min_tokens,
            "act_order": g.act_order,
            "static_groups": g.static_groups,
            "percdamp": g.percdamp,
            "blocksize": g.blocksize,
            "true_sequential": self.true_sequential,
            "batch_size": self.batch_size,
            "gptq_chunk_mb": self.gptq_chunk_mb,
            "progress": self.progress,
            "device": self.device,
            "gptq_backend": g.backend.value,
            "offload_activations": self.offload_activations,
        } | (
            {"signround": asdict(self.signround) | {"target": self.signround.target.value}}
            if self.signround != SignRoundOptions()
            else {}
        )
