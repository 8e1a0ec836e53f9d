"""Llama 4 (Scout, Maverick; model_type llama4_text): what the derivation cannot see.

Its MoE block (`Llama4TextMoe`) does not call its experts through transformers' experts interface. The router
returns sigmoid scores [T, E], zero off each token's top-k; the block multiplies every token by each expert's
score (the routing weight scales the expert's INPUT, not its output), repeats the tokens once per expert and
calls `experts(routed_in [E*T, H])`, which runs every expert on its slice with the fused `gate_up_proj
[E, H, 2I]` and `down_proj [E, I, H]` (transposed, gate/up concatenated), and adds the shared expert.

`conform(model)` swaps, in place, the class of each such block and of its experts for the subclasses below,
which speak the interface: the block calls `experts(routed_in [k*T, H], top_k_index [k*T, 1], ones [k*T, 1])`,
one row per (routing slot, token), slot-major, each row already scaled by its routing weight, so its
output weight is one; the experts compute the routed sum of any fused experts module. The block's output
equals the original's (an expert given a zero input returns zero, so the original's unrouted products add
nothing). Parameters and their names are unchanged: checkpoints, published (fused keys, under
`language_model.` in the multimodal release, which transformers' prefix handling strips) or saved, load as
transformers' own. The classes are built on first use, so `import moequant` does not import Llama 4's code.
"""

from __future__ import annotations

import functools

import torch

from moequant.arch.base import RouterFacts, Routing
from moequant.arch.lookup import register
from moequant.arch.registry import classes_getattr, conform_blocks, named_classes

MODEL_TYPE = "llama4_text"


@functools.cache
def _classes() -> tuple[type, type]:
    """(experts, block) subclasses of transformers' Llama 4 classes that follow the experts interface."""
    from transformers.models.llama4 import modeling_llama4 as m

    class Llama4InterfaceExperts(m.Llama4TextExperts):
        """Llama 4's experts called as every fused experts module: forward(hidden, top_k_index, top_k_weights)."""

        has_gate, is_transposed, is_concatenated, has_bias = True, True, True, False

        def forward(self, hidden_states, top_k_index, top_k_weights):
            out = torch.zeros_like(hidden_states)  # [T, H]
            for e in top_k_index.unique().tolist():
                tok, slot = torch.nonzero(top_k_index == e, as_tuple=True)  # [Te] each
                gate, up = (hidden_states[tok] @ self.gate_up_proj[e]).chunk(2, dim=-1)  # [Te, I] each
                y = (up * self.act_fn(gate)) @ self.down_proj[e]  # [Te, H]
                out.index_add_(0, tok, y * top_k_weights[tok, slot, None].to(y.dtype))
            return out

    class Llama4InterfaceMoe(m.Llama4TextMoe):
        """Llama 4's MoE block, calling its experts once per routing slot with the weight on the input."""

        def forward(self, hidden_states):
            x = hidden_states.reshape(-1, self.hidden_dim)  # [T, H]
            router_scores, router_logits = self.router(x)  # [T, E] each
            top_k_index = router_logits.topk(self.top_k, dim=-1).indices  # [T, k] the router's own choice
            weights = router_scores.gather(1, top_k_index)  # [T, k]
            routed_in = (x[None] * weights.T[..., None]).reshape(-1, x.shape[-1])  # [k*T, H]
            index = top_k_index.T.reshape(-1, 1)  # [k*T, 1]
            routed_out = self.experts(routed_in, index, torch.ones_like(index, dtype=x.dtype))  # [k*T, H]
            out = self.shared_expert(x)  # [T, H]
            out.add_(routed_out.reshape(self.top_k, -1, x.shape[-1]).sum(dim=0))
            return out, router_logits

    return named_classes(
        __name__, Llama4InterfaceExperts, Llama4InterfaceMoe
    )  # picklable by name: module __getattr__ below


__getattr__ = classes_getattr(__name__, _classes)


def conform(model: torch.nn.Module) -> None:
    """Every Llama 4 MoE block of `model` (and its experts) to the interface subclasses, in place (idempotent)."""
    conform_blocks(model, ("Llama4TextMoe", "Llama4InterfaceMoe"), "Llama4TextExperts", _classes)


def _fields(config) -> dict:
    """The router: sigmoid top-k, the weight on the input (the derivation sees weights of one in each row); it
    returns (scores [T, E], zero off each token's top-k, logits [T, E]): the logits are its second output."""
    k = int(config.num_experts_per_tok)
    facts = RouterFacts(top_k=k, scoring="sigmoid", renormalized=False, weight_on_input=True, logits_at=1)
    return {"router_facts": facts, "routing": Routing.SIGMOID_GROUP_TOPK}


register(MODEL_TYPE, conform=conform, fields_of=_fields)
