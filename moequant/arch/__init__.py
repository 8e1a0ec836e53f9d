"""Architecture adapters, one small file per MoE family, registered by `model_type`."""

from moequant.arch import deepseek_v3, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe  # noqa: F401  (registers)
from moequant.arch.base import (
    Activation,
    DiskLayout,
    ExpertLayout,
    ExpertWeights,
    MoEArch,
    Routing,
    apply_activation,
    expert_forward,
    experts_call_args,
)
from moequant.arch.registry import (
    MoEBlockRef,
    block_ref,
    decoder_layers,
    get_arch,
    is_moe_block,
    moe_blocks,
    register,
    resolve,
    supported_model_types,
)

__all__ = [
    "Activation",
    "DiskLayout",
    "ExpertLayout",
    "ExpertWeights",
    "MoEArch",
    "MoEBlockRef",
    "Routing",
    "apply_activation",
    "block_ref",
    "decoder_layers",
    "expert_forward",
    "experts_call_args",
    "get_arch",
    "is_moe_block",
    "moe_blocks",
    "register",
    "resolve",
    "supported_model_types",
]
