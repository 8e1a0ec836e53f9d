"""Architecture adapters, derived from the model itself (derive.py); families.py lists what this install has;
llama4.py and ergo.py are the family files, for what the derivation cannot see."""

from moequant.arch import ergo, llama4  # noqa: F401  (register the families' hand-written files)
from moequant.arch.base import (
    Activation,
    ExpertLayout,
    ExpertWeights,
    MoEArch,
    RouterFacts,
    Routing,
    apply_activation,
    expert_forward,
    experts_call_args,
)
from moequant.arch.families import supported_model_types
from moequant.arch.lookup import get_arch, moe_blocks, register, resolve
from moequant.arch.registry import (
    MoEBlockRef,
    block_of,
    block_ref,
    decoder_layers,
    experts_swapped,
    is_moe_block,
    memoizable_children,
    non_expert_linears,
    set_experts,
)

__all__ = [
    "experts_swapped",
    "set_experts",
    "Activation",
    "ExpertLayout",
    "ExpertWeights",
    "MoEArch",
    "MoEBlockRef",
    "RouterFacts",
    "Routing",
    "apply_activation",
    "block_of",
    "block_ref",
    "decoder_layers",
    "expert_forward",
    "experts_call_args",
    "get_arch",
    "is_moe_block",
    "memoizable_children",
    "moe_blocks",
    "non_expert_linears",
    "register",
    "resolve",
    "supported_model_types",
]
