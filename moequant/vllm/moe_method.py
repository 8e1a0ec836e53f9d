"""vLLM's fused-MoE method for one moequant MoE layer: every expert at its own width (interfaces of vLLM 0.32).

`create_weights` puts an ExpertStore (store.py) under vLLM's experts layer and registers, for every tensor name an
expert stores (`w13_qweight`, `w2_scales`, ...), an empty parameter whose weight loader is the store's: vLLM's
own RoutedExperts.load_weights reads the expert id and shard from each renamed checkpoint key (names.py) and
calls it. `apply` takes the router's top-k ids and weights (vLLM's own selection, e.g. Mixtral's softmax top-2
renormalised) and runs QuantizedExperts' routed sum: the torch reference on CPU, moequant's fused Triton
kernels on CUDA (kernels/backend.py; the CUDA path has not run inside vLLM).
"""

from __future__ import annotations

import functools

import torch
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.utils import set_weight_attrs

from moequant.checkpoint.format import MoEQuantConfig, empty_experts_module
from moequant.errors import CheckpointError
from moequant.vllm.names import PARAM_STEMS, PROJECTIONS, SHARDS
from moequant.vllm.store import ExpertStore


class MoEQuantMoEMethod(FusedMoEMethodBase):
    def __init__(self, moe, layer_idx: int, specs: list, config: MoEQuantConfig):
        super().__init__(moe)
        self.layer_idx, self.specs, self.config = layer_idx, list(specs), config

    def create_weights(
        self,
        layer,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ):
        cfg = self.config
        where = f"MoE layer {self.layer_idx}"
        if num_experts != len(self.specs) or layer.global_num_experts != len(self.specs):
            raise CheckpointError(
                f"{where}: vLLM holds {num_experts} of {layer.global_num_experts} experts here, the bit map "
                f"lists {len(self.specs)} (expert parallelism and redundant experts are not supported)"
            )
        if (hidden_size, intermediate_size_per_partition) != (cfg.hidden, cfg.intermediate):
            raise CheckpointError(
                f"{where}: vLLM's experts are {hidden_size} x {intermediate_size_per_partition} per rank, the "
                f"checkpoint's {cfg.hidden} x {cfg.intermediate} (tensor parallelism is not supported)"
            )
        store = ExpertStore(self.layer_idx, empty_experts_module(cfg, self.specs))
        layer.register_module("moequant", store)
        for proj in PROJECTIONS:
            for tensor in store.tensor_names(proj):
                param = torch.nn.Parameter(torch.empty(0), requires_grad=False)  # a name for vLLM to route to
                set_weight_attrs(
                    param, {"weight_loader": functools.partial(_load, layer, store, proj, tensor)}
                )
                layer.register_parameter(f"{PARAM_STEMS[proj]}_{tensor}", param)

    def process_weights_after_loading(self, layer) -> None:
        layer.moequant.check_complete()

    def get_fused_moe_quant_config(self, layer):
        return None  # no vLLM kernel runs these experts

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
        # shared experts, if any, run in vLLM's runner (no modular kernel here: SharedExpertsOrder.NO_OVERLAP)
        return layer.moequant(x, topk_ids, topk_weights)  # [T, H]


def _load(layer, store: ExpertStore, proj: str, tensor: str, param, loaded_weight, weight_name, shard_id,
          expert_id, return_success: bool = False):  # fmt: skip
    """vLLM's per-expert weight loader call (RoutedExperts.load_weights) -> ExpertStore.load."""
    if shard_id != SHARDS[proj]:
        raise CheckpointError(
            f"MoE layer {store.layer}: {weight_name} came as shard {shard_id}, {proj} tensors come as "
            f"{SHARDS[proj]}"
        )
    local = layer._map_global_expert_id_to_local_expert_id(expert_id)
    if local != expert_id:
        raise CheckpointError(f"MoE layer {store.layer}: expert {expert_id} maps to local slot {local}")
    store.load(expert_id, proj, tensor, loaded_weight)
    return True if return_success else None
