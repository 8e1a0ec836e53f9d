"""Mixtral: softmax top-k with renormalisation; experts saved as w1 (gate), w3 (up), w2 (down)."""

from moequant.arch.base import DiskLayout, MoEArch, Routing
from moequant.arch.registry import register

MIXTRAL = register(
    MoEArch(
        model_type="mixtral",
        routing=Routing.SOFTMAX_TOPK,
        disk=DiskLayout(
            renames=((".mlp.", ".block_sparse_moe."),),
            expert_keys=(("gate", "{e}.w1.weight"), ("up", "{e}.w3.weight"), ("down", "{e}.w2.weight")),
        ),
        tiny_config=(("intermediate_size", 96), ("num_local_experts", 8), ("num_experts_per_tok", 2)),
    )
)
