"""Architecture adapters: where a family keeps its MoE blocks, described as data.

transformers 5 stores routed experts fused in 3-D parameters. moequant works on one
*canonical* view of every family's experts:

    gate_up  [E, 2I, H]   rows 0..I-1 are the gate projection, rows I..2I-1 the up projection
    down     [E, H, I]
    gate_up_bias [E, 2I] / down_bias [E, H]   (only where the family has biases)

so that every quantizer sees (out_features, in_features) matrices whose input is the
expert's input (gate/up) or its activation (down). Each family file registers one
`MoEArch` instance; nothing outside `moequant/arch/` spells a family's module names.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


class Routing(enum.Enum):
    """How the router turns logits into top-k weights (used for router distributions)."""

    SOFTMAX_TOPK = "softmax_topk"  # softmax over all experts, then top-k (renormalised or not)
    SIGMOID_GROUP_TOPK = "sigmoid_group_topk"  # DeepSeek-V3: sigmoid scores + correction bias, group top-k
    TOPK_SOFTMAX = "topk_softmax"  # GPT-OSS: top-k of biased logits, softmax over the k chosen


class ExpertLayout(enum.Enum):
    """How the fused expert parameters are laid out in the transformers module."""

    GATE_UP_CONCAT = "gate_up_concat"  # gate_up_proj [E, 2I, H] = [gate; up], down_proj [E, H, I]
    TRANSPOSED_INTERLEAVED = (
        "transposed_interleaved"  # gate_up_proj [E, H, 2I] gate/up interleaved, down_proj [E, I, H]
    )


class Activation(enum.Enum):
    SILU_GLU = "silu_glu"  # silu(gate) * up
    GPT_OSS_SWIGLU = "gpt_oss_swiglu"  # (clamp(up) + 1) * g * sigmoid(alpha * g), g = clamp(gate, max=limit)


@dataclass(frozen=True)
class DiskLayout:
    """How a family's checkpoint names its expert tensors on disk (what save_pretrained writes).

    `renames` are (module-name fragment, disk-name fragment) pairs applied to every key.
    `expert_keys` maps "gate" / "up" / "down" to a per-expert key template relative to the
    experts module (`{e}` is the expert index); None means the fused tensors are stored as is.
    """

    renames: tuple[tuple[str, str], ...] = ()
    expert_keys: tuple[tuple[str, str], ...] | None = (
        ("gate", "{e}.gate_proj.weight"),
        ("up", "{e}.up_proj.weight"),
        ("down", "{e}.down_proj.weight"),
    )

    def to_disk(self, name: str) -> str:
        for model_frag, disk_frag in self.renames:
            name = name.replace(model_frag, disk_frag)
        return name


@dataclass(frozen=True)
class MoEArch:
    """One MoE family, as data. Attribute paths are relative to the CausalLM root / decoder layer."""

    model_type: str
    layers: str = "model.layers"  # ModuleList of decoder layers
    block: str = "mlp"  # attribute of a decoder layer holding the sparse MoE block
    router: str = "gate"  # attribute of the block: returns (logits, top_k_weights, top_k_index)
    experts: str = "experts"  # attribute of the block: fused experts module
    routing: Routing = Routing.SOFTMAX_TOPK
    layout: ExpertLayout = ExpertLayout.GATE_UP_CONCAT
    activation: Activation = Activation.SILU_GLU
    has_bias: bool = False
    shared: tuple[str, ...] = ()  # attributes of the block that every token goes through (never routed)
    gates: tuple[
        str, ...
    ] = ()  # small gating Linears inside the block that are never quantized (like routers)
    final_norm: str = "model.norm"  # applied to the last layer's output before lm_head
    lm_head: str = "lm_head"
    disk: DiskLayout = field(default_factory=DiskLayout)
    # config kwargs (beyond the common ones in `tiny.py`) for a tiny random model used by tests and demos
    tiny_config: tuple[tuple[str, object], ...] = ()

    # ---- canonical view of the fused experts -------------------------------------------------

    def expert_weights(self, experts: torch.nn.Module) -> ExpertWeights:
        """Canonical (gate_up [E, 2I, H], down [E, H, I], biases) view of a fused experts module."""
        if self.layout is ExpertLayout.GATE_UP_CONCAT:
            gate_up = experts.gate_up_proj.data  # [E, 2I, H]
            down = experts.down_proj.data  # [E, H, I]
            gub = experts.gate_up_proj_bias.data if self.has_bias else None
            db = experts.down_proj_bias.data if self.has_bias else None
        else:
            w = experts.gate_up_proj.data  # [E, H, 2I] interleaved
            gate_up = (
                torch.cat([w[..., ::2], w[..., 1::2]], dim=-1).transpose(1, 2).contiguous()
            )  # [E, 2I, H]
            down = experts.down_proj.data.transpose(1, 2).contiguous()  # [E, H, I]
            b = experts.gate_up_proj_bias.data  # [E, 2I] interleaved
            gub = torch.cat([b[..., ::2], b[..., 1::2]], dim=-1)  # [E, 2I]
            db = experts.down_proj_bias.data  # [E, H]
        return ExpertWeights(gate_up=gate_up, down=down, gate_up_bias=gub, down_bias=db)

    def fused_from_canonical(self, w: ExpertWeights) -> dict[str, torch.Tensor]:
        """Inverse of `expert_weights`: parameter name (in the experts module) -> tensor."""
        if self.layout is ExpertLayout.GATE_UP_CONCAT:
            out = {"gate_up_proj": w.gate_up, "down_proj": w.down}
            if self.has_bias:
                out |= {"gate_up_proj_bias": w.gate_up_bias, "down_proj_bias": w.down_bias}
            return out
        E, two_i, H = w.gate_up.shape
        inter = two_i // 2
        gu = w.gate_up.transpose(1, 2)  # [E, H, 2I] as [gate | up]
        fused = torch.empty_like(gu)
        fused[..., ::2], fused[..., 1::2] = gu[..., :inter], gu[..., inter:]
        b = torch.empty_like(w.gate_up_bias)
        b[..., ::2], b[..., 1::2] = w.gate_up_bias[..., :inter], w.gate_up_bias[..., inter:]
        return {
            "gate_up_proj": fused,
            "down_proj": w.down.transpose(1, 2).contiguous(),
            "gate_up_proj_bias": b,
            "down_proj_bias": w.down_bias,
        }

    def expert_dims(self, experts: torch.nn.Module) -> tuple[int, int]:
        """(hidden, intermediate) of a fused experts module, from its shapes (meta tensors too)."""
        shape = experts.gate_up_proj.shape
        if self.layout is ExpertLayout.GATE_UP_CONCAT:
            return shape[2], shape[1] // 2  # [E, 2I, H]
        return shape[1], shape[2] // 2  # [E, H, 2I]

    def activation_params(self, experts: torch.nn.Module) -> dict[str, float]:
        if self.activation is Activation.GPT_OSS_SWIGLU:
            return {"alpha": float(experts.alpha), "limit": float(experts.limit)}
        return {}

    # ---- router distributions ----------------------------------------------------------------

    def router_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Distribution over experts implied by the router logits [T, E] (for routing-drift KL)."""
        logits = logits.float()
        if self.routing is Routing.SIGMOID_GROUP_TOPK:
            s = logits.sigmoid()
            return s / s.sum(-1, keepdim=True)
        return logits.softmax(-1)


@dataclass
class ExpertWeights:
    """Canonical expert weights of one MoE block (see module docstring)."""

    gate_up: torch.Tensor  # [E, 2I, H]
    down: torch.Tensor  # [E, H, I]
    gate_up_bias: torch.Tensor | None = None  # [E, 2I]
    down_bias: torch.Tensor | None = None  # [E, H]

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]

    @property
    def intermediate(self) -> int:
        return self.down.shape[2]

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
    """Canonical activation: gate_up_out [..., 2I] ([gate | up]) -> [..., I]."""
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
    h = x @ w.gate_up[e].to(x.dtype).T  # [T, 2I]
    if w.gate_up_bias is not None:
        h = h + w.gate_up_bias[e].to(x.dtype)
    a = apply_activation(activation, h, params)  # [T, I]
    y = a @ w.down[e].to(x.dtype).T  # [T, H]
    if w.down_bias is not None:
        y = y + w.down_bias[e].to(x.dtype)
    return y
