"""GPT-OSS: biased router, top-k of logits then softmax; experts stored transposed with gate/up
interleaved along the last axis, with biases and a clamped SwiGLU; fused tensors on disk."""

from moequant.arch.base import Activation, DiskLayout, ExpertLayout, MoEArch, Routing
from moequant.arch.registry import register

GPT_OSS = register(
    MoEArch(
        model_type="gpt_oss",
        router="router",
        routing=Routing.TOPK_SOFTMAX,
        layout=ExpertLayout.TRANSPOSED_INTERLEAVED,
        activation=Activation.GPT_OSS_SWIGLU,
        has_bias=True,
        disk=DiskLayout(expert_keys=None),
        tiny_config=(
            ("intermediate_size", 96),
            ("num_local_experts", 8),
            ("num_experts_per_tok", 2),
            ("head_dim", 16),
            ("layer_types", ["sliding_attention", "full_attention"]),
            ("sliding_window", 16),
        ),
    )
)
