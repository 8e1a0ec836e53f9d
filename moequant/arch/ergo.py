"""Ergo (model_type ergo): what the derivation cannot see.

Its experts (`ErgoExperts`) are non-gated projections (`up_proj [E, H, I]`, `down_proj [E, I, H]`, relu2)
followed by a per-expert RMSNorm (`post_expert_norm.weight [E, H]`) on each route's output, before the
routing weight: `sum_k w_k * norm_e(down_e relu2(up_e x))`. The norm, after each expert, is not a function of
the canonical view (gate/up, activation, down), so the experts module as transformers calls it cannot be what
moequant quantizes and replaces.

`conform(model)` swaps, in place, the class of each MoE block and of its experts for the subclasses below.
The experts speak the interface with the projections alone (the routed sum of any fused experts module, no
norm); the block hands them each token once per routing slot, slot-major, `experts(rows [k*T, H],
top_k_index [k*T, 1], ones [k*T, 1])`, and applies the per-expert norm and the routing weights to their output
itself, as ErgoExperts does. The block keeps the norm module it found at conform time (not a submodule of the
block: its parameter stays `<block>.experts.post_expert_norm.weight`), so it runs whatever stands in for the
experts (a QuantizedExperts, which carries the norm under the same name for the state dict:
MoEArch.carried_modules; a probe's chunked experts; precomputed outputs). Parameters and their names are
unchanged: checkpoints, published (transformers' renamings) or saved, load as transformers' own.

The experts see unit weights (the weights apply after the norm), so routing-weighted Hessians and the profile's
weight mass count routed slots; the router facts are set here (the derivation sees one slot per row).
"""

from __future__ import annotations

import functools

import torch

from moequant.arch.base import RouterFacts, Routing
from moequant.arch.lookup import register
from moequant.arch.registry import classes_getattr, conform_blocks, named_classes

MODEL_TYPE = "ergo"
_NORM = "post_expert_norm"  # ErgoExperts' per-expert RMSNorm, applied by the conformed block


@functools.cache
def _classes() -> tuple[type, type]:
    """(experts, block) subclasses of transformers' Ergo classes that follow the experts interface."""
    from transformers.models.ergo import modeling_ergo as m

    class ErgoInterfaceExperts(m.ErgoExperts):
        """Ergo's expert projections called as every fused experts module (no norm: the block applies it)."""

        def forward(self, hidden_states, top_k_index, top_k_weights):
            out = torch.zeros_like(hidden_states)  # [T, H]
            for e in top_k_index.unique().tolist():
                if e >= self.num_experts:
                    continue
                tok, slot = torch.nonzero(top_k_index == e, as_tuple=True)  # [Te] each
                y = self.act_fn(hidden_states[tok] @ self.up_proj[e]) @ self.down_proj[e]  # [Te, H]
                out.index_add_(0, tok, y * top_k_weights[tok, slot, None].to(y.dtype))
            return out

    class ErgoInterfaceMoe(m.ErgoMoE):
        """Ergo's MoE block: the experts once per routing slot with unit weights, then each route's norm and
        its weight, as ErgoExperts computes them."""

        def forward(self, hidden_states):
            residuals, shape = hidden_states, hidden_states.shape
            _, top_k_weights, top_k_index = self.gate(hidden_states)  # [T, k] each
            x = hidden_states.reshape(-1, shape[-1])  # [T, H]
            k = top_k_index.shape[1]
            index = top_k_index.T.reshape(-1, 1)  # [k*T, 1] slot-major
            rows = self.experts(x.repeat(k, 1), index, torch.ones_like(index, dtype=x.dtype))  # [k*T, H]
            num = self._expert_norm.weight.shape[0]
            rows = self._expert_norm(rows, index.flatten().clamp_max(num - 1))  # [k*T, H]
            per_slot = rows.reshape(k, -1, shape[-1]).transpose(0, 1)  # [T, k, H]
            out = (per_slot * top_k_weights.unsqueeze(-1)).sum(1).to(x.dtype)  # [T, H]
            return out.reshape(shape) + self.shared_experts(residuals)

    return named_classes(
        __name__, ErgoInterfaceExperts, ErgoInterfaceMoe
    )  # picklable by name: module __getattr__ below


__getattr__ = classes_getattr(__name__, _classes)


def conform(model: torch.nn.Module) -> None:
    """Every Ergo MoE block of `model` (and its experts) to the interface subclasses, in place (idempotent)."""
    conform_blocks(model, ("ErgoMoE", "ErgoInterfaceMoe"), "ErgoExperts", _classes, _keep_norm)


def _keep_norm(block) -> None:
    """The block holds the experts' own norm (or the one a replacement carries) to apply it itself."""
    if "_expert_norm" not in block.__dict__:
        object.__setattr__(block, "_expert_norm", getattr(block.experts, _NORM))  # not a submodule


def _fields(config) -> dict:
    """The router: sigmoid scores, top-k renormalised, times moe_routed_scaling_factor (the derivation sees
    one routing slot of weight one per row)."""
    facts = RouterFacts(
        top_k=int(config.num_experts_per_tok),
        scoring="sigmoid",
        renormalized=int(config.num_experts_per_tok) > 1,
        scale=float(config.moe_routed_scaling_factor),
    )
    return {"router_facts": facts, "routing": Routing.SIGMOID_GROUP_TOPK}


register(MODEL_TYPE, conform=conform, fields_of=_fields)
