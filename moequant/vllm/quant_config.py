"""The "moequant" quantization config inside vLLM (registered by plugin.py; interfaces of vLLM 0.32).

vLLM builds it from config.json's quantization_config (`quant_method: "moequant"`, checkpoint/format.py) and then
calls `maybe_update_config` with the model's config, from which the key renames come (names.py). Each fused MoE
layer gets a MoEQuantMoEMethod with its own experts' specs; every Linear runs vLLM's unquantized path.
"""

from __future__ import annotations

import re

import torch
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from moequant.arch import Activation
from moequant.checkpoint.format import SUPPORTED_FORMAT_VERSIONS, MoEQuantConfig
from moequant.errors import CheckpointError
from moequant.vllm.moe_method import MoEQuantMoEMethod
from moequant.vllm.names import VllmNames, vllm_names

NAME = "moequant"  # config.json's quant_method (checkpoint/format.py)


class MoEQuantVllmConfig(QuantizationConfig):
    def __init__(self, config: MoEQuantConfig):
        super().__init__()
        check_servable(config)
        self.config = config
        self.specs = config.specs()  # MoE layer -> one Spec per expert
        self.names: VllmNames | None = None  # set by maybe_update_config, from the model's config

    @classmethod
    def get_name(cls) -> str:
        return NAME

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # moequant's Triton kernels are built and checked for sm_80+ (sm_90 lowering in kernels/aot.py)

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict) -> MoEQuantVllmConfig:
        return cls(MoEQuantConfig(**{k: v for k, v in config.items() if k != "quant_method"}))

    def maybe_update_config(self, model_name, hf_config=None, revision=None):
        if hf_config is None:
            raise CheckpointError("moequant in vLLM: vLLM passed no model config to read key names from")
        self.names = vllm_names(hf_config.to_dict())

    def _names(self) -> VllmNames:
        if self.names is None:
            raise CheckpointError(
                "moequant in vLLM: maybe_update_config was not called (a vLLM other than 0.32?)"
            )
        return self.names

    def get_checkpoint_weight_mapper(self):
        from vllm.model_executor.models.utils import WeightsMapper

        regex = {re.compile(r.pattern): r.replacement for r in self._names().renames}
        return WeightsMapper(orig_to_new_regex=regex)  # replaces the default one, which drops .g_idx

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, RoutedExperts):
            i = self._names().layer_index(prefix)
            if i is None or i not in self.specs:
                raise CheckpointError(
                    f"vLLM's experts layer {prefix} is none of the checkpoint's MoE layers {sorted(self.specs)}"
                )
            return MoEQuantMoEMethod(layer.moe_config, i, self.specs[i], self.config)
        if isinstance(layer, LinearBase):
            return UnquantizedLinearMethod()
        return None


def check_servable(config: MoEQuantConfig) -> None:
    """Refuse, in one line, a checkpoint the plugin cannot run right."""
    if config.format_version not in SUPPORTED_FORMAT_VERSIONS:
        raise CheckpointError(f"moequant checkpoint format version {config.format_version} is not supported")
    if config.status != "complete":
        raise CheckpointError("this moequant checkpoint is incomplete (an interrupted quantize run)")
    if config.has_bias:
        raise CheckpointError("experts with biases are not served by the moequant vLLM plugin")
    if Activation(config.activation) is Activation.MODULE:
        raise CheckpointError("a family's own gate function is not served by the moequant vLLM plugin")
    if getattr(config, "non_expert", None):
        raise CheckpointError(
            "non-expert quantized layers (--non-expert) are not served by the moequant vLLM plugin yet"
        )
