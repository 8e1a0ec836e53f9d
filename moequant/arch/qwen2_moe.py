"""Qwen2-MoE: softmax top-k (norm_topk_prob), plus a sigmoid-gated shared expert."""

from moequant.arch.base import MoEArch, Routing
from moequant.arch.registry import register

QWEN2_MOE = register(
    MoEArch(
        model_type="qwen2_moe",
        routing=Routing.SOFTMAX_TOPK,
        shared=("shared_expert", "shared_expert_gate"),
        gates=("shared_expert_gate",),
        tiny_config=(
            ("intermediate_size", 128),
            ("moe_intermediate_size", 96),
            ("shared_expert_intermediate_size", 64),
            ("num_experts", 8),
            ("num_experts_per_tok", 2),
            ("norm_topk_prob", True),
        ),
    )
)
