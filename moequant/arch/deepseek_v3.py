"""DeepSeek-V3: sigmoid scores + e_score_correction_bias, group top-k, routed scaling; shared experts;
the first `first_k_dense_replace` layers are dense."""

from moequant.arch.base import MoEArch, Routing
from moequant.arch.registry import register

DEEPSEEK_V3 = register(
    MoEArch(
        model_type="deepseek_v3",
        routing=Routing.SIGMOID_GROUP_TOPK,
        shared=("shared_experts",),
        tiny_config=(
            ("intermediate_size", 128),
            ("moe_intermediate_size", 96),
            ("n_routed_experts", 8),
            ("num_experts_per_tok", 2),
            ("n_group", 2),
            ("topk_group", 1),
            ("first_k_dense_replace", 1),
            ("num_hidden_layers", 3),
            ("n_shared_experts", 1),
            ("q_lora_rank", 32),
            ("kv_lora_rank", 32),
            ("qk_rope_head_dim", 8),
            ("qk_nope_head_dim", 8),
            ("v_head_dim", 16),
        ),
    )
)
