"""OLMoE: softmax top-k without renormalisation by default (norm_topk_prob=False)."""

from moequant.arch.base import MoEArch, Routing
from moequant.arch.registry import register

OLMOE = register(
    MoEArch(
        model_type="olmoe",
        routing=Routing.SOFTMAX_TOPK,
        tiny_config=(("intermediate_size", 96), ("num_experts", 8), ("num_experts_per_tok", 2)),
    )
)
