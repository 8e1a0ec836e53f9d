"""Registry of MoE families by `model_type`, and lookup of a model's MoE blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moequant.arch.base import MoEArch
from moequant.errors import NoMoEError, UnsupportedModelError

_OVERRIDES: dict[str, dict] = {}  # model_type -> fields a hand-written file corrects in the derived adapter
_CACHE: dict[tuple[str, str], MoEArch] = {}


def register(model_type: str, **fields) -> None:
    """For a family whose code the derivation cannot read: fields of its MoEArch to set by hand (one small
    file in moequant/arch/ calling this). No family shipped with transformers needs one today."""
    if model_type in _OVERRIDES:
        raise ValueError(f"MoE family {model_type!r} already has hand-written fields")
    _OVERRIDES[model_type] = fields


def supported_model_types() -> list[str]:
    """The MoE families of the installed transformers: model types with a CausalLM whose modeling code has a
    fused experts class (families.py tells which of them moequant handles, and why not the others)."""
    from moequant.arch.families import moe_model_types

    return moe_model_types()


def _key(config) -> tuple[str, str]:
    d = config.to_dict()
    for k in ("quantization_config", "dtype", "torch_dtype", "_name_or_path"):
        d.pop(k, None)  # a quantized model shares its original's adapter
    import json

    return type(config).__name__, json.dumps(d, sort_keys=True, default=str)


def get_arch(model_or_config) -> MoEArch:
    """The adapter for a model, a config, or a model_type string, derived from the model (derive.py) and
    cached per config."""
    import dataclasses

    from transformers import AutoConfig, PretrainedConfig

    from moequant.arch.derive import derive_arch, tiny_twin
    from moequant.arch.tiny import causal_lm_type

    if isinstance(model_or_config, str):
        try:
            config = AutoConfig.for_model(causal_lm_type(model_or_config))
        except ValueError:
            raise UnsupportedModelError(
                f"model_type {model_or_config!r} is not a model type of the installed transformers"
            ) from None
        model = None
    elif isinstance(model_or_config, PretrainedConfig):
        config, model = model_or_config, None
    else:
        model = model_or_config
        config = getattr(model, "config", None)
        if config is None:
            raise UnsupportedModelError(f"{type(model).__name__} has no transformers config")
    key = (type(model).__name__ if model is not None else "", *_key(config))
    if key not in _CACHE:
        if model is None:
            with torch.device("cpu"):
                model = tiny_twin(config)
            arch = derive_arch(model, twin=model)
        else:
            arch = derive_arch(model)
        if arch.model_type in _OVERRIDES:
            arch = dataclasses.replace(arch, **_OVERRIDES[arch.model_type])
        _CACHE[key] = arch
    return _CACHE[key]


@dataclass
class MoEBlockRef:
    """One sparse MoE block of a model, resolved through its family's adapter."""

    layer_idx: int
    layer: torch.nn.Module  # the decoder layer
    block: torch.nn.Module  # the sparse MoE block
    router: torch.nn.Module
    experts: torch.nn.Module

    top_k: int | None = None  # from the derived router facts

    @property
    def num_experts(self) -> int:
        down = getattr(self.experts, "down_proj", None)
        return down.shape[0] if isinstance(down, torch.Tensor) else int(self.experts.num_experts)


def _get_path(root: torch.nn.Module, path: str):
    obj = root
    for part in path.split(".") if path else ():
        obj = getattr(obj, part)
    return obj


def decoder_layers(model: torch.nn.Module, arch: MoEArch) -> torch.nn.ModuleList:
    return _get_path(model, arch.layers)


def is_moe_block(block: torch.nn.Module | None, arch: MoEArch) -> bool:
    experts = getattr(block, arch.experts, None)
    return experts is not None and hasattr(experts, "down_proj") and hasattr(block, arch.router)


def block_of(layer: torch.nn.Module, arch: MoEArch) -> torch.nn.Module | None:
    """The module of decoder layer `layer` that holds router and experts (the layer itself where block is "")."""
    return layer if not arch.block else getattr(layer, arch.block, None)


def block_ref(arch: MoEArch, i: int, layer: torch.nn.Module) -> MoEBlockRef | None:
    """The sparse MoE block of decoder layer i, or None when the layer has none (a dense layer)."""
    block = block_of(layer, arch)
    if not is_moe_block(block, arch):
        return None
    return MoEBlockRef(i, layer, block, getattr(block, arch.router), getattr(block, arch.experts), arch.top_k)


def moe_blocks(model: torch.nn.Module, arch: MoEArch | None = None, required: bool = True) -> list[MoEBlockRef]:
    """Every sparse MoE block of `model`, in layer order. Raises when there is none (if `required`)."""
    arch = arch or get_arch(model)
    refs = [r for i, layer in enumerate(decoder_layers(model, arch)) if (r := block_ref(arch, i, layer))]
    if not refs and required:
        raise NoMoEError(f"{type(model).__name__} ({arch.model_type}) has no sparse MoE block")
    return refs


def resolve(model: torch.nn.Module) -> tuple[MoEArch, list[MoEBlockRef]]:
    """Adapter and MoE blocks of a model; clear errors for dense or unsupported models."""
    from moequant.arch.derive import find_structure

    find_structure(model)  # NoMoEError / UnsupportedModelError before any probing
    arch = get_arch(model)
    return arch, moe_blocks(model, arch)
