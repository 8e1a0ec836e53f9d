"""Architecture adapters: where a family keeps its MoE blocks, described as data.

transformers 5 stores routed experts fused in 3-D parameters. moequant works on one
*canonical* view of every family's experts:

    gate_up  [E, 2I, H]   rows 0..I-1 are the gate projection, rows I..2I-1 the up projection
    down     [E, H, I]
    gate_up_bias [E, 2I] / down_bias [E, H]   (only where the family has biases)

so that every quantizer sees (out_features, in_features) matrices whose input is the
expert's input (gate/up) or its activation (down). A family without a gate projection (Activation.gated
False: Nemotron-H, Ergo) holds its up projection alone in the same field, `gate_up [E, I, H]` ("the input
projection", `Activation.in_rows(I)` rows); the intermediate size is always read from `down`.
A family's `MoEArch` is derived from the model itself (derive.py); nothing outside `moequant/arch/` spells a
family's module names.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class Routing(enum.Enum):
    """How the router turns logits into top-k weights (used for router distributions)."""

    SOFTMAX_TOPK = "softmax_topk"  # softmax over all experts, then top-k (renormalised or not)
    SIGMOID_GROUP_TOPK = "sigmoid_group_topk"  # sigmoid scores (DeepSeek-V3: + correction bias, group top-k)
    TOPK_SOFTMAX = "topk_softmax"  # GPT-OSS: top-k of biased logits, softmax over the k chosen


class ExpertLayout(enum.Enum):
    """How the fused expert parameters are laid out in the transformers module (the two switches the experts
    interface has: transposed or not, gate/up concatenated or interleaved), as the derivation measured it."""

    GATE_UP_CONCAT = "gate_up_concat"  # gate_up_proj [E, 2I, H] = [gate; up], down_proj [E, H, I]
    GATE_UP_INTERLEAVED = "gate_up_interleaved"  # gate_up_proj [E, 2I, H], rows gate0, up0, gate1, ...
    TRANSPOSED_CONCAT = "transposed_concat"  # gate_up_proj [E, H, 2I] = [gate | up], down_proj [E, I, H]
    TRANSPOSED_INTERLEAVED = (
        "transposed_interleaved"  # gate_up_proj [E, H, 2I] gate/up interleaved, down_proj [E, I, H]
    )

    @property
    def transposed(self) -> bool:
        return self.value.startswith("transposed")

    @property
    def interleaved(self) -> bool:
        return self.value.endswith("interleaved")


class Activation(enum.Enum):
    SILU_GLU = "silu_glu"  # silu(gate) * up
    GPT_OSS_SWIGLU = "gpt_oss_swiglu"  # (clamp(up) + 1) * g * sigmoid(alpha * g), g = clamp(gate, max=limit)
    MODULE = "module"  # anything else: the family's own gate function (act_params["fn"]), reference path only
    RELU2 = "relu2"  # non-gated: relu(up)^2 (Nemotron-H, Ergo); the input projection is up alone, [E, I, H]
    MODULE_UNGATED = (
        "module_ungated"  # non-gated, the family's own act_fn(up) (act_params["fn"]), reference only
    )

    @property
    def gated(self) -> bool:
        """The input projection holds a gate and an up projection ([E, 2I, H]); else up alone ([E, I, H])."""
        return self not in (Activation.RELU2, Activation.MODULE_UNGATED)

    @property
    def own_function(self) -> bool:
        """The family's own function (act_params["fn"]): the reference path runs it, the kernels do not."""
        return self in (Activation.MODULE, Activation.MODULE_UNGATED)

    def in_rows(self, intermediate: int) -> int:
        """Rows of the input projection ("gate_up" in the canonical view): 2I gated, I non-gated."""
        return input_rows(intermediate, self.gated)


def input_rows(intermediate: int, gated: bool) -> int:
    """Rows of the input projection of experts of intermediate size I: 2I ([gate; up]) gated, I (up) not (for
    what knows only whether an activation is gated: a plan, a damage table)."""
    return 2 * intermediate if gated else intermediate


@dataclass(frozen=True)
class RouterFacts:
    """What the router does, read from what it routed on a probe batch (derive.py)."""

    top_k: int
    scoring: str  # "softmax" | "sigmoid" | "unknown" (softmax over the k chosen is softmax, renormalised)
    renormalized: bool  # the k weights are rescaled to sum to one
    scale: float = 1.0  # constant factor on the weights (DeepSeek's routed_scaling_factor)
    weight_on_input: bool = False  # the weight scales the expert's input, not its output (Llama 4)
    extra_classes: int = 0  # router classes beyond the experts that route nowhere (Zaya's skip expert)
    logits_at: int = 0  # which tensor of the router's output (tuples flattened in order) holds the logits

    def describe(self) -> str:
        s = f"top-{self.top_k} {self.scoring}"
        if self.renormalized:
            s += ", renormalised"
        if abs(self.scale - 1.0) > 1e-6:
            s += f", x{self.scale:g}"
        if self.weight_on_input:
            s += ", weight on the input"
        if self.extra_classes:
            s += f", {self.extra_classes} extra class{'es' if self.extra_classes > 1 else ''} routing nowhere"
        return s


def _interleave(gate: torch.Tensor, up: torch.Tensor, dim: int) -> torch.Tensor:
    """[..., gate0, up0, gate1, up1, ...] along `dim` from gate and up of equal shape."""
    dim = dim % gate.dim()
    return torch.stack([gate, up], dim=dim + 1).flatten(dim, dim + 1)


@dataclass(frozen=True)
class MoEArch:
    """One MoE family, as data (derived from the model: derive.py). Attribute paths are relative to the
    CausalLM root / decoder layer; `block` is "" where the decoder layer itself holds router and experts."""

    model_type: str
    layers: str = "model.layers"  # ModuleList of decoder layers
    block: str = "mlp"  # attribute of a decoder layer holding the sparse MoE block ("" = the layer itself)
    router: str = "gate"  # attribute of the block: its output holds the [T, E] router logits
    experts: str = "experts"  # attribute of the block: fused experts module
    routing: Routing = Routing.SOFTMAX_TOPK
    layout: ExpertLayout = ExpertLayout.GATE_UP_CONCAT
    activation: Activation = Activation.SILU_GLU
    has_bias: bool = False
    shared: tuple[str, ...] = ()  # attributes of the block that every token goes through (never routed)
    gates: tuple[str, ...] = ()  # small gating Linears inside the block, never quantized (like routers)
    final_norm: str = "model.norm"  # applied to the last layer's output before lm_head
    lm_head: str = "lm_head"
    router_facts: RouterFacts | None = None
    experts_class: str = ""  # the transformers class of the fused experts
    act_attrs: tuple[str, str] | None = None  # (alpha, limit) attribute names of a GPT-OSS-style SwiGLU

    def in_block(self, name: str) -> str:
        """A block attribute's path relative to a decoder layer."""
        return f"{self.block}.{name}" if self.block else name

    @property
    def experts_path(self) -> str:
        """The experts module, relative to a decoder layer."""
        return self.in_block(self.experts)

    @property
    def router_path(self) -> str:
        return self.in_block(self.router)

    # ---- canonical view of the fused experts -------------------------------------------------

    @property
    def in_proj(self) -> str:
        """The experts module's parameter holding the input projection: `gate_up_proj` ([gate; up], or
        interleaved), or `up_proj` where the experts have no gate (transformers' has_gate False)."""
        return "gate_up_proj" if self.activation.gated else "up_proj"

    def expert_weights(self, experts: torch.nn.Module) -> ExpertWeights:
        """Canonical (gate_up [E, 2I, H] or up [E, I, H], down [E, H, I], biases) view of a fused experts module."""
        return self.canonical_from_fused(
            {n: p.data for n, p in experts.named_parameters(recurse=False)}
            | {n: b for n, b in experts.named_buffers(recurse=False)}
        )

    def canonical_from_fused(self, fused: dict[str, torch.Tensor]) -> ExpertWeights:
        """Canonical weights from the experts module's own tensors (parameter name -> tensor, any expert count)."""
        gu, dn = fused[self.in_proj], fused["down_proj"]
        if self.layout.transposed:
            gu = gu.transpose(1, 2)  # [E, 2I, H] (module order), [E, I, H] non-gated
            dn = dn.transpose(1, 2)  # [E, H, I]
        gub = fused.get(f"{self.in_proj}_bias") if self.has_bias else None
        db = fused.get("down_proj_bias") if self.has_bias else None
        if self.layout.interleaved:
            gu = torch.cat([gu[:, ::2], gu[:, 1::2]], dim=1)  # [E, 2I, H] = [gate; up]
            if gub is not None:
                gub = torch.cat([gub[..., ::2], gub[..., 1::2]], dim=-1)  # [E, 2I]
        return ExpertWeights(gate_up=gu.contiguous(), down=dn.contiguous(), gate_up_bias=gub, down_bias=db)

    def fused_from_canonical(self, w: ExpertWeights) -> dict[str, torch.Tensor]:
        """Inverse of `expert_weights`: parameter name (in the experts module) -> tensor."""
        inter = w.intermediate
        gu, gub = w.gate_up, w.gate_up_bias  # [E, 2I, H], [E, 2I] (non-gated: [E, I, H], [E, I])
        if self.layout.interleaved:
            gu = _interleave(gu[:, :inter], gu[:, inter:], dim=1)
            if gub is not None:
                gub = _interleave(gub[..., :inter], gub[..., inter:], dim=-1)
        dn = w.down
        if self.layout.transposed:
            gu, dn = gu.transpose(1, 2), dn.transpose(1, 2)  # [E, H, 2I], [E, I, H]
        out = {self.in_proj: gu.contiguous(), "down_proj": dn.contiguous()}
        if self.has_bias:
            out |= {f"{self.in_proj}_bias": gub, "down_proj_bias": w.down_bias}
        return out

    def expert_dims(self, experts: torch.nn.Module) -> tuple[int, int]:
        """(hidden, intermediate) of a fused experts module, from its down projection's shape (meta tensors
        too): the same for gated and non-gated experts."""
        shape = experts.down_proj.shape
        if not self.layout.transposed:
            return shape[1], shape[2]  # [E, H, I]
        return shape[2], shape[1]  # [E, I, H]

    def activation_params(self, experts: torch.nn.Module) -> dict:
        """What apply_activation needs besides the activation: GPT-OSS's (alpha, limit) read from the module,
        or for Activation.MODULE the module's own gate function on canonical [gate | up] inputs (MODULE_UNGATED:
        its own act_fn on up)."""
        if self.activation is Activation.GPT_OSS_SWIGLU:
            alpha, limit = self.act_attrs or ("alpha", "limit")
            return {"alpha": float(getattr(experts, alpha)), "limit": float(getattr(experts, limit))}
        if self.activation is Activation.MODULE:
            return {"fn": ModuleGate(experts, self.layout.interleaved)}
        if self.activation is Activation.MODULE_UNGATED:
            return {"fn": ModuleAct(experts)}
        return {}

    def carried_modules(self, experts: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """The fused experts module's own child modules that hold tensors besides its projections (Ergo's
        per-expert norm, which its conformed block applies): a module replacing the experts (QuantizedExperts)
        keeps them under the same names, so the state dict keeps the family's keys. Empty for most families."""
        if getattr(experts, "is_moequant_experts", False):
            return {}
        return {
            n: m
            for n, m in experts.named_children()
            if any(True for _ in m.parameters()) or any(True for _ in m.buffers())
        }

    # ---- router distributions ----------------------------------------------------------------

    def router_logits(self, out) -> torch.Tensor:
        """The logits [T, C] in a router's output `out` (a tensor or a tuple; C = experts + extra classes): the
        tensor router_facts.logits_at names (Llama 4's router returns its masked scores first)."""
        at = self.router_facts.logits_at if self.router_facts else 0
        logits = flat_tensors(out)[at]
        return logits.reshape(-1, logits.shape[-1])  # [T, C]

    def router_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Distribution over the router's classes implied by its logits [T, C] (for routing-drift KL): the experts
        and, where the router has them, the extra classes that route nowhere (mass moved to or from those is
        routing drift too; the softmax's normalisation needs them)."""
        logits = logits.float()
        if self.routing is Routing.SIGMOID_GROUP_TOPK:
            s = logits.sigmoid()
            return s / s.sum(-1, keepdim=True)
        return logits.softmax(-1)

    @property
    def top_k(self) -> int | None:
        return self.router_facts.top_k if self.router_facts else None


def flat_tensors(out) -> list[torch.Tensor]:
    """The tensors of a module's output, nested tuples and lists flattened in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, tuple | list):
        return [t for o in out for t in flat_tensors(o)]
    return []


class ModuleGate:
    """A family's own gate function (`experts._apply_gate`, or act_fn(gate) * up) on canonical [gate | up]
    inputs [..., 2I] -> [..., I]: re-interleaved first where the module interleaves."""

    def __init__(self, experts: torch.nn.Module, interleaved: bool):
        self.experts, self.interleaved = experts, interleaved

    def __call__(self, gate_up_out: torch.Tensor) -> torch.Tensor:
        if self.interleaved:
            gate, up = gate_up_out.chunk(2, dim=-1)
            gate_up_out = _interleave(gate, up, dim=-1)  # [..., 2I] module order
        apply_gate = getattr(self.experts, "_apply_gate", None)
        if apply_gate is not None:
            return apply_gate(gate_up_out)
        gate, up = gate_up_out.chunk(2, dim=-1)
        return self.experts.act_fn(gate) * up

    def __reduce__(self):  # deep copies share the module (its gate holds no weights)
        return (ModuleGate, (self.experts, self.interleaved))


class ModuleAct:
    """A non-gated family's own activation (`experts.act_fn`) on the canonical input projection's output
    [..., I] (up alone) -> [..., I]."""

    def __init__(self, experts: torch.nn.Module):
        self.experts = experts

    def __call__(self, up_out: torch.Tensor) -> torch.Tensor:
        return self.experts.act_fn(up_out)

    def __reduce__(self):  # deep copies share the module (its activation holds no weights)
        return (ModuleAct, (self.experts,))


@dataclass
class ExpertWeights:
    """Canonical expert weights of one MoE block (see module docstring)."""

    gate_up: torch.Tensor  # [E, 2I, H]; [E, I, H] (up alone) for a non-gated activation
    down: torch.Tensor  # [E, H, I]
    gate_up_bias: torch.Tensor | None = None  # [E, 2I] ([E, I] non-gated)
    down_bias: torch.Tensor | None = None  # [E, H]

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]

    @property
    def intermediate(self) -> int:
        return self.down.shape[2]

    @property
    def in_rows(self) -> int:
        """Rows of the input projection: 2I ([gate; up]), or I (up alone, a non-gated activation)."""
        return self.gate_up.shape[1]

    @property
    def hidden(self) -> int:
        return self.gate_up.shape[2]


# what a call to an experts module passes, positionally or by keyword (with the aliases some families use)
_EXPERTS_CALL = (("hidden_states",), ("top_k_index", "router_indices"), ("top_k_weights", "routing_weights"))


def experts_call_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden_states, top_k_index, top_k_weights) of a call `experts(*args, **kwargs)` (forward pre-hooks)."""
    vals = list(args[:3]) + [None] * (3 - len(args[:3]))
    for i, names in enumerate(_EXPERTS_CALL):
        if vals[i] is None:
            vals[i] = next((kwargs[n] for n in names if n in kwargs), None)
    return vals[0], vals[1], vals[2]


def apply_activation(
    activation: Activation, gate_up_out: torch.Tensor, params: dict[str, float] | None = None
) -> torch.Tensor:
    """Canonical activation: gate_up_out [..., 2I] ([gate | up]), or [..., I] (up) for a non-gated one -> [..., I]."""
    if activation.own_function:
        return params["fn"](gate_up_out)
    if activation is Activation.RELU2:
        return torch.relu(gate_up_out).square()  # [..., I]
    gate, up = gate_up_out.chunk(2, dim=-1)  # [..., I] each
    if activation is Activation.SILU_GLU:
        return F.silu(gate) * up
    alpha, limit = params["alpha"], params["limit"]
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def expert_forward(
    w: ExpertWeights,
    e: int,
    x: torch.Tensor,
    activation: Activation,
    params: dict[str, float] | None = None,
) -> torch.Tensor:
    """Output of expert e on inputs x [T, H] -> [T, H] (no routing weight), in x's dtype."""
    h = x @ w.gate_up[e].to(x.dtype).T  # [T, 2I] ([T, I] non-gated)
    if w.gate_up_bias is not None:
        h = h + w.gate_up_bias[e].to(x.dtype)
    a = apply_activation(activation, h, params)  # [T, I]
    y = a @ w.down[e].to(x.dtype).T  # [T, H]
    if w.down_bias is not None:
        y = y + w.down_bias[e].to(x.dtype)
    return y
