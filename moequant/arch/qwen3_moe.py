"""Qwen3-MoE: softmax top-k (norm_topk_prob), no shared expert; dense layers via mlp_only_layers."""

from moequant.arch.base import MoEArch, Routing
from moequant.arch.registry import register

QWEN3_MOE = register(
    MoEArch(
        model_type="qwen3_moe",
        routing=Routing.SOFTMAX_TOPK,
        tiny_config=(
            ("intermediate_size", 128),
            ("moe_intermediate_size", 96),
            ("num_experts", 8),
            ("num_experts_per_tok", 2),
            ("head_dim", 16),
            ("norm_topk_prob", True),
        ),
    )
)
